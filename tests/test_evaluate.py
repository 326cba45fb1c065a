"""Evaluation outputs, cross-dataset scoring, ensembles, the comparison table and prediction."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import predict as predict_module
from pipeline.cli import main as wbc
from pipeline.compare import compare
from pipeline.ensemble import combine_evaluations, member_weights, write_spec
from pipeline.evaluate import external_set, held_out_set, score_checkpoint, write_evaluation
from pipeline.io import read_json
from pipeline.masks import MaskParams
from pipeline.models import ModelConfig
from pipeline.train import TrainConfig, train_model

SETTINGS = {"batch_size": 16, "tta": False, "dataset": None, "ignore_unknown_classes": False,
            "mistakes": 6, "attention_per_class": 1}


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> dict[str, Path]:
    """Two tiny trained models (different mask modes) beside the prepared data."""
    out = tmp_path_factory.mktemp("models")
    paths = {}
    for name, mode in (("first", "crop"), ("second", "none")):
        train_model(name, ModelConfig("mobilenetv2_100", 48, embed_dim=32, heads=2),
                    TrainConfig(epochs=1, batch_size=16, lr=1e-3, mask_mode=mode), MaskParams(),
                    prepared / "split", prepared / "raw" / "images", prepared / "masks",
                    out / name, out / f"{name}.json", out / f"live-{name}")
        paths[name] = out / name / "model.pt"
    return paths


@pytest.fixture(scope="module")
def evaluated(prepared, trained, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    data = held_out_set(prepared / "split", prepared / "raw" / "images", prepared / "masks")
    for name, path in trained.items():
        scored = score_checkpoint(path, data, SETTINGS)
        write_evaluation(scored, root / "eval" / name, root / "metrics" / name / "eval.json",
                         SETTINGS)
    return root


def test_evaluation_outputs_are_well_formed(evaluated, prepared):
    folder = evaluated / "eval" / "first"
    test_rows = pd.read_csv(prepared / "split" / "test.csv")
    predictions = pd.read_csv(folder / "predictions.csv")
    assert len(predictions) == len(test_rows)
    probability_columns = [c for c in predictions if c.startswith("p_")]
    assert len(probability_columns) == 8
    assert np.allclose(predictions[probability_columns].sum(axis=1), 1, atol=1e-4)
    assert (predictions["predicted"] == predictions[probability_columns].idxmax(1).str[2:]).all()
    headline = read_json(evaluated / "metrics" / "first" / "eval.json")
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "cohen_kappa",
                "roc_auc_ovr", "ece", "ece_uncalibrated", "inference_images_per_second"):
        assert key in headline
    assert len(pd.read_csv(folder / "report.csv")) == 8
    assert len(list((folder / "roc").glob("*.csv"))) == 8
    for figure in ("confusion", "roc_pr", "reliability", "mistakes", "attention"):
        assert (folder / "figures" / f"{figure}.png").stat().st_size > 5_000


def test_cross_dataset_with_class_mismatch(trained, synthetic_folder, tmp_path):
    other = tmp_path / "other"
    for label in ("lymphocyte", "monocyte"):
        shutil.copytree(synthetic_folder / label, other / label.upper())
    (other / "SMUDGE").mkdir()
    shutil.copy(next((synthetic_folder / "platelet").iterdir()), other / "SMUDGE" / "x.jpg")
    with pytest.raises(ValueError, match="data has smudge"):
        score_checkpoint(trained["first"], external_set(other), SETTINGS)
    scored = score_checkpoint(trained["first"], external_set(other),
                              {**SETTINGS, "ignore_unknown_classes": True})
    assert set(scored["data"].labels) == {"lymphocyte", "monocyte"}
    assert wbc(["evaluate", str(trained["first"]), str(other), "-o", str(tmp_path / "r"),
                "--ignore-unknown"]) == 0
    assert read_json(tmp_path / "r" / "eval.json")["images"] == 20


def test_ensemble_and_compare(evaluated, prepared, tmp_path):
    weights = member_weights(["first", "second"], "val_f1", {"first": 0.3, "second": 0.1})
    assert weights == pytest.approx({"first": 0.75, "second": 0.25})
    data = held_out_set(prepared / "split", prepared / "raw" / "images", prepared / "masks")
    scored = combine_evaluations({n: evaluated / "eval" / n for n in weights}, weights, data)
    members = [np.load(evaluated / "eval" / n / "probabilities.npz")["calibrated"]
               for n in weights]
    assert np.allclose(scored["probabilities"], 0.75 * members[0] + 0.25 * members[1])
    write_evaluation(scored, evaluated / "eval" / "ensemble",
                     evaluated / "metrics" / "ensemble" / "eval.json", SETTINGS)
    table = compare(evaluated / "eval", {"references": {"original (PBC-1560)": 0.98}},
                    tmp_path / "summary.json", tmp_path / "reports")
    assert set(table["model"]) == {"first", "second", "ensemble"}
    report = (tmp_path / "reports" / "summary.md").read_text()
    assert "original (PBC-1560) (reference)" in report and "ensemble" in report
    assert "nan" not in report
    assert (tmp_path / "reports" / "summary.png").stat().st_size > 5_000
    assert set(read_json(tmp_path / "summary.json")) == {"first", "second", "ensemble"}
    with pytest.raises(ValueError, match="weighting"):
        member_weights(["first"], "median", {})


def test_ensemble_members_share_preprocessing(trained, synthetic_folder, tmp_path, monkeypatch):
    images = sorted((synthetic_folder / "lymphocyte").iterdir())[:2]
    passes = []
    real_prepare = predict_module.prepare_inputs

    def counting_prepare(files, prep, *args):
        passes.append(prep.mask_mode)
        return real_prepare(files, prep, *args)

    monkeypatch.setattr(predict_module, "prepare_inputs", counting_prepare)
    same = tmp_path / "same.json"
    write_spec(same, {"a": trained["first"], "b": trained["first"]}, {"a": 0.5, "b": 0.5})
    single = predict_module.predict(trained["first"], images)
    assert passes == ["crop"]
    assert predict_module.predict(same, images) == single  # same model twice: same answer
    assert passes == ["crop", "crop"]  # one read for both members
    mixed = tmp_path / "mixed.json"
    write_spec(mixed, trained, {"first": 0.5, "second": 0.5})
    predict_module.predict(mixed, images)
    assert passes[2:] == ["crop", "none"]


def test_predict_folder_with_corrupt_file(trained, synthetic_folder, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for image in sorted((synthetic_folder / "eosinophil").iterdir())[:3]:
        shutil.copy(image, folder / image.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    spec = tmp_path / "ensemble.json"
    write_spec(spec, trained, {"first": 0.5, "second": 0.5})
    rows = predict_module.predict(spec, [folder], top_k=2)
    assert len(rows) == 4
    broken = next(r for r in rows if r["path"].endswith("broken.jpg"))
    assert broken["error"] and "top1" not in broken
    good = [r for r in rows if not r["error"]]
    assert all(r["p1"] >= r["p2"] for r in good) and len(good) == 3
    out = tmp_path / "out.csv"
    assert wbc(["predict", str(trained["first"]), str(folder), "-o", str(out)]) == 0
    assert len(pd.read_csv(out)) == 4
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "notes.txt").write_text("hello")
    assert wbc(["predict", str(trained["first"]), str(only_bad)]) == 1
