"""Cross-validation results: per-fold metrics, their mean and spread, and pooled out-of-fold scores.

Each fold's evaluation writes ``predictions.csv`` (true label, predicted class, probability of
every class); every image is test data in exactly one fold, so pooling the folds' predictions
scores all images once (the out-of-fold estimate) and the fold-to-fold spread shows how much a
single split's figure can move.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import bootstrap

from pipeline import plots
from pipeline.io import write_csv, write_json
from pipeline.metrics import classification_metrics

logger = logging.getLogger(__name__)

SPREAD_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "ece")


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


def _scores(predictions: pd.DataFrame, classes: list[str]
            ) -> tuple[np.ndarray, np.ndarray, dict[str, Any], list[dict[str, Any]]]:
    index = {name: i for i, name in enumerate(classes)}
    labels = predictions["label"].map(index).to_numpy()
    probabilities = predictions[[f"p_{name}" for name in classes]].to_numpy()
    headline, per_class = classification_metrics(labels, probabilities, classes)
    return labels, probabilities, headline, per_class


def read_fold_predictions(fold_dirs: list[Path]) -> tuple[list[pd.DataFrame], list[str]]:
    """Every fold's ``predictions.csv`` and the class list (from the probability columns)."""
    frames = [pd.read_csv(folder / "predictions.csv", keep_default_na=False)
              for folder in fold_dirs]
    columns = [[c[2:] for c in frame.columns if c.startswith("p_")] for frame in frames]
    if any(found != columns[0] for found in columns):
        raise ValueError("the folds' models do not share one class list: "
                         + "; ".join(",".join(found) for found in columns))
    return frames, columns[0]


def aggregate_folds(model: str, fold_dirs: list[Path], out_dir: Path, metrics_path: Path
                    ) -> dict[str, Any]:
    """Write mean, std and pooled out-of-fold metrics, with a confusion matrix, for one model."""
    frames, classes = read_fold_predictions(fold_dirs)
    fold_rows = [{"fold": fold, **_scores(frame, classes)[2]} for fold, frame in enumerate(frames)]
    table = pd.DataFrame(fold_rows)
    pooled = pd.concat([frame.assign(fold=fold) for fold, frame in enumerate(frames)],
                       ignore_index=True)
    duplicated = pooled["path"].duplicated()
    if duplicated.any():
        raise ValueError(f"{int(duplicated.sum())} images are test data in more than one fold, "
                         f"e.g. {pooled['path'][duplicated].iloc[0]}")
    labels, probabilities, out_of_fold, per_class = _scores(pooled, classes)
    predicted = probabilities.argmax(1)
    summary = {
        "model": model,
        "folds": len(frames),
        "mean": {m: float(table[m].mean()) for m in SPREAD_METRICS},
        "std": {m: float(table[m].std(ddof=1)) for m in SPREAD_METRICS},
        "out_of_fold": out_of_fold,
        "out_of_fold_ci95": bootstrap_intervals(labels, predicted),
    }
    write_csv(out_dir / "folds.csv", table)
    write_csv(out_dir / "out_of_fold_predictions.csv", pooled)
    write_csv(out_dir / "out_of_fold_report.csv", pd.DataFrame(per_class))
    plots.confusion_matrix_png(
        labels, predicted, classes,
        f"{model}: {len(frames)}-fold out-of-fold accuracy {out_of_fold['accuracy']:.3f} "
        f"({len(labels)} images)", out_dir / "confusion.png")
    write_json(metrics_path, summary)
    logger.info("%s: %d-fold accuracy %.4f ± %.4f, out-of-fold %.4f", model, len(frames),
                summary["mean"]["accuracy"], summary["std"]["accuracy"], out_of_fold["accuracy"])
    return summary
