"""Metric functions against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.metrics import classification_metrics, expected_calibration_error, fit_temperature


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


def test_ece_known_case():
    # Two bins: 0.9-confident (4 images, 3 right) and 0.6-confident (2 images, 2 right).
    probabilities = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    labels = np.array([0, 0, 0, 1, 0, 0])
    expected = 4 / 6 * abs(0.9 - 0.75) + 2 / 6 * abs(0.6 - 1.0)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == 0.0


def test_temperature_recovers_known_scale():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=generator) * 2
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator).squeeze(1)
    assert fit_temperature(true_logits * 3, labels) == pytest.approx(3, rel=0.1)
