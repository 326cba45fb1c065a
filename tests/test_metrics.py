"""Metric functions against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.metrics import (
    CALIBRATION_BINS,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
)


def test_metrics_with_a_class_never_predicted():
    labels = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 1, 0, 0, 1])  # class 2 is never predicted
    probabilities = np.eye(3)[predicted] * 0.9 + 0.1 / 3
    headline, per_class = classification_metrics(labels, probabilities, ["a", "b", "c"])
    assert headline["accuracy"] == pytest.approx(3 / 6)
    # recalls 1, 1/2, 0 -> balanced accuracy 1/2; precisions 2/4, 1/2, 0
    assert headline["balanced_accuracy"] == pytest.approx(0.5)
    f1 = [2 * 0.5 * 1 / 1.5, 0.5, 0.0]
    assert headline["macro_f1"] == pytest.approx(np.mean(f1))
    assert per_class[2] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0,
                            "support": 2}
    assert 0 <= headline["cohen_kappa"] < 1 and headline["images"] == 6


def test_undefined_scores_are_none_not_nan():
    """One class in the labels and in the answers: kappa is 0 / 0, and JSON cannot hold NaN."""
    labels = np.zeros(4, int)
    headline, _ = classification_metrics(labels, np.eye(3)[labels], ["a", "b", "c"])
    assert headline["cohen_kappa"] is None and headline["roc_auc_ovr"] is None
    assert headline["accuracy"] == 1.0
    assert all(not isinstance(v, float) or np.isfinite(v) for v in headline.values())


def test_ece_known_case():
    # Two bins: 0.9-confident (4 images, 3 right) and 0.6-confident (2 images, 2 right).
    probabilities = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    labels = np.array([0, 0, 0, 1, 0, 0])
    expected = 4 / 6 * abs(0.9 - 0.75) + 2 / 6 * abs(0.6 - 1.0)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == 0.0


def test_reliability_bins_are_the_ece_bins():
    """The diagram's table holds exactly the bins the ECE sums over (15 of width 1/15): 0.9 falls
    in bin 13; a confidence on a bin edge (0.6 = 9/15, 0.2 = 3/15) in the bin below it."""
    probabilities = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    labels = np.array([0, 0, 0, 1, 0, 0])
    table = calibration_bins(probabilities, labels)
    assert CALIBRATION_BINS == 15 and table["bin"].tolist() == [8, 13]
    assert table["images"].tolist() == [2, 4] and table["accuracy"].tolist() == [1.0, 0.75]
    gaps = (table["images"] / len(labels) * (table["confidence"] - table["accuracy"]).abs())
    assert expected_calibration_error(probabilities, labels) == pytest.approx(gaps.sum())
    edge = np.array([[0.2, 0.8 / 4, 0.8 / 4, 0.8 / 4, 0.8 / 4]])  # top class 0 at 0.2
    assert calibration_bins(edge, np.array([0]))["bin"].tolist() == [2]


def test_roc_auc_averages_the_classes_present():
    """One-vs-rest ROC-AUC over the classes in the data: a class the model knows but the data
    lacks is not averaged in; with one class present there is no AUC."""
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(5), 60)
    labels = rng.integers(0, 3, 60)  # classes 3 and 4 absent
    headline, _ = classification_metrics(labels, probabilities, list("abcde"))
    expected = np.mean([roc_auc_score(labels == c, probabilities[:, c]) for c in range(3)])
    assert headline["roc_auc_ovr"] == pytest.approx(expected, abs=1e-15)
    assert headline["absent_classes"] == "d, e"
    only_one, _ = classification_metrics(np.zeros(4, int), probabilities[:4], list("abcde"))
    assert only_one["roc_auc_ovr"] is None
    two = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])  # positives 0.7, 0.4
    assert classification_metrics(np.array([0, 1, 1, 0]), two, ["a", "b"])[0][
        "roc_auc_ovr"] == pytest.approx(0.5)  # each beats one of the negatives 0.2, 0.9


def test_temperature_recovers_known_scale():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=generator) * 2
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator).squeeze(1)
    assert fit_temperature(true_logits * 3, labels) == pytest.approx(3, rel=0.1)
