"""95% bootstrap confidence intervals of headline metrics (images resampled with replacement).

scipy's paired percentile bootstrap, with the statistics vectorised over the resamples in numpy
(they agree with scikit-learn's accuracy, balanced accuracy and macro-F1; a test checks it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import bootstrap


def _class_counts(labels: np.ndarray, predicted: np.ndarray, classes: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, support and predicted counts per class, over the last axis."""
    every = np.arange(classes).reshape((-1,) + (1,) * labels.ndim)
    is_label, is_predicted = labels == every, predicted == every
    return ((is_label & is_predicted).sum(-1), is_label.sum(-1), is_predicted.sum(-1))


def _accuracy(labels: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    return (labels == predicted).mean(axis)


def _balanced_accuracy(labels: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean recall over the classes present in ``labels`` (as scikit-learn's)."""
    hits, support, _ = _class_counts(labels, predicted, int(labels.max()) + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanmean(np.where(support > 0, hits / support, np.nan), axis=0)


def _macro_f1(labels: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean F1 over the classes in ``labels`` or ``predicted`` (as scikit-learn's macro F1)."""
    classes = int(max(labels.max(), predicted.max())) + 1
    hits, support, chosen = _class_counts(labels, predicted, classes)
    total = support + chosen
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanmean(np.where(total > 0, 2 * hits / total, np.nan), axis=0)


def bootstrap_intervals(labels: np.ndarray, predicted: np.ndarray, level: float = 0.95,
                        resamples: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of accuracy, balanced accuracy and macro-F1.

    Images are resampled with their labels (scipy's paired bootstrap); the interval of a perfect
    score is [1, 1], since the percentile method needs no variance.
    """
    if len(labels) == 0:
        raise ValueError("no images to bootstrap")
    statistics = {"accuracy": _accuracy, "balanced_accuracy": _balanced_accuracy,
                  "macro_f1": _macro_f1}
    intervals = {}
    for name, statistic in statistics.items():
        result = bootstrap((np.asarray(labels), np.asarray(predicted)), statistic, paired=True,
                           vectorized=True, n_resamples=resamples, confidence_level=level,
                           method="percentile", rng=np.random.default_rng(seed))
        low, high = result.confidence_interval
        intervals[name] = [float(low), float(high)]
    return intervals


def paired_difference(first_correct: np.ndarray, second_correct: np.ndarray, level: float = 0.95,
                      resamples: int = 5000, seed: int = 0) -> dict[str, Any]:
    """First minus second accuracy on the same images, with a percentile bootstrap interval over
    images and the count of images each gets right more often than the other.

    Per image, each side is its correctness (bool) or, for a recipe run several times, the share
    of its runs that got the image right (a number in [0, 1])."""
    first, second = np.asarray(first_correct, float), np.asarray(second_correct, float)
    if first.shape != second.shape or first.ndim != 1 or len(first) == 0:
        raise ValueError("paired scores need the same non-empty list of images for both")
    if not (((first >= 0) & (first <= 1)).all() and ((second >= 0) & (second <= 1)).all()):
        raise ValueError("paired scores are per-image correctness or shares of runs right, "
                         "in [0, 1]")
    difference = first - second
    return {"difference": float(difference.mean()),
            "ci95": mean_interval(difference, level, resamples, seed),
            "only_first_right": int((difference > 0).sum()),
            "only_second_right": int((difference < 0).sum())}


def mean_interval(values: np.ndarray, level: float = 0.95, resamples: int = 5000, seed: int = 0
                  ) -> list[float]:
    """Percentile bootstrap interval of the mean of per-image values (resampled with
    replacement); equal values give that value, since the percentile method needs no variance."""
    values = np.asarray(values, float)
    if np.ptp(values) == 0:
        return [float(values[0])] * 2
    low, high = bootstrap((values,), np.mean, n_resamples=resamples, confidence_level=level,
                          method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return [float(low), float(high)]
