"""95% bootstrap confidence intervals of headline metrics (images resampled with replacement)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

Metric = Callable[[np.ndarray, np.ndarray], float]

METRICS: dict[str, Metric] = {
    "accuracy": accuracy_score,
    "balanced_accuracy": balanced_accuracy_score,
    "macro_f1": lambda y, p: f1_score(y, p, average="macro", zero_division=0),
}


def bootstrap_intervals(labels: np.ndarray, predicted: np.ndarray, resamples: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """Percentile bootstrap ``[low, high]`` of each metric in ``METRICS``."""
    if len(labels) == 0:
        raise ValueError("no images to bootstrap")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(resamples, len(labels)))
    tail = (1 - level) / 2 * 100
    intervals = {}
    for name, metric in METRICS.items():
        with warnings.catch_warnings():  # resamples may lack a class: sklearn warns, rightly 0
            warnings.simplefilter("ignore", UserWarning)
            values = [metric(labels[d], predicted[d]) for d in draws]
        low, high = np.percentile(values, [tail, 100 - tail])
        intervals[name] = [float(low), float(high)]
    return intervals
