"""A NaN is an error, never a result (issue 44 §4): a diverged training stops with one line and
writes nothing, neither a model nor metrics nor half of its DVCLive logs."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline import train as training
from pipeline.errors import USER_ERROR_EXIT, run_entry_point
from pipeline.io import OUTPUT_MARKER
from pipeline.masks import MaskParams
from pipeline.models import ModelConfig
from pipeline.train import TrainConfig, TrainingDiverged, stop_if_diverged, train_model

TINY_MODEL = ModelConfig("mobilenetv2_100", image_size=48, embed_dim=32, heads=2)
TINY_RECIPE = TrainConfig(epochs=1, batch_size=16, lr=1e-3, patience=3, mask_mode="crop",
                          ema_decay=0.0, backbone_lr_scale=0.1, mask_margin=0.25)


def _train(prepared: Path, out: Path, recipe: TrainConfig) -> dict:
    return train_model("tiny", TINY_MODEL, recipe, MaskParams(), prepared / "split",
                       prepared / "raw" / "images", prepared / "masks", out / "model",
                       out / "train.json", out / "live")


def test_a_huge_learning_rate_stops_with_one_line_and_keeps_the_previous_outputs(
        prepared, tmp_path, capsys):
    """``train.lr: 100000`` used to exit 0 with NaN weights, a NaN temperature and ``NaN`` in
    train.json. Now the run exits 2 with one line, and what an earlier run wrote (model,
    metrics, DVCLive logs) is left as it was, with nothing of the failed run beside it."""
    earlier = {"model/model.safetensors": b"earlier model", f"model/{OUTPUT_MARKER}": b"",
               "train.json": b"{}", "train_resources.json": b"{}",
               "live/metrics.json": b'{"step": 1}', f"live/{OUTPUT_MARKER}": b""}
    for name, data in earlier.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    recipe = replace(TINY_RECIPE, lr=1e5, ema_decay=0.99)
    assert run_entry_point(_train, prepared, tmp_path, recipe) == USER_ERROR_EXIT
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: tiny epoch 1: training diverged (") and "train.lr" in error
    after = {str(path.relative_to(tmp_path)): path.read_bytes()
             for path in tmp_path.rglob("*") if path.is_file()}
    assert after == earlier


def test_a_non_finite_temperature_is_refused():
    """Logits that are not finite fit no temperature: refused, not saved as NaN."""
    logits = torch.tensor([[1.0, math.nan], [0.5, 0.2]])
    fitted = SimpleNamespace(val=(logits, torch.tensor([0, 1])))
    run = SimpleNamespace(config=TINY_RECIPE)
    with pytest.raises(TrainingDiverged, match="^tiny temperature scaling: training diverged "
                                               r"\(temperature is nan\)"):
        training._temperature("tiny", run, fitted)
    assert training._temperature("tiny", SimpleNamespace(config=replace(
        TINY_RECIPE, temperature_scaling=False)), fitted) == 1.0


def _linear(weight: float) -> nn.Module:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(weight)
    return layer


@pytest.mark.parametrize(("scores", "weight", "problem"), [
    ({"train_loss": math.nan}, 0.5, "train_loss is nan"),
    ({"val_loss": math.inf}, 0.5, "val_loss is inf"),
    ({"train_loss": 0.7}, math.nan, "1 weight tensor(s) hold NaN or infinity"),
    ({"train_loss": 0.7}, -math.inf, "1 weight tensor(s) hold NaN or infinity"),
])
def test_a_non_finite_score_or_weight_is_divergence(scores, weight, problem):
    with pytest.raises(TrainingDiverged, match=rf"^tiny epoch 3: training diverged \(.*"
                                               rf"{problem.replace('(', '.').replace(')', '.')}"):
        stop_if_diverged("tiny epoch 3", TINY_RECIPE, scores, _linear(weight))


def test_finite_scores_and_weights_go_on():
    stop_if_diverged("tiny epoch 1", TINY_RECIPE, {"train_loss": 2.1, "train_accuracy": 0.1},
                     _linear(0.5), nn.BatchNorm2d(3))
