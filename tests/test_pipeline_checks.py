"""dvc.yaml checked against the code and params.yaml, and the pipeline run end to end with DVC."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import pipeline_checks as pc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]


@pytest.fixture(scope="module")
def stages() -> list[pc.StageInfo]:
    return pc.stages_from_repo(ROOT)


@pytest.fixture(scope="module")
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _by_name(stages: list[pc.StageInfo]) -> dict[str, pc.StageInfo]:
    return {stage.name: stage for stage in stages}


# ---------------------------------------------------------------- deps and params from the code

def test_foreach_stages_are_expanded(stages, params):
    names = set(_by_name(stages))
    for model in params["models"]:
        assert f"train@{model}" in names and f"evaluate@{model}" in names


def test_every_stage_lists_exactly_its_modules_and_params(stages):
    problems = [problem for stage in stages for problem in pc.check_stage(ROOT, stage)]
    assert not problems, "\n".join(problems)


def test_cross_validation_stages_list_exactly_their_modules_and_params(tmp_path):
    """With folds and models switched on, the matrix stages expand and pass the same checks."""
    shutil.copytree(ROOT / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["split"]["folds"] = [0, 1, 2]
    params["crossval"]["models"] = ["mobilenet_attention", "efficientnet_lite0_attention"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _run(["git", "init", "-q"], tmp_path)
    stages = _by_name(pc.stages_from_repo(tmp_path))
    folds = {name for name in stages if name.startswith(("cv_train@", "cv_evaluate@"))}
    assert len(folds) == 2 * 2 * 3 and "cv_train@mobilenet_attention-2" in folds
    assert {"crossval@mobilenet_attention", "crossval@efficientnet_lite0_attention"} <= set(stages)
    problems = [problem for name, stage in stages.items() if name.startswith(("cv", "crossval"))
                for problem in pc.check_stage(ROOT, stage)]
    assert not problems, "\n".join(problems)


def test_checker_reports_a_dropped_module(stages):
    stage = _by_name(stages)["evaluate@mobilenet_attention"]
    assert "pipeline/plots.py" in stage.deps  # imported only as `from pipeline import plots`
    broken = dataclasses.replace(stage, deps=[d for d in stage.deps if d != "pipeline/plots.py"])
    problems = pc.check_stage(ROOT, broken)
    assert problems == [
        "stage evaluate@mobilenet_attention: missing dep pipeline/plots.py "
        "(imported by stages/evaluate.py)"]


def test_checker_reports_transitive_module_and_params(stages):
    stage = _by_name(stages)["train@xception_attention"]
    broken = dataclasses.replace(
        stage, deps=[d for d in stage.deps if d != "pipeline/data.py"],  # via pipeline/train.py
        params=[p for p in stage.params if p != "models.xception_attention"] + ["evaluate"])
    problems = "\n".join(pc.check_stage(ROOT, broken))
    assert "train@xception_attention: missing dep pipeline/data.py" in problems
    assert "reads params key models[['xception_attention']]" in problems
    assert "params key evaluate is listed but never read" in problems


def test_checker_holds_a_folder_dep_to_what_the_stage_imports(stages):
    """``pipeline/sources`` is exact for download (it imports the whole ingest package), not for
    evaluate (labels and layout only), and a dropped folder dep names each missing module."""
    download = _by_name(stages)["download"]
    assert "pipeline/sources" in download.deps
    assert pc.check_stage(ROOT, download) == []
    without = dataclasses.replace(
        download, deps=[d for d in download.deps if d != "pipeline/sources"]
        + ["pipeline/sources/ingest.py"])
    missing = pc.check_stage(ROOT, without)
    assert "stage download: missing dep pipeline/sources/synthetic.py " \
        "(imported by stages/download.py)" in missing
    assert not any("ingest.py" in problem for problem in missing)

    evaluate = _by_name(stages)["evaluate@mobilenet_attention"]
    whole = dataclasses.replace(evaluate, deps=[
        d for d in evaluate.deps if not d.startswith("pipeline/sources/")] + ["pipeline/sources"])
    problems = pc.check_stage(ROOT, whole)
    assert ("stage evaluate@mobilenet_attention: dep pipeline/sources holds "
            "pipeline/sources/synthetic.py, not imported by stages/evaluate.py") in problems
    assert not any("labels.py" in problem or "layout.py" in problem for problem in problems)


def test_folder_deps_ignore_bytecode(stages):
    """Python's ``__pycache__`` inside a folder dep must not change its hash (.dvcignore)."""
    from dvc.repo import Repo

    folders = {dep for stage in stages for dep in stage.deps
               if dep.startswith("pipeline/") and (ROOT / dep).is_dir()}
    assert "pipeline/sources" in folders
    with Repo(str(ROOT)) as repo:
        for folder in folders:
            bytecode = ROOT / folder / "__pycache__" / "ingest.cpython-311.pyc"
            assert repo.dvcignore.is_ignored_file(str(bytecode)), folder
            assert not repo.dvcignore.is_ignored_file(str(ROOT / folder / "ingest.py"))


def test_packages_lazy_and_eager(tmp_path):
    """A lazy package's ``_EXPORTS`` names lead to their modules and the package is no dep; an
    eager package's ``__init__`` is a dep of every import below it, and its imports followed."""
    (tmp_path / "pipeline" / "lazy").mkdir(parents=True)
    (tmp_path / "pipeline" / "eager").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "lazy" / "__init__.py").write_text(
        "import importlib\n_EXPORTS = {'a': ('f',), 'b': ('g',)}\n")
    for name in ("a", "b"):
        (tmp_path / "pipeline" / "lazy" / f"{name}.py").write_text("")
    (tmp_path / "pipeline" / "eager" / "__init__.py").write_text("from pipeline.eager.c import h\n")
    (tmp_path / "pipeline" / "eager" / "c.py").write_text("")
    (tmp_path / "pipeline" / "eager" / "d.py").write_text("")
    (tmp_path / "script.py").write_text(
        "from pipeline.lazy import f\nfrom pipeline.eager.d import x\n")
    assert pc.is_lazy_init(tmp_path, "pipeline/lazy/__init__.py")
    assert not pc.is_lazy_init(tmp_path, "pipeline/eager/__init__.py")
    assert pc.module_closure(tmp_path, "script.py") == {
        "script.py", "pipeline/__init__.py", "pipeline/lazy/__init__.py", "pipeline/lazy/a.py",
        "pipeline/eager/__init__.py", "pipeline/eager/c.py", "pipeline/eager/d.py"}
    stage = pc.StageInfo("s", "python script.py", deps=[
        "script.py", "pipeline/lazy/a.py", "pipeline/eager"])
    assert pc.check_stage(tmp_path, stage) == []
    stage.deps = ["script.py", "pipeline/lazy", "pipeline/eager/d.py"]
    assert pc.check_stage(tmp_path, stage) == [
        "stage s: missing dep pipeline/eager/__init__.py (imported by script.py)",
        "stage s: missing dep pipeline/eager/c.py (imported by script.py)",
        "stage s: dep pipeline/lazy holds pipeline/lazy/b.py, not imported by script.py"]
    # the lazy package bound to a name: any of its attributes may be used
    for line in ("import pipeline.lazy\n", "from pipeline import lazy\n"):
        (tmp_path / "other.py").write_text(line)
        assert pc.module_closure(tmp_path, "other.py") >= {
            "pipeline/lazy/a.py", "pipeline/lazy/b.py"}


def test_an_eager_init_brings_its_import_time_imports_and_a_script_its_package_init(tmp_path):
    """``pipeline/__init__`` that runs one module at import and names another lazily: only the
    first is a dep of every stage; ``python -m stages.x`` also runs ``stages/__init__``."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text(
        "from pipeline.pin import pin\npin()\n\n"
        "def __getattr__(name):\n    from pipeline.heavy import predict\n    return predict\n")
    for name in ("pin", "heavy", "config"):
        (tmp_path / "pipeline" / f"{name}.py").write_text("")
    (tmp_path / "stages" / "__init__.py").write_text("import pipeline  # noqa: F401\n")
    (tmp_path / "stages" / "x.py").write_text("from pipeline.config import y\n")
    assert not pc.is_lazy_init(tmp_path, "pipeline/__init__.py")
    assert pc.module_closure(tmp_path, "stages/x.py") == {
        "stages/x.py", "stages/__init__.py", "pipeline/__init__.py", "pipeline/pin.py",
        "pipeline/config.py"}
    stage = pc.StageInfo("x", "python -m stages.x", deps=["stages/x.py", "pipeline/config.py"])
    assert pc.check_stage(tmp_path, stage) == [
        f"stage x: missing dep {dep} (imported by stages/x.py)"
        for dep in ("pipeline/__init__.py", "pipeline/pin.py", "stages/__init__.py")]


def test_params_reads_are_found(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "helper.py").write_text(
        "def f():\n    from pipeline.io import load_params\n    return load_params()['deep']\n")
    (tmp_path / "pipeline" / "io.py").write_text("def load_params():\n    return {}\n")
    (tmp_path / "script.py").write_text(
        "from pipeline import helper\nfrom pipeline.io import load_params\n"
        "p = load_params()\nx = p['models'][name], p['a']['b'], load_params()['c']\n")
    assert pc.module_closure(tmp_path, "script.py") == {
        "script.py", "pipeline/__init__.py", "pipeline/helper.py", "pipeline/io.py"}
    assert pc.params_read(tmp_path, "script.py") == {
        ("models", pc.DYNAMIC), ("a", "b"), ("c", None)}
    assert pc.params_read(tmp_path, "pipeline/helper.py") == {("deep", None)}


# ---------------------------------------------------------------- dvc.yaml against params.yaml

def _lookup(params: dict, dotted: str) -> bool:
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_params_keys_exist(stages, params):
    missing = [f"{s.name}: {key}" for s in stages for key in s.params if not _lookup(params, key)]
    assert not missing, f"params keys not in params.yaml: {missing}"


def test_models_have_backbone_and_image_size(params):
    for name, model in params["models"].items():
        assert model.get("backbone"), f"models.{name} has no backbone"
        assert isinstance(model.get("image_size"), int), f"models.{name} has no image_size"


def test_every_output_has_one_producer():
    from dvc.repo import Repo

    producers: dict[str, list[str]] = {}
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                producers.setdefault(str(out.def_path), []).append(stage.name)
    duplicated = {path: names for path, names in producers.items() if len(names) > 1}
    assert not duplicated, f"outputs with several producers: {duplicated}"
    paths = sorted(producers)
    nested = [(a, b) for a in paths for b in paths if a != b and b.startswith(a.rstrip("/") + "/")]
    assert not nested, f"outputs inside other outputs: {nested}"


def test_ensemble_deps_match_members(stages, params):
    deps = _by_name(stages)["ensemble"].deps
    members = params["ensemble"]["members"]
    assert set(members) <= set(params["models"]), "ensemble.members must be models"
    member_deps = {d for d in deps if d.startswith(("metrics/", "data/eval/"))}
    expected = {f"metrics/{m}/train.json" for m in members} | {f"data/eval/{m}" for m in members}
    assert member_deps == expected


# ---------------------------------------------------------------- ruff

def test_ruff_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- end to end

SKIP_COPY = ("data/", "metrics/", "dvclive/", "reports/", "dvc.lock", ".dvc/cache", ".dvc/tmp")
GIT_USER = ["-c", "user.name=pipeline-test", "-c", "user.email=pipeline-test@example.invalid"]


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd), DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, (
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return _run(["git", *GIT_USER, *args], cwd)


def _dvc(cwd: Path, *args: str) -> str:
    result = _run([*DVC, *args], cwd)
    return result.stdout + result.stderr


ALWAYS_RUN = ("source", "external")  # fingerprints of folders outside the repository


def _status(cwd: Path) -> dict:
    """``dvc status``, less the fingerprint stages, which are always changed by design."""
    status = json.loads(_run([*DVC, "status", "--json"], cwd).stdout or "{}")
    for stage in ALWAYS_RUN:
        assert status.pop(stage, ["always changed"]) == ["always changed"], status
    return status


def _ran(output: str) -> set[str]:
    """The stages a ``dvc repro`` ran, less the fingerprint stages, which run every time by
    design."""
    return {line.split("'")[1] for line in output.splitlines()
            if line.startswith("Running stage")} - set(ALWAYS_RUN)


def _edit_params(path: Path, edit) -> None:
    params = yaml.safe_load(path.read_text())
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _tiny(params: dict) -> None:
    params["data"]["source"] = "synthetic"
    params["data"]["synthetic"]["images_per_class"] = 10
    params["train"].update(epochs=1, batch_size=16)
    params["train"]["random_init"].update(epochs=1)
    params["masks"]["gallery_per_class"] = 2
    params["evaluate"].update(mistakes=2)
    for model in params["models"].values():
        model.update(image_size=64, embed_dim=32, heads=2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A git + DVC copy of the project on a tiny synthetic config, run once and committed."""
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], ROOT).stdout.splitlines()
    repo = tmp_path_factory.mktemp("tiny") / "repo"
    for name in files:
        if name.startswith(SKIP_COPY) or not (ROOT / name).is_file():
            continue
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    _edit_params(repo / "params.yaml", _tiny)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "tiny pipeline")
    _dvc(repo, "repro")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "run")
    return repo


def _copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the committed tiny run (git history and DVC cache included)."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_run, repo, ignore=shutil.ignore_patterns("tmp"))
    return repo


@pytest.mark.slow
def test_end_to_end(tiny_run, tmp_path):
    repo = _copy_run(tiny_run, tmp_path)
    for model in yaml.safe_load((repo / "params.yaml").read_text())["models"]:
        assert (repo / "metrics" / model / "eval.json").is_file()
    assert (repo / "metrics" / "ensemble" / "eval.json").is_file()
    assert (repo / "reports" / "summary.md").is_file()

    # nothing changed: nothing runs, status clean
    again = _dvc(repo, "repro")
    assert _ran(again) == set(), again
    assert _status(repo) == {}

    # a model's param: only that model's training is stale
    _edit_params(repo / "params.yaml",
                 lambda p: p["models"]["xception_attention"].update(dropout=0.3))
    assert set(_status(repo)) == {"train@xception_attention"}
    rerun = _dvc(repo, "repro")
    assert _ran(rerun) == {"train@xception_attention", "evaluate@xception_attention", "ensemble",
                   "compare"}, rerun
    diff = json.loads(_run([*DVC, "metrics", "diff", "--json"], repo).stdout or "{}")
    changed = {f"{path}:{key}" for path, metrics in diff.items() for key, value in metrics.items()
               if value.get("diff") not in (None, 0)}
    assert any(name.startswith("metrics/xception_attention/") for name in changed), diff

    # revert: back to the committed run (dvc autostage has staged the new files: reset --hard)
    _git(repo, "reset", "-q", "--hard")
    _dvc(repo, "checkout", "--force")
    assert _status(repo) == {}

    # a masks param: masks and the stages reading masks params, not download/split/evaluate
    _edit_params(repo / "params.yaml", lambda p: p["masks"].update(close_px=6))
    stale = set(_status(repo))
    assert "masks" in stale
    assert {"download", "split"}.isdisjoint(stale)
    models = yaml.safe_load((repo / "params.yaml").read_text())["models"]
    assert stale == {"masks"} | {f"train@{m}" for m in models}
    _git(repo, "reset", "-q", "--hard")
    assert _status(repo) == {}

    # push to a local remote, clone, pull: up to date, nothing to run
    remote = tmp_path / "remote"
    _dvc(repo, "remote", "add", "-d", "local", str(remote))
    _dvc(repo, "push")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "remote")
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert "local" in (clone / ".dvc" / "config").read_text()
    _dvc(clone, "pull")
    assert _status(clone) == {}
    assert _ran(_dvc(clone, "repro")) == set()


def _cells(folder: Path) -> Path:
    """A small class-per-folder data set outside the repository, as a user's own images."""
    from pipeline.sources import generate_dataset

    generate_dataset(folder, images_per_class=3, seed=5, workers=1)
    return folder


@pytest.mark.slow
def test_local_data_changes_rerun_download_and_after(tiny_run, tmp_path):
    repo, cells = _copy_run(tiny_run, tmp_path), _cells(tmp_path / "cells")
    _edit_params(repo / "params.yaml", lambda p: p["data"].update(source=str(cells)))
    assert _ran(_dvc(repo, "repro", "download")) == {"download"}
    downstream = set(_status(repo))
    assert {"masks", "split"} <= downstream and "download" not in downstream
    assert _ran(_dvc(repo, "repro", "download")) == set()  # untouched folder: nothing reruns
    fingerprint = json.loads((repo / "data" / "fingerprint.json").read_text())
    assert fingerprint["files"] == 24

    edited = sorted((cells / "monocyte").iterdir())[0]
    edited.write_bytes(sorted((cells / "platelet").iterdir())[0].read_bytes())  # same name
    assert _ran(_dvc(repo, "repro", "download")) == {"download"}
    assert json.loads((repo / "data" / "fingerprint.json").read_text()) != fingerprint
    (cells / "monocyte" / "extra.png").write_bytes(edited.read_bytes())  # an added image
    assert _ran(_dvc(repo, "repro", "download")) == {"download"}
    manifest = (repo / "data" / "raw" / "manifest.csv").read_text()
    assert "monocyte/extra.png" in manifest
    (cells / "monocyte" / "extra.png").unlink()  # a removed image: back to a state DVC has
    restored = _dvc(repo, "repro", "download")  # seen, so its run cache restores the outputs
    assert "Stage 'download' is cached" in restored or _ran(restored) == {"download"}, restored
    assert "monocyte/extra.png" not in (repo / "data" / "raw" / "manifest.csv").read_text()


@pytest.mark.slow
def test_cross_validation_leaves_the_main_models_alone(tiny_run, tmp_path):
    """Turning folds on makes only the folds stage and the cross-validation stages stale:
    data/split, the main models, their evaluations and the ensemble stay as they are."""
    repo, model = _copy_run(tiny_run, tmp_path), "mobilenet_attention"
    split = (repo / "data" / "split" / "train.csv").read_bytes()
    _edit_params(repo / "params.yaml", lambda p: (p["split"].update(folds=[0, 1]),
                                                  p["crossval"].update(models=[model])))
    stale = set(_status(repo))
    assert "folds" in stale and f"cv_train@{model}-1" in stale, stale
    assert all(name.startswith(("folds", "cv_", "crossval@")) for name in stale), stale
    assert _ran(_dvc(repo, "repro", "folds")) == {"folds"}
    assert sorted(p.name for p in (repo / "data" / "folds").iterdir() if p.is_dir()) == ["0", "1"]
    assert (repo / "data" / "split" / "train.csv").read_bytes() == split
    assert all(name.startswith(("cv_", "crossval@")) for name in _status(repo))
    assert _ran(_dvc(repo, "repro", f"crossval@{model}")) == {
        f"{stage}@{model}-{fold}" for stage in ("cv_train", "cv_evaluate") for fold in (0, 1)
    } | {f"crossval@{model}"}
    pooled = (repo / "data" / "crossval" / model / "out_of_fold_predictions.csv").read_text()
    split_images = sum(len((repo / "data" / "split" / f"{part}.csv").read_text().splitlines()) - 1
                       for part in ("train", "val", "test"))
    assert len(pooled.splitlines()) - 1 == split_images  # every image tested once
    assert _status(repo) == {}
    _edit_params(repo / "params.yaml", lambda p: (p["split"].update(folds=[]),  # off again
                                                  p["crossval"].update(models=[])))
    assert set(_status(repo)) == {"folds"}


@pytest.mark.slow
def test_edited_external_set_reruns_its_evaluation_only(tiny_run, tmp_path):
    """An external set is a dependency the way data.source is: an untouched one reruns nothing,
    an edited image reruns the evaluation that scores it, never training."""
    repo, cells = _copy_run(tiny_run, tmp_path), _cells(tmp_path / "cells")
    _edit_params(repo / "params.yaml", lambda p: p["evaluate"].update(external=[str(cells)]))
    evaluation = "evaluate@mobilenet_attention"
    assert _ran(_dvc(repo, "repro", evaluation)) == {evaluation}  # a new param: expected
    assert _ran(_dvc(repo, "repro", evaluation)) == set()  # untouched set: nothing reruns
    edited = sorted((cells / "monocyte").iterdir())[0]
    edited.write_bytes(sorted((cells / "platelet").iterdir())[0].read_bytes())  # same name
    assert _ran(_dvc(repo, "repro", evaluation)) == {evaluation}
    assert not any(name.startswith(("train@", "download", "masks", "split", "folds"))
                   for name in _status(repo))


@pytest.mark.slow
def test_fresh_clone_without_cache(tiny_run, tmp_path):
    """A git clone has no DVC cache and no remote: plot diffs and one-stage experiments work."""
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(tiny_run), str(clone)], tmp_path)
    shown = json.loads(_run([*DVC, "plots", "diff", "HEAD", "--json"], clone).stdout)
    assert not shown.get("errors"), shown["errors"]
    plots = shown["data"]
    assert {"ROC, one vs rest", "Loss per epoch, train and validation"} <= set(plots)
    cells = _cells(tmp_path / "cells")
    _dvc(clone, "exp", "run", "--allow-missing", "-S", f"data.source={cells}", "download")
    experiments = _experiments(clone)
    assert [e["params"]["data"]["source"] for e in experiments] == [str(cells)]


def _experiments(repo: Path) -> list[dict]:
    """``dvc exp show --json`` flattened: one dict (name, params, metrics) per experiment."""
    shown = json.loads(_run([*DVC, "exp", "show", "--json"], repo).stdout)
    found = []
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            data = experiment["revs"][0]["data"]
            found.append({
                "name": experiment["name"],
                "params": data["params"]["params.yaml"]["data"],
                "metrics": {path: value["data"] for path, value in data["metrics"].items()},
            })
    return found


@pytest.mark.slow
def test_queued_sweep_runs_both_points(tiny_run, tmp_path):
    """A 2-point grid queued with ``dvc exp run --queue -S a,b``, run, then listed and sorted."""
    repo = _copy_run(tiny_run, tmp_path)
    swept = "models.mobilenet_attention.image_size"
    _dvc(repo, "exp", "run", "--queue", "-S", f"{swept}=48,56")
    _dvc(repo, "exp", "run", "--run-all")

    experiments = _experiments(repo)
    assert len(experiments) == 2, experiments
    sizes = sorted(e["params"]["models"]["mobilenet_attention"]["image_size"] for e in experiments)
    assert sizes == [48, 56]
    for experiment in experiments:
        evaluation = experiment["metrics"]["metrics/mobilenet_attention/eval.json"]
        assert 0.0 <= evaluation["macro_f1"] <= 1.0
        assert "macro_f1" in experiment["metrics"]["metrics/ensemble/eval.json"]
        # training records are plain outputs, not metrics: the metrics are quality figures
        assert "metrics/mobilenet_attention/train.json" not in experiment["metrics"]
    # the untouched models' results are reused from the baseline, not retrained
    baseline = json.loads((repo / "metrics/xception_attention/eval.json").read_text())
    for experiment in experiments:
        assert experiment["metrics"]["metrics/xception_attention/eval.json"] == baseline

    table = _run([*DVC, "exp", "show", "--csv", "--sort-by",
                  "metrics/ensemble/eval.json:macro_f1", "--sort-order", "desc"], repo).stdout
    assert all(e["name"] in table for e in experiments), table
