"""Training end to end on tiny synthetic splits: outputs, early stopping, interruption, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import train as training
from pipeline.masks import MaskParams
from pipeline.models import ModelConfig, load_checkpoint
from pipeline.train import TrainConfig, train_model

TINY_MODEL = ModelConfig("mobilenetv2_100", image_size=48, embed_dim=32, heads=2)
TINY_RECIPE = TrainConfig(epochs=1, batch_size=16, lr=1e-3, patience=3, mask_mode="crop")


def run(prepared: Path, out: Path, model=TINY_MODEL, recipe=TINY_RECIPE) -> dict:
    return train_model("tiny", model, recipe, MaskParams(), prepared / "split",
                       prepared / "raw" / "images", prepared / "masks", out / "model",
                       out / "train.json", out / "live")


def test_one_epoch_end_to_end(prepared, tmp_path):
    summary = run(prepared, tmp_path)
    assert summary["epochs_run"] == 1 and summary["images_per_second"] > 0
    assert json.loads((tmp_path / "train.json").read_text())["best_epoch"] == 1
    model, checkpoint = load_checkpoint(tmp_path / "model" / "model.safetensors")
    assert len(checkpoint["classes"]) == 8 and checkpoint["preprocess"]["mask_mode"] == "crop"
    assert model(torch.zeros(2, 3, 48, 48)).shape == (2, 8)
    assert (tmp_path / "live" / "metrics.json").exists()
    assert list((tmp_path / "live" / "plots" / "metrics").rglob("*.tsv"))


def test_seeded_runs_are_identical(prepared, tmp_path):
    first, second = run(prepared, tmp_path / "a"), run(prepared, tmp_path / "b")
    assert first["val_macro_f1"] == second["val_macro_f1"]
    weights_a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    weights_b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.mark.parametrize(("val_scores", "best_epoch", "epochs_run"), [
    ([0.5, 0.4, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9], 1, 3),  # ties do not count as a gain
    ([0.2, 0.5, 0.4, 0.6, 0.3, 0.3, 0.9, 0.9], 4, 6),  # each gain restarts the patience window
])
def test_early_stopping(prepared, tmp_path, monkeypatch, val_scores, best_epoch, epochs_run):
    scores = iter(val_scores)
    monkeypatch.setattr(training, "macro_f1", lambda *_args: next(scores))
    recipe = TrainConfig(epochs=8, batch_size=16, lr=1e-3, patience=2, warmup_epochs=0)
    summary = run(prepared, tmp_path, recipe=recipe)
    assert (summary["best_epoch"], summary["epochs_run"]) == (best_epoch, epochs_run)
    assert summary["val_macro_f1"] == val_scores[best_epoch - 1]


def test_moving_average_is_the_kept_model(prepared, tmp_path):
    plain = run(prepared, tmp_path / "plain")
    averaged = run(prepared, tmp_path / "ema", recipe=replace(TINY_RECIPE, ema_decay=0.99))
    assert averaged["val_macro_f1"] >= 0 and plain["epochs_run"] == averaged["epochs_run"] == 1
    states = [load_file(tmp_path / kind / "model" / "model.safetensors")
              for kind in ("plain", "ema")]
    differing = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    assert differing, "the saved weights are the raw weights, not their moving average"
    with pytest.raises(ValueError, match="ema_decay"):
        replace(TINY_RECIPE, ema_decay=1.0)


def test_interrupted_run_leaves_previous_outputs(prepared, tmp_path, monkeypatch):
    run(prepared, tmp_path)
    before = (tmp_path / "model" / "model.safetensors").read_bytes()

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "fit_temperature", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(prepared, tmp_path)
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live", "model", "train.json"]


@pytest.mark.slow
def test_distributed_two_processes_on_cpu(prepared, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\n"
        "from pipeline.masks import MaskParams\nfrom pipeline.models import ModelConfig\n"
        "from pipeline.train import TrainConfig, train_model\n"
        f"data, out = Path({str(prepared)!r}), Path({str(tmp_path)!r})\n"
        f"train_model('tiny', ModelConfig(**{asdict(TINY_MODEL)!r}), "
        f"TrainConfig(**{asdict(TINY_RECIPE)!r}), MaskParams(), data / 'split', "
        "data / 'raw' / 'images', data / 'masks', out / 'model', out / 'train.json', "
        "out / 'live')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                             "2", "--master_port", "29517", str(script)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["train_images"] > 0
    _, checkpoint = load_checkpoint(tmp_path / "model" / "model.safetensors")
    single = run(prepared, tmp_path / "single")
    assert checkpoint["classes"] == json.loads(json.dumps(checkpoint["classes"]))
    assert {k: v.shape for k, v in checkpoint["state_dict"].items()} == {
        k: v.shape
        for k, v in load_file(tmp_path / "single" / "model" / "model.safetensors").items()}
    assert single["train_images"] == summary["train_images"]
    assert len(list(tmp_path.glob("model*"))) == 1  # written once, by rank 0
