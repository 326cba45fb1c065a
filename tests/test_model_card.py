"""Model card: generated from summary.json by evaluate, with intervals, abstention, provenance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluate import EvalSet, EvaluateConfig, Scored, ScoredValidation, write_evaluation
from pipeline.io import read_json
from pipeline.metrics import quality_metrics
from pipeline.metrics_ci import bootstrap_intervals
from pipeline.model_card import render_card, reproduce_command
from pipeline.model_file import data_fingerprint

CLASSES = ["lymphocyte", "monocyte", "neutrophil"]
SETTINGS = EvaluateConfig(tta=False, mistakes=2, abstain_target_accuracy=0.9)


def _probabilities(labels: np.ndarray, rng: np.random.Generator, flip: float) -> np.ndarray:
    predicted = np.where(rng.random(len(labels)) < flip, (labels + 1) % 3, labels)
    probabilities = rng.dirichlet([1, 1, 1], len(labels)) * 0.3
    probabilities[np.arange(len(labels)), predicted] += 0.7
    return probabilities


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_data():
    rng = np.random.default_rng(0)
    small, large = (rng.integers(0, 3, n) for n in (60, 2000))
    noisy = {n: np.where(rng.random(len(y)) < 0.1, (y + 1) % 3, y) for n, y in
             (("small", small), ("large", large))}
    few, many = bootstrap_intervals(small, noisy["small"]), bootstrap_intervals(large,
                                                                                 noisy["large"])
    accuracy = float((large == noisy["large"]).mean())
    assert many["accuracy"][0] <= accuracy <= many["accuracy"][1]
    assert np.diff(many["accuracy"]) < np.diff(few["accuracy"])
    assert set(many) == {"accuracy", "balanced_accuracy", "macro_f1"}
    with pytest.raises(ValueError, match="no images"):
        bootstrap_intervals(large[:0], large[:0])


def test_evaluate_writes_a_card_from_its_summary(tmp_path, synthetic_folder):
    rng = np.random.default_rng(1)
    paths = sorted((synthetic_folder / "lymphocyte").iterdir())[:6]
    labels, val_labels = rng.integers(0, 3, 6), rng.integers(0, 3, 200)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "source.json").write_text('{"source": "/data/pbc-1560"}')
    pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": ["monocyte", "lymphocyte"],
                  "sha256": ["a1" * 32, "b2" * 32]}).to_csv(raw / "manifest.csv", index=False)
    scored = Scored(
        name="demo", classes=CLASSES,
        data=EvalSet(paths, [CLASSES[i] for i in labels], [p.name for p in paths]),
        probabilities=_probabilities(labels, rng, 0.3),
        uncalibrated=_probabilities(labels, rng, 0.3), temperature=1.4,
        images_per_second=50.0, device="cpu",
        training={"backbone": "mobilenetv2_100", "image_size": 48, "weight_source": "x"},
        recipe={"model": {"image_size": 48}, "train": {"epochs": 3}},
        validation=ScoredValidation([], [CLASSES[i] for i in val_labels],
                                    _probabilities(val_labels, rng, 0.05)),
    )
    headline = write_evaluation(scored, tmp_path / "eval", tmp_path / "eval.json", SETTINGS,
                                raw_dir=raw)
    summary = read_json(tmp_path / "eval" / "summary.json")
    assert summary["abstention"]["threshold"] == headline["abstain_threshold"]
    assert 0 <= headline["abstain_coverage"] <= 1
    assert (tmp_path / "eval" / "figures" / "risk_coverage.png").is_file()
    assert len(pd.read_csv(tmp_path / "eval" / "risk_coverage.csv")) > 1
    card = (tmp_path / "eval" / "MODEL_CARD.md").read_text()
    assert card == render_card(summary)
    assert "Not a diagnostic device" in card and "95% CI" in card
    assert "lymphocyte 1, monocyte 1" in card
    assert data_fingerprint(pd.read_csv(raw / "manifest.csv", dtype=str)) in card
    assert "one centred white cell per image" in card and "staining protocol" in card
    assert "-S 'train.epochs=3'" in card and "dvc exp run evaluate@demo" in card
    for section in ("Intended use", "Classes", "Training data", "Performance", "Abstention",
                    "Known limitations", "How to reproduce"):
        assert f"## {section}" in card
    assert "external" not in read_json(tmp_path / "eval.json")  # no external sets given
    other = {**summary, "metrics": {**summary["metrics"], "accuracy": 0.5}}
    write_evaluation(scored, tmp_path / "with", tmp_path / "with" / "eval.json", SETTINGS,
                     external={"lab-b": other})
    assert read_json(tmp_path / "with" / "eval.json")["external"] == {
        "lab-b": quality_metrics(other["metrics"])}
    assert "| external: lab-b |" in (tmp_path / "with" / "MODEL_CARD.md").read_text()


def test_card_lists_external_metrics_and_localisation():
    metrics = {"images": 10, "accuracy": 0.9, "balanced_accuracy": 0.88, "macro_f1": 0.87,
               "ece": 0.05, "ece_uncalibrated": 0.1, "temperature": 1.2,
               "attention_in_cell": 0.8, "cell_area": 0.3}
    summary = {"model": "m", "metrics": metrics, "training": {}, "abstention": None,
               "card": {"intervals": {}}}
    summary["external"] = {"pbc-external": {**summary, "metrics": {**metrics, "accuracy": 0.7}}}
    card = render_card(summary)
    assert "| external: pbc-external | 10 | 0.700" in card
    assert "attention_in_cell: 0.800" in card and "cell_area: 0.300" in card
    assert "Not computed" in card
    assert reproduce_command("m", {}, None) == "dvc exp run evaluate@m"


def test_ensemble_card_names_its_members_and_its_own_stage():
    metrics = {"images": 10, "accuracy": 0.9, "balanced_accuracy": 0.88, "macro_f1": 0.87,
               "ece": 0.05, "ece_uncalibrated": 0.1, "temperature": 0.9}
    summary = {"model": "ensemble", "metrics": metrics, "abstention": None,
               "training": {"members": {"a": 0.6, "b": 0.4}, "parameters": 9.76e6},
               "card": {"intervals": {}, "data": {"source": "/data/pbc-1560"}}}
    card = render_card(summary)
    assert "- ensemble of `a` (weight 0.60), `b` (weight 0.40)" in card
    assert "9.76 M parameters in all" in card and "n/a" not in card
    assert ("dvc exp run ensemble -S 'data.source=/data/pbc-1560' "
            "-S 'ensemble.members=[\"a\", \"b\"]'") in card


def test_card_of_a_refit_model_says_which_scores_are_the_first_runs():
    metrics = {"images": 10, "accuracy": 0.9, "balanced_accuracy": 0.88, "macro_f1": 0.87,
               "ece": 0.05, "ece_uncalibrated": 0.1, "temperature": 0.9}
    training = {"backbone": "efficientnet_lite0", "best_epoch": 5, "epochs_run": 6,
                "train_images": 1248}
    cards = [render_card({"model": "m", "metrics": metrics, "abstention": None,
                          "training": training | extra, "card": {"intervals": {}}})
             for extra in ({}, {"refit_on_val": True})]
    assert "best epoch 5 of 6, 1248 training images" in cards[0]
    assert "train.refit" not in cards[0]
    assert ("then trained again from the same start on the training and validation images "
            "together for those 5 epochs (`train.refit`)") in cards[1]
