"""An interrupted training run continues after its last finished epoch and ends where an
uninterrupted run ends; a saved state of any other run, or a damaged one, is never used."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import train as training
from pipeline.masks import MaskParams
from pipeline.models import ModelConfig
from pipeline.train import TrainConfig, train_model

MODEL = ModelConfig("mobilenetv2_100", image_size=48, embed_dim=32, heads=2)
# moving average, mask guidance and a warmup: every piece of state an epoch hands to the next
TRAIN_ONE_EPOCH = training.train_one_epoch
RECIPE = TrainConfig(epochs=3, batch_size=16, lr=1e-3, patience=3, ema_decay=0.99,
                     mask_guidance=0.3, warmup_epochs=1, backbone_lr_scale=0.1, resume_every_s=0)


def train(prepared: Path, out: Path, recipe: TrainConfig = RECIPE) -> dict:
    return train_model("tiny", MODEL, recipe, MaskParams(), prepared / "split",
                       prepared / "raw" / "images", prepared / "masks", out / "model",
                       out / "train.json", out / "live", resume_path=out / "resume" / "state.pt")


class Interrupted(BaseException):
    """Stands for Ctrl-C or a killed job: not an ``Exception``, so nothing on the way catches
    it (pytest treats a real KeyboardInterrupt as the end of the test session)."""


def count_epochs(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Record the epochs trained (from 0); raise ``Interrupted`` as epoch ``fail_at`` starts."""
    trained: list[int] = []

    def counted(*args, **kwargs):
        epoch = args[7]
        if epoch == fail_at:
            raise Interrupted
        trained.append(epoch)
        return TRAIN_ONE_EPOCH(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", counted)
    return trained


def outputs(out: Path) -> tuple[dict[str, torch.Tensor], dict, list[float]]:
    """The saved weights, the training record (times aside) and the logged validation losses."""
    record = json.loads((out / "train.json").read_text())
    losses = (out / "live" / "plots" / "metrics" / "val" / "loss.tsv").read_text().split("\n")
    return load_file(out / "model" / "model.safetensors"), record, losses[1:]


def test_an_interrupted_run_resumes_and_ends_as_an_uninterrupted_one(prepared, tmp_path,
                                                                     monkeypatch):
    train(prepared, tmp_path / "whole")
    trained = count_epochs(monkeypatch, fail_at=2)
    with pytest.raises(Interrupted):
        train(prepared, tmp_path / "parts")
    assert trained == [0, 1] and (tmp_path / "parts" / "resume" / "state.pt").is_file()
    assert not (tmp_path / "parts" / "model").exists()
    trained = count_epochs(monkeypatch)
    train(prepared, tmp_path / "parts")
    assert trained == [2], "the resumed run trained again what was already trained"
    whole, parts = outputs(tmp_path / "whole"), outputs(tmp_path / "parts")
    assert all(torch.equal(whole[0][key], parts[0][key]) for key in whole[0])
    assert whole[1] == parts[1] and whole[2] == parts[2]
    assert not (tmp_path / "parts" / "resume" / "state.pt").exists(), "state left behind"


@pytest.mark.parametrize("change", ["other params", "damaged file", "resume off"])
def test_a_state_of_another_run_is_never_used(prepared, tmp_path, monkeypatch, change):
    trained = count_epochs(monkeypatch, fail_at=2)
    with pytest.raises(Interrupted):
        train(prepared, tmp_path)
    state = tmp_path / "resume" / "state.pt"
    recipe = RECIPE
    if change == "other params":
        recipe = replace(RECIPE, lr=2e-3)
    elif change == "damaged file":
        state.write_bytes(state.read_bytes()[:1000])
    else:
        recipe = replace(RECIPE, resume=False)
    trained = count_epochs(monkeypatch)
    summary = train(prepared, tmp_path, recipe)
    assert trained == [0, 1, 2] and summary["epochs_run"] == 3
    assert state.exists() == (change == "resume off"), "resume off must not touch the state"


def test_a_run_that_had_stopped_early_does_not_train_again(prepared, tmp_path, monkeypatch):
    scores = iter([0.5, 0.4, 0.4, 0.9])
    monkeypatch.setattr(training, "macro_f1", lambda *_args: next(scores))
    monkeypatch.setattr(training, "fit_temperature", lambda *_args: (_ for _ in ()).throw(
        Interrupted))  # interrupted after the early stop, before the model is written
    recipe = replace(RECIPE, epochs=4, patience=2)
    with pytest.raises(Interrupted):
        train(prepared, tmp_path, recipe)
    monkeypatch.undo()
    trained = count_epochs(monkeypatch)
    summary = train(prepared, tmp_path, recipe)
    assert trained == [] and (summary["best_epoch"], summary["epochs_run"]) == (1, 3)


def test_the_state_waits_for_its_interval(prepared, tmp_path, monkeypatch):
    """``resume_every_s``: no save before that long has passed (the default run's epochs take
    seconds; a save of Xception's state takes most of one)."""
    count_epochs(monkeypatch, fail_at=2)
    with pytest.raises(Interrupted):
        train(prepared, tmp_path, replace(RECIPE, resume_every_s=3600))
    assert not (tmp_path / "resume" / "state.pt").exists()
