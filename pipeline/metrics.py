"""Classification and calibration metrics, computed with scikit-learn where it has them."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

CALIBRATION_BINS = 15  # equal-width confidence bins of the ECE and the reliability diagram


def calibration_bins(probabilities: np.ndarray, labels: np.ndarray,
                     bins: int = CALIBRATION_BINS) -> pd.DataFrame:
    """Top-class confidence in ``bins`` equal-width bins, (a, b] with 0 in the first: each
    non-empty bin's mean confidence, accuracy and image count, for the ECE and its diagram."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = [{"bin": index, "confidence": confidence[in_bin].mean(),
             "accuracy": correct[in_bin].mean(), "images": int(in_bin.sum())}
            for index in range(bins) if (in_bin := which == index).any()]
    return pd.DataFrame(rows, columns=["bin", "confidence", "accuracy", "images"])


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = CALIBRATION_BINS) -> float:
    """ECE: the image-weighted gap between confidence and accuracy over ``calibration_bins``."""
    table = calibration_bins(probabilities, labels, bins)
    error = 0.0
    for row in table.itertuples():
        error += row.images / len(labels) * abs(row.confidence - row.accuracy)
    return float(error)


def macro_f1(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Macro-averaged F1 over the classes present in ``labels`` (a present class never
    predicted counts as 0; a class absent from the data is not averaged in)."""
    _, _, f1, _ = precision_recall_fscore_support(
        labels, predicted, labels=np.unique(labels), average="macro", zero_division=0)
    return float(f1)


def _roc_auc_ovr(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    """One-vs-rest macro ROC-AUC over the classes present in ``labels`` (None if fewer than 2)."""
    present = np.unique(labels)
    if len(present) < 2:
        return None
    if probabilities.shape[1] == 2:  # sklearn scores two classes as one binary problem
        return float(roc_auc_score(labels, probabilities[:, 1]))
    with warnings.catch_warnings():  # a class absent from the data has no AUC: not averaged
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        scores = roc_auc_score(labels, probabilities, multi_class="ovr", average=None,
                               labels=np.arange(probabilities.shape[1]))
    return float(np.mean(scores[present]))


def _cohen_kappa(labels: np.ndarray, predicted: np.ndarray, every: np.ndarray) -> float | None:
    """Cohen's kappa; None where it is undefined (one class in labels and answers: 0 / 0)."""
    kappa = float(cohen_kappa_score(labels, predicted, labels=every))
    return kappa if math.isfinite(kappa) else None


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]
                           ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Headline metrics and per-class rows for integer ``labels`` and class ``probabilities``.

    Macro and weighted averages are taken over the classes present in ``labels``; the model's
    classes absent from the data are named in ``absent_classes`` (and still have a per-class
    row, with support 0). A score that is undefined for the data is None, never NaN.
    """
    predicted = probabilities.argmax(axis=1)
    every = np.arange(len(classes))
    present = np.unique(labels)
    headline: dict[str, Any] = {
        "accuracy": accuracy_score(labels, predicted),
        "balanced_accuracy": balanced_accuracy_score(labels, predicted),
        "cohen_kappa": _cohen_kappa(labels, predicted, every),
        "roc_auc_ovr": _roc_auc_ovr(labels, probabilities),
        "ece": expected_calibration_error(probabilities, labels),
        "images": int(len(labels)),
        "classes_scored": int(len(present)),
        "absent_classes": ", ".join(c for i, c in enumerate(classes) if i not in set(present)),
    }
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            labels, predicted, labels=present, average=average, zero_division=0)
        headline |= {f"{average}_precision": precision, f"{average}_recall": recall,
                     f"{average}_f1": f1}
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=every, zero_division=0)
    per_class = [
        {"class": name, "precision": float(p), "recall": float(r), "f1": float(f),
         "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    ]
    headline = {k: (float(v) if isinstance(v, np.floating | float) else v)
                for k, v in headline.items()}
    return headline, per_class


def restricted_to_present(labels: np.ndarray, probabilities: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities renormalised over the classes present in ``labels`` (the others zeroed).

    For a data set that holds only some of the model's classes (another laboratory's set): the
    model then chooses among the classes that can occur, as a lab restricting its panel would.
    """
    present = np.zeros(probabilities.shape[1], dtype=bool)
    present[np.unique(labels)] = True
    restricted = np.where(present, probabilities, 0.0)
    return restricted / restricted.sum(1, keepdims=True).clip(1e-12), present


def restricted_predictions(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Each image's most probable class among those present in ``labels``: the answer of
    :func:`restricted_to_present`, defined even where the present classes got no mass at all."""
    present = np.unique(labels)
    return present[probabilities[:, present].argmax(1)]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising validation NLL of logits / T."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter)
    logits, labels = logits.detach().float(), labels.detach().long()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


# What ``dvc metrics show`` compares, per model and per external set (at most 15 columns):
# quality figures only; intervals, counts and settings go to the record file.
QUALITY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "cohen_kappa",
                "roc_auc_ovr", "ece", "attention_in_cell", "gradcam_in_cell", "abstain_coverage",
                "abstain_accuracy", "restricted_accuracy", "restricted_balanced_accuracy",
                "restricted_macro_f1")


def quality_metrics(headline: dict[str, Any]) -> dict[str, Any]:
    """The ``QUALITY_KEYS`` that ``headline`` holds, in that order (a DVC metrics file's)."""
    return {key: headline[key] for key in QUALITY_KEYS if key in headline}
