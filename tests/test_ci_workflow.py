"""The pull-request comment compares like with like (.github/workflows/ci.yml, pipeline-metrics).

The job's shell steps run here, in order, on a throw-away repository shaped like a pull request's
checkout (GitHub's merge commit), with the installs left out: its metrics depend on the machine,
and the committed ones come from another machine, as they do in this project.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
DVC_YAML = """stages:
  prepare:
    cmd: python prepare.py
    deps: [prepare.py]
    outs: [prepared.txt]
  score:
    cmd: python score.py
    deps: [score.py, prepared.txt]
    metrics:
      - metrics.json:
          cache: false
"""
PREPARE = "open('prepared.txt', 'w').write('cells')\n"
# The score depends on the machine (MACHINE_BONUS): 0.2 more on the CI runner than on the
# developer's machine that committed metrics.json.
SCORE = """import json, os
score = {base} + float(os.environ.get("MACHINE_BONUS", 0))
json.dump({{"score": round(score, 6)}}, open("metrics.json", "w"))
"""


@pytest.fixture(scope="module")
def job() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())["jobs"]["pipeline-metrics"]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


def _commit(repo: Path, base: float, message: str) -> None:
    """The project at score ``base``, with the metrics its developer's machine produced."""
    (repo / "score.py").write_text(SCORE.format(base=base))
    (repo / "metrics.json").write_text(f'{{"score": {base}}}')
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", message)


@pytest.fixture
def pull_request(tmp_path) -> Path:
    return make_pull_request(tmp_path / "checkout")


def make_pull_request(repo: Path) -> Path:
    """main at score 0.5, a pull request raising it to 0.6, checked out as GitHub does for a
    pull request: the merge commit of the two, detached."""
    (repo / ".dvc").mkdir(parents=True)
    (repo / ".dvc" / "config").write_text("")
    (repo / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "prepare.py").write_text(PREPARE)
    (repo / ".gitignore").write_text("/prepared.txt\n")
    _git(repo, "init", "-q", "-b", "main")
    _commit(repo, 0.5, "main")
    _git(repo, "checkout", "-q", "-b", "change")
    _commit(repo, 0.6, "the change")
    _git(repo, "checkout", "-q", "--detach", "main")
    _git(repo, "merge", "-q", "--no-ff", "-m", "Merge the change into main", "change")
    return repo


def _shell_steps(job: dict) -> list[dict]:
    """The job's shell steps but the installs (pip), which the test's environment has done."""
    return [step for step in job["steps"] if "run" in step and "pip install" not in step["run"]]


def _run_job(job: dict, repo: Path, runner_temp: Path) -> dict[str, str]:
    """Runs the shell steps as GitHub does (bash -eo pipefail, $GITHUB_ENV carried to the next
    steps, ${{ runner.temp }} in working-directory); returns each step's output by name."""
    github_env = runner_temp / "github_env"
    github_env.touch()
    env = dict(os.environ, **job.get("env", {}), RUNNER_TEMP=str(runner_temp), MACHINE_BONUS="0.2",
               GITHUB_ENV=str(github_env), GITHUB_STEP_SUMMARY=str(runner_temp / "summary.md"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1")
    outputs = {}
    for step in _shell_steps(job):
        folder = step.get("working-directory", ".").replace("${{ runner.temp }}", str(runner_temp))
        assert "${{" not in step["run"] + folder, f"{step['name']}: an expression the test lacks"
        result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                                 step["run"]], cwd=repo / folder, env=env, capture_output=True,
                                text=True)
        assert result.returncode == 0, f"{step['name']}:\n{result.stdout}\n{result.stderr}"
        outputs[step["name"]] = result.stdout + result.stderr
        env.update(line.split("=", 1) for line in github_env.read_text().splitlines())
    return outputs


@pytest.mark.slow
def test_comment_diffs_against_main_reproduced_on_the_same_runner(job, pull_request, tmp_path):
    runner_temp = tmp_path / "runner"
    runner_temp.mkdir()
    outputs = _run_job(job, pull_request, runner_temp)

    table = [line for line in (pull_request / "metrics-diff.md").read_text().splitlines()
             if "metrics.json" in line]
    cells = [cell.strip() for cell in table[0].strip("|").split("|")]
    # main reproduced here scores 0.7, not the 0.5 its developer committed: the comment shows
    # the change's +0.1 (committed main against this run would show +0.3)
    assert cells == ["metrics.json", "score", "0.7", "0.8", "0.1"]
    main = _git(pull_request, "rev-parse", "HEAD^1")
    assert _git(pull_request, "rev-parse", f"{job['env']['BASELINE']}^") == main
    assert "Stage 'prepare' is cached" in outputs["Reproduce the pull request on this runner"]
    assert "score" in (runner_temp / "summary.md").read_text()


def test_main_is_reproduced_before_the_diff_and_the_diff_names_that_run(job):
    runs = [step.get("run", "") for step in job["steps"]]
    reproduce_main = next(i for i, step in enumerate(job["steps"])
                          if "main" in step.get("working-directory", "")
                          and "dvc repro" in step.get("run", ""))
    diff = next(i for i, run in enumerate(runs) if "dvc metrics diff" in run)
    assert reproduce_main < diff
    assert 'dvc metrics diff --md "$BASELINE"' in runs[diff]
    assert "dvc metrics diff --md main" not in "".join(runs)
