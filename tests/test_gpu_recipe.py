"""bench/gpu_recipe.py: the timed recipe runs (here on the CPU, at ``--quick`` size)."""

from __future__ import annotations

import json

import pytest

from bench import gpu_recipe
from pipeline.errors import PipelineError


def test_overrides_and_repeated_source(tmp_path):
    params = {"train": {"epochs": 6}, "models": {"m": {"image_size": 128}}}
    changed = gpu_recipe.with_overrides(params, {"train.epochs": 20, "models.m.image_size": 160})
    assert changed == {"train": {"epochs": 20}, "models": {"m": {"image_size": 160}}}
    assert params["train"]["epochs"] == 6  # the original is left alone
    source = tmp_path / "source"
    (source / "a").mkdir(parents=True)
    for name in ("x.jpg", "y.jpg"):
        (source / "a" / name).write_bytes(name.encode())
    assert gpu_recipe.repeated_source(source, tmp_path / "out", {"a": 5}) == 5
    copies = sorted((tmp_path / "out" / "a").iterdir())
    assert len(copies) == 5 and [p.read_bytes() for p in copies].count(b"x.jpg") == 3
    (source / "b").mkdir()
    with pytest.raises(PipelineError, match="no images to repeat"):
        gpu_recipe.repeated_source(source, tmp_path / "out", {"b": 1})
    with pytest.raises(SystemExit):
        gpu_recipe.parse_args(["--source", str(source), "--variants", "compiled,fast"])


@pytest.mark.slow
def test_quick_run_eager_torchrun_and_full_size(synthetic_folder, tmp_path):
    """Every stage runs in work folders of its own; torchrun joins a one-process DDP job."""
    out = tmp_path / "gpu.json"
    gpu_recipe.main(["--source", str(synthetic_folder), "--quick", "--variants", "eager,torchrun",
                     "--full-epochs", "1", "--work", str(tmp_path / "work"), "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["prepare_seconds"]) == set(gpu_recipe.PREPARE_STAGES)
    eager, torchrun = report["variants"]["eager"], report["variants"]["torchrun"]
    assert not eager["train"]["distributed"] and eager["train"]["epochs_run"] == 1
    assert torchrun["train"]["distributed"] and torchrun["train"]["world_size"] == 1
    assert eager["test"]["images"] == torchrun["test"]["images"] > 0
    assert 0 <= torchrun["test"]["accuracy_ci95_low"] <= torchrun["test"]["accuracy"]
    full = report["full_size"]
    assert full["images"] == 64 * len(gpu_recipe.PBC_CLASS_SIZES)
    assert set(full["seconds"]) == {*gpu_recipe.PREPARE_STAGES, "train"}
    assert full["train"]["train_images"] > 0.5 * full["images"]
