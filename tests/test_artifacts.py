"""Trained models as DVC artifacts: declared in dvc.yaml, fetched with ``dvc artifacts get``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _artifacts() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"]


def test_every_trained_model_and_the_ensemble_is_a_model_artifact():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    artifacts = _artifacts()
    assert set(artifacts) == set(params["models"]) | {"ensemble"}
    assert "data/models/${key}" in stages["train"]["do"]["outs"]
    assert "data/models/ensemble" in stages["ensemble"]["outs"]
    for name, artifact in artifacts.items():
        assert artifact["path"] == f"data/models/{name}"
        assert artifact["type"] == "model" and artifact["desc"] and artifact["labels"]


def _run(*args: str, cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


@pytest.mark.slow
def test_dvc_artifacts_get_from_a_local_clone(tmp_path):
    """A repository declaring the recipe model's artifact, its data pushed to a local remote and
    a version registered (GTO tag): ``dvc artifacts get`` on a clone downloads the model."""
    dvc = (sys.executable, "-m", "dvc")
    name = "efficientnet_lite0_attention"
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    repo.mkdir()
    _run("git", "init", "-q", cwd=repo)
    _run(*dvc, "init", "-q", cwd=repo)
    model_dir = repo / "data" / "models" / name
    model_dir.mkdir(parents=True)
    (model_dir / "model.safetensors").write_bytes(b"weights \x00\x01")
    _run(*dvc, "add", "-q", f"data/models/{name}", cwd=repo)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"artifacts": {name: _artifacts()[name]}}))
    _run(*dvc, "remote", "add", "-d", "local", str(remote), cwd=repo)
    _run(*dvc, "push", "-q", cwd=repo)
    _run("git", "add", "-A", cwd=repo)
    _run("git", "commit", "-qm", "model", cwd=repo)
    _run("git", "tag", "-a", f"{name}@v1.0.0", "-m", f"Registering {name} v1.0.0", cwd=repo)
    _run("git", "clone", "-q", str(repo), str(tmp_path / "clone"), cwd=tmp_path)
    _run(*dvc, "artifacts", "get", str(tmp_path / "clone"), name, "-o", str(tmp_path / "got"),
         cwd=tmp_path)
    assert (tmp_path / "got" / "model.safetensors").read_bytes() == b"weights \x00\x01"
