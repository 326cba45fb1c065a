"""Evaluation outputs, cross-dataset scoring, ensembles, the comparison table and prediction."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import plots
from pipeline import predict as predict_module
from pipeline.cli import main as wbc
from pipeline.compare import CompareConfig, compare
from pipeline.ensemble import (
    EnsembleConfig,
    combine_evaluations,
    evaluate_ensemble_external,
    member_weights,
    temper,
)
from pipeline.errors import InputError, PipelineError
from pipeline.evaluate import (
    EvalSet,
    EvaluateConfig,
    evaluate_external,
    external_set,
    held_out_set,
    score_checkpoint,
    write_evaluation,
)
from pipeline.io import read_json, read_split, write_json
from pipeline.masks import MaskParams
from pipeline.metrics import expected_calibration_error
from pipeline.model_files import read_spec, write_fold_average, write_spec
from pipeline.models import ModelConfig, load_checkpoint, save_checkpoint
from pipeline.sources.synthetic import Lab, render_example
from pipeline.train import TrainConfig, train_model

SETTINGS = EvaluateConfig(batch_size=16, tta=False, dataset=None, ignore_unknown_classes=False,
                          mistakes=6, abstain_target_accuracy=None)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> dict[str, Path]:
    """Two small trained models (different mask modes) beside the prepared data: ImageNet
    EfficientNet-Lite0 (offline, from its PyPI package) fine-tuned long enough to learn."""
    out = tmp_path_factory.mktemp("models")
    paths = {}
    for name, mode in (("first", "crop"), ("second", "none")):
        train_model(name, ModelConfig("efficientnet_lite0", 64, pretrained=True, embed_dim=32,
                                      heads=2),
                    TrainConfig(epochs=4, batch_size=16, lr=3e-3, backbone_lr_scale=0.5,
                                warmup_epochs=0, mask_mode=mode, patience=5, ema_decay=0.0,
                                mask_margin=0.25), MaskParams(),
                    prepared / "split", prepared / "raw" / "images", prepared / "masks",
                    out / name, out / f"{name}.json", out / f"live-{name}")
        paths[name] = out / name / "model.safetensors"
    return paths


@pytest.fixture(scope="module")
def evaluated(prepared, trained, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    folders = (prepared / "split", prepared / "raw" / "images", prepared / "masks")
    data, validation = held_out_set(*folders), held_out_set(*folders, part="val")
    for name, path in trained.items():
        scored = score_checkpoint(path, data, SETTINGS, validation)
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
                "roc_auc_ovr", "ece"):
        assert key in headline
    assert "inference_images_per_second" not in headline  # a timing, not a metric
    resources = read_json(evaluated / "metrics" / "first" / "eval_record.json")
    assert resources["inference_images_per_second"] > 0 and resources["device"] == "cpu"
    assert "ece_uncalibrated" in resources  # recorded, not compared
    assert len(pd.read_csv(folder / "report.csv")) == 8
    for curve, columns in (("roc", ["class", "fpr", "tpr"]),
                           ("precision_recall", ["class", "recall", "precision"])):
        points = pd.read_csv(folder / f"{curve}.csv")  # one plot per model, classes as series
        assert list(points.columns) == columns and points["class"].nunique() == 8
    scores = predictions[["attention_in_cell", "gradcam_in_cell", "cell_area"]]
    assert predictions[["attention_in_cell", "cell_area"]].notna().all().all()
    assert predictions["gradcam_in_cell"].notna().any()  # NaN only where Grad-CAM is all zero
    assert ((scores.fillna(0) >= 0) & (scores.fillna(0) <= 1)).all().all()
    assert resources["cell_area"] == pytest.approx(scores["cell_area"].mean())
    for figure in ("confusion", "roc_pr", "reliability", "mistakes", "explain"):
        assert (folder / "figures" / f"{figure}.png").stat().st_size > 5_000


def test_cross_dataset_with_class_mismatch(trained, unseen_folder, tmp_path):
    other = tmp_path / "other"
    for label in ("lymphocyte", "monocyte"):
        shutil.copytree(unseen_folder / label, other / label.upper())
    (other / "SMUDGE").mkdir()
    shutil.copy(next((unseen_folder / "platelet").iterdir()), other / "SMUDGE" / "x.jpg")
    with pytest.raises(ValueError, match="data has smudge"):
        score_checkpoint(trained["first"], external_set(other), SETTINGS)
    scored = score_checkpoint(trained["first"], external_set(other),
                              replace(SETTINGS, ignore_unknown_classes=True))
    assert set(scored.data.labels) == {"lymphocyte", "monocyte"}
    assert wbc(["evaluate", str(trained["first"]), str(other), "-o", str(tmp_path / "r"),
                "--ignore-unknown"]) == 0
    assert read_json(tmp_path / "r" / "eval_record.json")["images"] == 20
    restricted = cv2.imread(str(tmp_path / "r" / "figures" / "confusion_restricted.png"))
    full = cv2.imread(str(tmp_path / "r" / "figures" / "confusion.png"))
    assert restricted.shape[0] < full.shape[0]  # 2 rows, not the model's 8


def test_ensemble_and_compare(evaluated, prepared, tmp_path):
    weights = member_weights(EnsembleConfig(["first", "second"], "val_f1"),
                             {"first": 0.3, "second": 0.1})
    assert weights == pytest.approx({"first": 0.75, "second": 0.25})
    folders = (prepared / "split", prepared / "raw" / "images", prepared / "masks")
    data, validation = held_out_set(*folders), held_out_set(*folders, part="val")
    eval_dirs = {n: evaluated / "eval" / n for n in weights}
    plain = combine_evaluations(eval_dirs, weights, data)
    members = [np.load(folder / "probabilities.npz") for folder in eval_dirs.values()]
    assert plain.temperature == 1.0
    assert np.allclose(plain.probabilities, 0.75 * members[0]["calibrated"]
                       + 0.25 * members[1]["calibrated"])
    scored = combine_evaluations(eval_dirs, weights, data, validation)
    val_average = 0.75 * members[0]["val_calibrated"] + 0.25 * members[1]["val_calibrated"]
    index = {label: i for i, label in enumerate(scored.classes)}
    val_labels = np.array([index[label] for label in validation.labels])

    def val_nll(temperature: float) -> float:
        tempered = temper(val_average, temperature)
        return -np.log(tempered[np.arange(len(val_labels)), val_labels]).mean()

    assert val_nll(1.0) < np.log(len(scored.classes)) - 0.1  # members learned: not uniform
    fitted = scored.temperature
    assert val_nll(fitted) <= min(val_nll(fitted * 1.25), val_nll(fitted / 1.25), val_nll(1.0))
    assert (scored.probabilities.argmax(1) == plain.probabilities.argmax(1)).all()
    with pytest.raises(ValueError, match="validation images"):
        combine_evaluations(eval_dirs, weights, data, held_out_set(*folders, part="train"))
    write_evaluation(scored, evaluated / "eval" / "ensemble",
                     evaluated / "metrics" / "ensemble" / "eval.json", SETTINGS)
    seen = max(read_json(evaluated / "eval" / name / "summary.json")["unseen_check"]["images_seen"]
               for name in weights)
    assert ("- test: none of its files is among any of its 2 members trained or validated on "
            f"(up to {seen} each); near-duplicates of a member's, at most: 0 (pHash within 4 "
            "bits)\n") in (evaluated / "eval" / "ensemble" / "MODEL_CARD.md").read_text()
    references = CompareConfig({"original (PBC-1560)": 0.98})
    pbc = {"source": "/data/pbc-1560", "images": 1560, "classes": list(range(8))}
    table = compare(evaluated / "eval", references, tmp_path / "summary.json",
                    tmp_path / "reports", pbc)
    assert set(table["model"]) == {"first", "second", "ensemble"}
    report = (tmp_path / "reports" / "summary.md").read_text()
    assert report.startswith("# Model comparison on /data/pbc-1560: 1560 images, 8 classes")
    assert "original (PBC-1560) (reference)" in report and "ensemble" in report
    assert "nan" not in report and "_ci95" not in report  # the chart's intervals stay numbers
    assert "Trained from random initialisation" not in report  # both members are pretrained
    header = next(line for line in report.splitlines() if line.startswith("| model"))
    assert "accuracy 95% CI" in header and "macro-F1 95% CI" in header
    first = read_json(evaluated / "metrics" / "first" / "eval_record.json")
    assert f"[{first['macro_f1_ci95_low']:.3f}, {first['macro_f1_ci95_high']:.3f}]" in report
    synthetic = {"source": "synthetic", "seed": 0, "images": 80, "classes": list(range(8))}
    compare(evaluated / "eval", references, tmp_path / "summary.json", tmp_path / "reports",
            synthetic)
    report = (tmp_path / "reports" / "summary.md").read_text()
    assert report.startswith("# Model comparison on synthetic (generated, seed 0): 80 images")
    assert "(reference)" not in report and "this run's data is not PBC" in report
    assert (tmp_path / "reports" / "summary.png").stat().st_size > 5_000
    summary = read_json(tmp_path / "summary.json")
    assert set(summary) == {"first", "second", "ensemble"}
    assert "NaN" not in (tmp_path / "summary.json").read_text()  # no map: no key, not NaN
    assert summary["first"]["attention_in_cell"] >= 0 and "attention_in_cell" not in \
        summary["ensemble"]
    with pytest.raises(ValueError, match="weighting"):
        EnsembleConfig(["first"], "median")
    with pytest.raises(ValueError, match="members is empty"):
        EnsembleConfig([])


def _fake_member(folder: Path, test: np.ndarray, val: np.ndarray, data: EvalSet,
                 validation: EvalSet, classes: list[str], refit: bool = False) -> Path:
    """An evaluation folder as the evaluate stage writes it, with given probabilities (none on
    validation for a model that trained on it: ``refit``)."""
    folder.mkdir(parents=True)
    np.savez(folder / "probabilities.npz", calibrated=test, uncalibrated=test,
             classes=np.array(classes), names=np.array(data.names),
             val_calibrated=val[:0] if refit else val,
             val_names=np.array([] if refit else validation.names))
    write_json(folder / "summary.json", {
        "metrics": {"inference_images_per_second": 100.0, "device": "cpu"},
        "training": {"parameters": 1, "train_seconds": 1.0} | (
            {"refit_on_val": True} if refit else {})})
    return folder


def test_summary_chart_draws_each_bar_with_its_interval(tmp_path, monkeypatch):
    """Whiskers span each bar's bootstrap interval as computed (a macro-F1 interval need not hold
    its value); a bar without one gets none."""
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.setdefault("figure", fig))
    plots.bar_chart_png(["a", "b"], {"accuracy": [0.9, 0.5], "macro-F1": [0.8, 0.4]}, "t",
                        tmp_path / "chart.png", intervals={"accuracy": [(0.85, 0.95), None],
                                                           "macro-F1": [(0.82, 0.9), (0.3, 0.45)]})
    axes = drawn["figure"].axes[0]
    whiskers = sorted((round(low[0], 6), round(low[1], 6), round(high[1], 6))
                      for collection in axes.collections
                      for low, high in collection.get_segments())
    assert whiskers == [(0.0, 0.85, 0.95), (0.4, 0.82, 0.9), (1.4, 0.3, 0.45)]
    assert [round(bar.get_height(), 6) for bar in axes.patches] == [0.9, 0.5, 0.8, 0.4]


def test_ensemble_temperature_sharpens_disagreeing_members(tmp_path):
    """Two members, each right 90% of the time with confidence 0.9, wrong on different images:
    where they agree (80% of the images) their average is always right yet says 0.9, so the
    ensemble is under-confident. The temperature fitted on validation sharpens it."""
    classes, rng = ["a", "b", "c"], np.random.default_rng(0)

    def part(n: int, name: str) -> tuple[EvalSet, np.ndarray, np.ndarray]:
        labels = rng.integers(0, 3, n)
        members = []
        for wrong in (np.arange(n) % 10 == 0, np.arange(n) % 10 == 5):
            answer = np.where(wrong, (labels + 1) % 3, labels)
            probabilities = np.full((n, 3), 0.05)
            probabilities[np.arange(n), answer] = 0.9
            members.append(probabilities)
        names = [f"{name}{i}.png" for i in range(n)]
        return EvalSet([Path(x) for x in names], [classes[i] for i in labels], names), *members

    data, test_a, test_b = part(400, "test")
    validation, val_a, val_b = part(400, "val")
    eval_dirs = {"a": _fake_member(tmp_path / "a", test_a, val_a, data, validation, classes),
                 "b": _fake_member(tmp_path / "b", test_b, val_b, data, validation, classes)}
    weights = {"a": 0.5, "b": 0.5}
    labels = np.array([classes.index(label) for label in data.labels])
    plain = combine_evaluations(eval_dirs, weights, data)
    scored = combine_evaluations(eval_dirs, weights, data, validation)
    assert scored.temperature < 0.8
    assert (expected_calibration_error(scored.probabilities, labels)
            < expected_calibration_error(plain.probabilities, labels) / 2)
    # a member that trained on the validation images leaves nothing honest to fit on
    eval_dirs["b"] = _fake_member(tmp_path / "b-refit", test_b, val_b, data, validation, classes,
                                  refit=True)
    kept = combine_evaluations(eval_dirs, weights, data, validation)
    assert kept.temperature == 1.0 and kept.validation is None
    assert np.allclose(kept.probabilities, plain.probabilities)


def test_refit_model_fits_nothing_on_validation(trained, prepared, tmp_path):
    """A model refit on train + val (train.refit) is scored as usual, but its validation
    images, trained on, choose no abstention threshold."""
    model, checkpoint = load_checkpoint(trained["first"])
    checkpoint["summary"] |= {"refit_on_val": True}
    refit_path = tmp_path / "model.safetensors"
    save_checkpoint(checkpoint | {"state_dict": model.state_dict()}, refit_path)
    folders = (prepared / "split", prepared / "raw" / "images", prepared / "masks")
    data, validation = held_out_set(*folders), held_out_set(*folders, part="val")
    settings = replace(SETTINGS, abstain_target_accuracy=0.9)
    scored = {name: score_checkpoint(path, data, settings, validation)
              for name, path in (("plain", trained["first"]), ("refit", refit_path))}
    assert scored["plain"].validation is not None and scored["refit"].validation is None
    assert np.array_equal(scored["refit"].probabilities, scored["plain"].probabilities)
    write_evaluation(scored["refit"], tmp_path / "eval", tmp_path / "eval.json", settings)
    assert read_json(tmp_path / "eval" / "summary.json")["abstention"] is None
    assert "abstain_threshold" not in read_json(tmp_path / "eval.json")
    assert len(np.load(tmp_path / "eval" / "probabilities.npz")["val_names"]) == 0


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
    sharper = tmp_path / "sharper.json"
    write_spec(sharper, {"a": trained["first"]}, {"a": 1.0}, temperature=0.5)
    tempered = predict_module.predict(sharper, images)
    assert [row["top1"] for row in tempered] == [row["top1"] for row in single]
    assert all(t["p1"] > s["p1"] for t, s in zip(tempered, single, strict=True))
    mixed = tmp_path / "mixed.json"
    write_spec(mixed, trained, {"first": 0.5, "second": 0.5})
    predict_module.predict(mixed, images)
    assert passes[3:] == ["crop", "none"]


def _probability_table(rows: list[dict], classes: list[str]) -> np.ndarray:
    """Every class's probability per row of ``predict(..., top_k=len(classes))``."""
    ranked = [{row[f"top{rank}"]: row[f"p{rank}"] for rank in range(1, len(classes) + 1)}
              for row in rows]
    return np.array([[probabilities[c] for c in classes] for probabilities in ranked])


def test_ensemble_of_ensembles_tempers_each_level(trained, unseen_folder, tmp_path):
    images = [sorted((unseen_folder / c).iterdir())[0] for c in ("monocyte", "neutrophil")]
    classes = load_checkpoint(trained["first"])[1]["classes"]
    first, second = (_probability_table(predict_module.predict(trained[m], images, top_k=8),
                                        classes) for m in ("first", "second"))
    inner, outer = tmp_path / "folds" / "0" / "ensemble.json", tmp_path / "ensemble.json"
    write_spec(inner, trained, {"first": 3.0, "second": 1.0}, temperature=0.5)
    write_spec(outer, {"fold0": inner, "again": trained["second"]}, {"fold0": 1.0, "again": 1.0},
               temperature=2.0)

    def temper(p: np.ndarray, t: float) -> np.ndarray:
        return torch.softmax(torch.from_numpy(np.log(p)) / t, 1).numpy()

    expected = temper((temper(0.75 * first + 0.25 * second, 0.5) + second) / 2, 2.0)
    nested = _probability_table(predict_module.predict(outer, images, top_k=8), classes)
    np.testing.assert_allclose(nested, expected, atol=1e-4)
    flat = temper((0.75 * first + 0.25 * second) / 2 + second / 2, 2.0)  # inner T ignored
    assert np.abs(nested - flat).max() > 1e-2
    tree = predict_module.resolve_model(outer)
    assert tree.checkpoints() == [trained["first"].resolve(), trained["second"].resolve()]
    assert [share for _, share in tree.leaves()] == [0.375, 0.125, 0.5]
    labelled = tmp_path / "labelled"
    for label in ("monocyte", "neutrophil"):
        shutil.copytree(unseen_folder / label, labelled / label)
    assert wbc(["evaluate", str(outer), str(labelled), "-o", str(tmp_path / "report")]) == 0
    assert "gradcam_in_cell" not in read_json(tmp_path / "report" / "eval.json")  # no member's
    assert ("- test: none of its files is among any of its 2 members trained or validated on"
            in (tmp_path / "report" / "MODEL_CARD.md").read_text())  # each member checked
    evaluated = pd.read_csv(tmp_path / "report" / "predictions.csv")
    served = _probability_table(predict_module.predict(
        outer, [labelled / p for p in evaluated["path"]], top_k=8), classes)
    np.testing.assert_allclose(evaluated[[f"p_{c}" for c in classes]].to_numpy(), served,
                               atol=1e-5)


def test_fold_average_weighs_each_fold_equally(trained, tmp_path):
    inner = tmp_path / "0" / "ensemble.json"
    write_spec(inner, trained, {"first": 3.0, "second": 1.0}, temperature=0.5)
    write_fold_average(tmp_path / "ensemble.json", [inner, trained["second"]])
    spec = read_spec(tmp_path / "ensemble.json")
    assert [m["name"] for m in spec["members"]] == ["fold0", "fold1"]
    assert spec["temperature"] == 1.0
    tree = predict_module.resolve_model(tmp_path / "ensemble.json")
    assert [share for _, share in tree.members] == [0.5, 0.5]
    assert [share for _, share in tree.leaves()] == [0.375, 0.125, 0.5]
    with pytest.raises(PipelineError, match="no fold models"):
        write_fold_average(tmp_path / "empty.json", [])
    assert not (tmp_path / "empty.json").exists()


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
    assert wbc(["predict", str(trained["first"]), str(only_bad)]) == 2  # no image file at all


def test_stage_settings_are_validated():
    with pytest.raises(ValueError, match="evaluate.batch_size"):
        EvaluateConfig(batch_size=0)
    with pytest.raises(ValueError, match="abstain_target_accuracy"):
        EvaluateConfig(abstain_target_accuracy=1.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tta_views'"):
        EvaluateConfig(tta_views=8)
    assert EvaluateConfig(external=["a", "b"]).external == ("a", "b")
    assert EvaluateConfig(external="../pbc-external").external == ("../pbc-external",)  # not chars
    for adapt in (["TEST"], "TEST", {"TEST": 3}):
        with pytest.raises(ValueError, match="evaluate.adapt maps external set names to folders"):
            EvaluateConfig(adapt=adapt)
    with pytest.raises(ValueError, match="compare.references: 'x' must be an accuracy"):
        CompareConfig({"x": 98})


def test_restricted_scores_renormalise_over_the_classes_present():
    from pipeline.metrics import restricted_predictions, restricted_to_present

    probabilities = np.array([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6]])
    labels = np.array([1, 2, 2])  # class 0 never occurs: its mass is taken away
    restricted, present = restricted_to_present(labels, probabilities)
    assert present.tolist() == [False, True, True]
    np.testing.assert_allclose(restricted, [[0, 0.75, 0.25], [0, 0.2, 0.8], [0, 0.25, 0.75]])
    assert (restricted.argmax(1) == labels).all() and (probabilities.argmax(1) != labels).any()
    assert restricted_predictions(labels, probabilities).tolist() == [1, 2, 2]
    # all the mass on an absent class: the answer is still one of the classes present
    assert restricted_predictions(labels, np.array([[1.0, 0.0, 0.0]] * 3)).tolist() == [1, 1, 1]


def test_external_sets_scored_beside_the_test_split(trained, unseen_folder, tmp_path):
    other = tmp_path / "lab-b"
    for label in ("lymphocyte", "monocyte"):
        shutil.copytree(unseen_folder / label, other / label.upper())
    results = evaluate_external(trained["first"], [str(other)], SETTINGS, tmp_path / "external")
    metrics = results["lab-b"]["metrics"]
    assert metrics["images"] == 20 and metrics["absent_classes"]
    assert metrics["restricted_accuracy"] >= metrics["accuracy"]
    assert metrics["accuracy_ci95_low"] <= metrics["accuracy"] <= metrics["accuracy_ci95_high"]
    assert read_json(tmp_path / "external" / "index.json") == {"lab-b": str(other)}
    assert (tmp_path / "external" / "lab-b" / "predictions.csv").is_file()
    with pytest.raises(PipelineError, match="two external sets are named 'lab-b'"):
        evaluate_external(trained["first"], [str(other), str(other)], SETTINGS,
                          tmp_path / "external")
    assert (tmp_path / "external" / "lab-b").is_dir()  # the failed run left the old result


def test_images_a_model_has_seen_are_not_scored(trained, prepared, tmp_path, capsys, caplog):
    """The checkpoint records its train and validation images (digests and the split's pHash);
    a set holding one of those files (renamed) is refused in one line, by the stage function
    and by ``wbc evaluate``, and nothing is written; a re-encoded copy is scored, counted and
    warned about; the model card says what was checked; a model without the record is scored
    with a warning, one with a malformed record is refused."""
    split = {part: read_split(prepared / "split", part) for part in ("train", "val", "test")}
    checkpoint = load_checkpoint(trained["first"])[1]
    seen = pd.concat([split["train"], split["val"]])
    assert checkpoint["trained_on"] == sorted({digest[:16] for digest in seen["sha256"]})
    assert checkpoint["trained_on_phash"] == sorted(set(seen["phash"]))
    assert not set(checkpoint["trained_on"]) & {d[:16] for d in split["test"]["sha256"]}
    lab = tmp_path / "lab-b"
    for row in split["test"].itertuples():
        (lab / row.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(prepared / "raw" / "images" / row.path, lab / row.label)
    trained_image = split["train"].iloc[0]
    cv2.imwrite(str(lab / trained_image.label / "reencoded.png"),
                cv2.imread(str(prepared / "raw" / "images" / trained_image.path)))
    with caplog.at_level("WARNING", logger="pipeline.leakage"):
        external = evaluate_external(trained["first"], [str(lab)], SETTINGS, tmp_path / "ext")
    assert "1 of the" in caplog.text and "reencoded.png) are near-duplicates" in caplog.text
    check = {"images_seen": len(checkpoint["trained_on"]), "near_duplicates": 1,
             "near_duplicate_bits": 4}
    assert external["lab-b"]["unseen_check"] == check
    assert external["lab-b"]["metrics"]["near_duplicates_of_training"] == 1
    folders = (prepared / "split", prepared / "raw" / "images", prepared / "masks")
    write_evaluation(score_checkpoint(trained["first"], held_out_set(*folders), SETTINGS),
                     tmp_path / "eval", tmp_path / "eval.json", SETTINGS, external=external)
    card = (tmp_path / "eval" / "MODEL_CARD.md").read_text()
    among = (f"none of its files is among the {check['images_seen']} the model trained or "
             f"validated on")
    assert f"- test: {among}; near-duplicates of them: 0 (pHash within 4 bits)\n" in card
    assert f"- external: lab-b: {among}; near-duplicates of them: 1 (pHash within 4 bits)\n" in card

    validated = split["val"].iloc[0]
    shutil.copy(prepared / "raw" / "images" / validated.path,
                lab / validated.label / "renamed.jpg")
    with pytest.raises(InputError, match=r"renamed\.jpg of the \d+ images to score are "
                                         r"byte-identical to images .* trained or validated on"):
        evaluate_external(trained["first"], [str(lab)], SETTINGS, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert wbc(["evaluate", str(trained["first"]), str(lab), "-o", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err.strip()
    assert "byte-identical" in error and "\n" not in error and not (tmp_path / "r").exists()

    listed = tmp_path / "listed"  # a manifest.csv may name a pipe: skipped, not a hang
    (listed / "images").mkdir(parents=True)
    tested = split["test"].iloc[:2]
    for row in tested.itertuples():
        shutil.copy(prepared / "raw" / "images" / row.path, listed / "images")
    os.mkfifo(listed / "images" / "pipe.jpg")
    names = [Path(path).name for path in tested["path"]]
    manifest = pd.DataFrame({"path": [*names, "pipe.jpg"], "label": [*tested["label"], "ig"]})
    manifest.to_csv(listed / "manifest.csv", index=False)
    piped = score_checkpoint(trained["first"], external_set(listed / "manifest.csv"), SETTINGS)
    assert piped.skipped_unreadable == 1 and piped.unseen_check["near_duplicates"] == 0
    manifest.iloc[1:].to_csv(listed / "manifest.csv", index=False)  # one image left to score
    assert wbc(["evaluate", str(trained["first"]), str(listed / "manifest.csv"), "-o",
                str(tmp_path / "one")]) == 2
    error = capsys.readouterr().err.strip()
    assert "only 1 of the 2 images to score could be read" in error and "\n" not in error

    bare, malformed = tmp_path / "bare.safetensors", tmp_path / "malformed.safetensors"
    save_checkpoint({k: v for k, v in checkpoint.items() if not k.startswith("trained_on")}, bare)
    with caplog.at_level("WARNING", logger="pipeline.leakage"):
        assert score_checkpoint(bare, external_set(lab), SETTINGS).unseen_check is None
    assert "does not record the images it was trained on" in caplog.text
    save_checkpoint({**checkpoint, "trained_on_phash": ["not a hash"]}, malformed)
    with pytest.raises(InputError, match="trained_on_phash record is not a list of 16-character"):
        score_checkpoint(malformed, external_set(lab), SETTINGS)


def test_ensemble_scored_on_its_members_external_sets(trained, unseen_folder, tmp_path):
    """The ensemble stage's external figures average what the members' evaluate stages saved
    for the set, tempered by the ensemble's temperature, over the images they could read."""
    other = tmp_path / "lab-b"
    for label in ("lymphocyte", "monocyte"):
        shutil.copytree(unseen_folder / label, other / label.upper())
    (other / "MONOCYTE" / "broken.jpg").write_bytes(b"not an image")
    weights, settings = {"first": 0.75, "second": 0.25}, replace(SETTINGS, external=(str(other),))
    for name in weights:
        evaluate_external(trained[name], [str(other)], SETTINGS, tmp_path / name / "external")
    results = evaluate_ensemble_external(tmp_path, weights, 1.5, settings, tmp_path / "ensemble")
    metrics = results["lab-b"]["metrics"]
    assert metrics["images"] == 20 and metrics["skipped_unreadable"] == 1
    saved = [np.load(tmp_path / m / "external" / "lab-b" / "probabilities.npz") for m in weights]
    expected = temper(0.75 * saved[0]["calibrated"] + 0.25 * saved[1]["calibrated"], 1.5)
    ensemble = np.load(tmp_path / "ensemble" / "lab-b" / "probabilities.npz")
    np.testing.assert_allclose(ensemble["calibrated"], expected, rtol=1e-5, atol=1e-7)
    predictions = pd.read_csv(tmp_path / "ensemble" / "lab-b" / "predictions.csv")
    classes = list(saved[0]["classes"])
    assert metrics["accuracy"] == pytest.approx(
        (predictions["label"] == [classes[i] for i in expected.argmax(1)]).mean())
    shutil.rmtree(tmp_path / "second" / "external" / "lab-b")
    with pytest.raises(PipelineError, match="member second has no evaluation"):
        evaluate_ensemble_external(tmp_path, weights, 1.5, settings, tmp_path / "ensemble")
    assert (tmp_path / "ensemble" / "lab-b" / "predictions.csv").is_file()  # left as it was


def _stained_lab(folder: Path, first: int, per_class: int, labelled: bool) -> Path:
    """JPEGs of lymphocytes and monocytes from a lab with BCCD's weaker stain, in class
    folders (``labelled``) or all in one folder."""
    lab = Lab(tint=(1.3, 1.0, 0.65), stain_strength=0.6)
    for label in ("lymphocyte", "monocyte"):
        target = folder / label.upper() if labelled else folder
        target.mkdir(parents=True, exist_ok=True)
        for index in range(first, first + per_class):
            rgb, _ = render_example(label, index, seed=3, lab=lab)
            cv2.imwrite(str(target / f"{label}_{index}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return folder


def test_an_external_set_is_scored_again_after_adaptation(trained, tmp_path):
    other = _stained_lab(tmp_path / "lab-b", 0, 6, labelled=True)
    unlabelled = _stained_lab(tmp_path / "lab-b-slides", 100, 17, labelled=False)
    settings = replace(SETTINGS, adapt={"lab-b": str(unlabelled)})
    results = evaluate_external(trained["first"], [str(other)], settings, tmp_path / "external")
    assert list(results) == ["lab-b", "lab-b-adapted"]
    plain, adapted = (results[name]["metrics"] for name in results)
    assert adapted["adaptation_images"] == 34 and "adaptation_images" not in plain
    assert adapted["images"] == plain["images"] == 12
    assert results["lab-b-adapted"]["adapted_on"] == {"folder": str(unlabelled), "images": 34}
    card = (tmp_path / "external" / "lab-b-adapted" / "MODEL_CARD.md").read_text()
    assert f"adapted (`wbc adapt`, no labels) on 34 images of `{unlabelled}`" in card
    assert "adapted" not in (tmp_path / "external" / "lab-b" / "MODEL_CARD.md").read_text()
    probabilities = [np.load(tmp_path / "external" / name / "probabilities.npz")["calibrated"]
                     for name in results]
    assert np.abs(probabilities[0] - probabilities[1]).max() > 1e-3  # other statistics
    assert read_json(tmp_path / "external" / "index.json") == {"lab-b": str(other),
                                                               "lab-b-adapted": str(other)}
    with pytest.raises(PipelineError, match="no-such-folder: not a folder of images"):
        evaluate_external(trained["first"], [str(other)],
                          replace(SETTINGS, adapt={"lab-b": str(tmp_path / "no-such-folder")}),
                          tmp_path / "external")
    assert (tmp_path / "external" / "lab-b-adapted").is_dir()  # the failed run left the old one
    with pytest.raises(PipelineError, match="evaluate.adapt names lab-c, not an external set"):
        evaluate_external(trained["first"], [str(other)],
                          replace(SETTINGS, adapt={"lab-c": str(unlabelled)}), tmp_path / "x")


def test_wbc_adapt_writes_a_model_adapted_to_a_folder(trained, tmp_path, capsys):
    slides = _stained_lab(tmp_path / "slides", 0, 17, labelled=False)
    out = tmp_path / "adapted.safetensors"
    assert wbc(["adapt", str(trained["first"]), str(slides), "-o", str(out)]) == 0
    original, before = load_checkpoint(trained["first"])
    adapted, after = load_checkpoint(out)
    assert after["adapted_on"] == {"folder": str(slides), "images": 34}
    by_folder = tmp_path / "by-folder.safetensors"  # the model's folder serves as well
    assert wbc(["adapt", str(trained["first"].parent), str(slides), "-o", str(by_folder)]) == 0
    assert load_checkpoint(by_folder)[1]["adapted_on"] == after["adapted_on"]
    assert after["classes"] == before["classes"] and after["preprocess"] == before["preprocess"]
    changed = {key for key, value in adapted.state_dict().items()
               if not torch.equal(value, original.state_dict()[key])}
    assert changed and all(key.rsplit(".", 1)[-1] in ("running_mean", "running_var",
                                                      "num_batches_tracked") for key in changed)
    few = _stained_lab(tmp_path / "few", 0, 5, labelled=False)
    write_spec(tmp_path / "ensemble.json", trained, {"first": 0.5, "second": 0.5})
    for args, message in (([str(trained["first"]), str(few)], "at least 32 readable images"),
                          ([str(trained["first"]), str(tmp_path / "none")], "not a folder"),
                          ([str(few / "lymphocyte_0.jpg"), str(slides)], "adapt a model"),
                          ([str(tmp_path / "ensemble.json"), str(slides)], "adapt a model"),
                          (["no-such-model", str(slides)], "no model at no-such-model")):
        capsys.readouterr()
        assert wbc(["adapt", *args, "-o", str(tmp_path / "bad.safetensors")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()
