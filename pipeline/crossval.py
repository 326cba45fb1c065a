"""Cross-validation results: per-fold metrics, their mean and spread, and pooled out-of-fold scores.

Each fold's evaluation writes ``predictions.csv`` (true label, predicted class, probability of
every class); every image is test data in exactly one fold, so pooling the folds' predictions
scores all images once (the out-of-fold estimate) and the fold-to-fold spread shows how much a
single split's figure can move.

External sets (``evaluate.external``) are scored by every fold's model: their figures are the
folds' mean and spread, and the fold models' averaged probabilities (the five models as one
ensemble, which ``wbc predict`` serves from an ``ensemble.json`` of their checkpoints).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import plots
from pipeline.errors import InputError, one_line
from pipeline.io import read_json, write_csv, write_json
from pipeline.metrics import classification_metrics, quality_metrics
from pipeline.metrics_ci import bootstrap_intervals, paired_difference

logger = logging.getLogger(__name__)

SPREAD_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "ece")


def cv_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The quality figures of a cross-validation for ``dvc metrics show``: the folds' mean, the
    pooled out-of-fold scores and each external set's fold-average scores (spreads, intervals
    and counts stay in the summary)."""
    return {"fold_mean": summary["mean"], "out_of_fold": quality_metrics(summary["out_of_fold"]),
            "external": {name: quality_metrics(result["fold_average"])
                         for name, result in summary["external"].items()}}


def score_predictions(predictions: pd.DataFrame, classes: list[str]
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any], list[dict[str, Any]]]:
    """Integer labels, probabilities, headline and per-class metrics of a predictions table
    (``label`` and a ``p_<class>`` column per class)."""
    index = {name: i for i, name in enumerate(classes)}
    labels = predictions["label"].map(index).to_numpy()
    probabilities = predictions[[f"p_{name}" for name in classes]].to_numpy()
    headline, per_class = classification_metrics(labels, probabilities, classes)
    return labels, probabilities, headline, per_class


def _right_of(labels: np.ndarray, predicted: np.ndarray) -> str:
    """``"1575 of 1599"``: the count behind an accuracy that its rounding could overstate."""
    return f"{int((labels == predicted).sum())} of {len(labels)}"


def _spread(table: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """The folds' mean and standard deviation of each of ``SPREAD_METRICS`` (a row per fold)
    over the folds that define it; None (JSON's null, never NaN) where none does, as for the
    ROC-AUC of folds whose test images are all of one class."""
    numbers = table[list(SPREAD_METRICS)].astype(float)
    return {"mean": {m: _defined(numbers[m].mean()) for m in SPREAD_METRICS},
            "std": {m: _defined(numbers[m].std(ddof=1)) for m in SPREAD_METRICS}}


def _defined(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def probability_classes(predictions: pd.DataFrame) -> list[str]:
    """The classes of a predictions table, in the order of its ``p_<class>`` columns."""
    return [column[2:] for column in predictions.columns if column.startswith("p_")]


def read_predictions(path: Path) -> pd.DataFrame:
    """A predictions table (``path``, ``label``, a numeric ``p_<class>`` column per class, every
    label one of them, at least one row); anything else is a one-line error."""
    if not path.is_file():
        raise InputError(f"{path} is missing: is its folder a crossval@<model> output?")
    try:
        frame = pd.read_csv(path, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable CSV ({one_line(error)})") from error
    classes = probability_classes(frame)
    if not {"path", "label"} <= set(frame.columns) or not classes or frame.empty:
        raise InputError(f"{path}: not a predictions table (needs path, label, p_<class> and "
                         f"at least one row)")
    probabilities = frame[[f"p_{name}" for name in classes]].apply(pd.to_numeric,
                                                                   errors="coerce")
    if not np.isfinite(probabilities.to_numpy(float)).all():
        raise InputError(f"{path}: a p_<class> value is not a number")
    if unknown := set(frame["label"].astype(str)) - set(classes):
        raise InputError(f"{path}: labels without a p_<class> column: "
                         f"{', '.join(sorted(unknown)[:5])}")
    paths = frame["path"].astype(str)
    twice = paths[paths.duplicated()]
    if not twice.empty:
        raise InputError(f"{path}: an image is listed twice ({twice.iloc[0]}); one row per image")
    return frame.assign(**probabilities)


def read_fold_predictions(fold_dirs: list[Path]) -> tuple[list[pd.DataFrame], list[str]]:
    """Every fold's ``predictions.csv`` and the class list (from the probability columns)."""
    frames = [pd.read_csv(folder / "predictions.csv", keep_default_na=False)
              for folder in fold_dirs]
    columns = [probability_classes(frame) for frame in frames]
    if any(found != columns[0] for found in columns):
        raise ValueError("the folds' models do not share one class list: "
                         + "; ".join(",".join(found) for found in columns))
    return frames, columns[0]


def aggregate_folds(model: str, fold_dirs: list[Path], out_dir: Path, metrics_path: Path
                    ) -> dict[str, Any]:
    """Write mean, std and pooled out-of-fold metrics, with a confusion matrix, for one model:
    all of them to ``out_dir/summary.json`` (returned), and to ``metrics_path`` (the DVC metrics
    file) what a reviewer compares (``cv_metrics``)."""
    frames, classes = read_fold_predictions(fold_dirs)
    fold_rows = [{"fold": fold, **score_predictions(frame, classes)[2]}
                 for fold, frame in enumerate(frames)]
    table = pd.DataFrame(fold_rows)
    pooled = pd.concat([frame.assign(fold=fold) for fold, frame in enumerate(frames)],
                       ignore_index=True)
    duplicated = pooled["path"].duplicated()
    if duplicated.any():
        raise ValueError(f"{int(duplicated.sum())} images are test data in more than one fold, "
                         f"e.g. {pooled['path'][duplicated].iloc[0]}")
    labels, probabilities, out_of_fold, per_class = score_predictions(pooled, classes)
    predicted = probabilities.argmax(1)
    summary = {
        "model": model,
        "folds": len(frames),
        **_spread(table),
        "out_of_fold": out_of_fold,
        "out_of_fold_ci95": bootstrap_intervals(labels, predicted),
    }
    write_csv(out_dir / "folds.csv", table)
    write_csv(out_dir / "out_of_fold_predictions.csv", pooled)
    write_csv(out_dir / "out_of_fold_report.csv", pd.DataFrame(per_class))
    plots.confusion_matrix_png(
        labels, predicted, classes,
        f"{model}: {len(frames)}-fold out-of-fold accuracy {out_of_fold['accuracy']:.3f} "
        f"({_right_of(labels, predicted)} images)", out_dir / "confusion.png")
    summary["external"] = aggregate_external(model, fold_dirs, classes, out_dir / "external")
    write_json(out_dir / "summary.json", summary)
    write_json(metrics_path, cv_metrics(summary))
    logger.info("%s: %d-fold accuracy %.4f ± %.4f, out-of-fold %.4f", model, len(frames),
                summary["mean"]["accuracy"], summary["std"]["accuracy"], out_of_fold["accuracy"])
    return summary


def external_set_names(fold_dirs: list[Path]) -> list[str]:
    """The external sets every fold's evaluation scored (its ``external/index.json``)."""
    indexes = [folder / "external" / "index.json" for folder in fold_dirs]
    found = [list(read_json(index)) if index.is_file() else [] for index in indexes]
    if any(names != found[0] for names in found):
        raise ValueError("the folds were scored on different external sets; rerun cv_evaluate")
    return found[0]


def aggregate_external(model: str, fold_dirs: list[Path], classes: list[str], out_dir: Path
                       ) -> dict[str, Any]:
    """Per external set: the folds' mean and spread, and the fold models' averaged probabilities
    scored with a confusion matrix (``out_dir/<set>``); ``{}`` when none was scored."""
    results = {}
    for name in external_set_names(fold_dirs):
        frames, _ = read_fold_predictions([folder / "external" / name for folder in fold_dirs])
        if any(list(frame["path"]) != list(frames[0]["path"]) for frame in frames):
            raise ValueError(f"the folds' models scored different images of {name}")
        table = pd.DataFrame([score_predictions(frame, classes)[2] for frame in frames])
        average = average_predictions(frames, f"{model} on {name}")
        labels, probabilities, headline, per_class = score_predictions(average, classes)
        predicted = probabilities.argmax(1)
        results[name] = {
            **_spread(table),
            "fold_average": headline,
            "fold_average_ci95": bootstrap_intervals(labels, predicted)}
        write_csv(out_dir / name / "fold_average_predictions.csv", average)
        write_csv(out_dir / name / "fold_average_report.csv", pd.DataFrame(per_class))
        plots.confusion_matrix_png(
            labels, predicted, classes,
            f"{model}: the {len(frames)} folds' models averaged on {name}, accuracy "
            f"{headline['accuracy']:.3f} ({_right_of(labels, predicted)} images)",
            out_dir / name / "confusion.png")
        logger.info("%s on %s: fold models %.4f ± %.4f, averaged %.4f", model, name,
                    results[name]["mean"]["accuracy"], results[name]["std"]["accuracy"],
                    headline["accuracy"])
    return results


def average_predictions(members: list[pd.DataFrame], what: str) -> pd.DataFrame:
    """The members' probabilities of the same images averaged with equal weights (``label``
    and ``fold`` kept, rows in the first member's order): the fold models on an external set,
    or an ``ensemble.weighting: mean`` ensemble of recipes. Other images, classes, labels or
    folds are a one-line error naming ``what``."""
    first = members[0].set_index("path")
    classes = probability_classes(members[0])
    kept = [column for column in ("label", "fold") if column in first.columns]
    columns = [f"p_{name}" for name in classes]
    total = np.zeros((len(first), len(columns)))
    for member in members:
        frame = member.set_index("path")
        if (not frame.index.is_unique or set(frame.index) != set(first.index)
                or probability_classes(member) != classes):
            raise InputError(f"{what}: the members were not scored on the same images and "
                             f"classes (each once)")
        frame = frame.loc[first.index]
        if not all(c in frame.columns and frame[c].astype(str).equals(first[c].astype(str))
                   for c in kept):
            raise InputError(f"{what}: the members disagree on an image's {' or '.join(kept)}")
        total += frame[columns].to_numpy(float)
    return first[kept].assign(**dict(zip(columns, (total / len(members)).T,
                                          strict=True))).reset_index()


def correct_by_image(predictions: pd.DataFrame) -> pd.Series:
    """Per image (indexed by path): whether the prediction is the label. The prediction is the
    ``predicted`` column where there is one (out-of-fold predictions), else the most probable of
    the ``p_<class>`` columns (the fold models' averaged probabilities)."""
    if "predicted" in predictions:
        predicted = predictions["predicted"].astype(str)
    else:
        columns = [f"p_{name}" for name in probability_classes(predictions)]
        predicted = predictions[columns].idxmax(axis=1).str[2:]
    return pd.Series((predicted == predictions["label"].astype(str)).to_numpy(),
                     index=predictions["path"].to_numpy())


def same_images(first: pd.Series, second: pd.Series) -> bool:
    """Whether two per-image series (indexed by path) hold the same images, each once."""
    return (not first.index.has_duplicates and not second.index.has_duplicates
            and set(first.index) == set(second.index))


def paired_on_images(first: pd.Series, second: pd.Series, what: str, level: float = 0.95
                     ) -> dict[str, Any]:
    """First minus second accuracy on the same images (two :func:`correct_by_image` series), with
    a bootstrap interval over images at ``level`` (key ``ci95`` whatever the level); an error
    naming ``what`` when they scored other images."""
    if not same_images(first, second):
        raise InputError(f"{what}: the two were not scored on the same images "
                         f"({len(first)} and {len(second)}); compare runs on the same folds")
    return paired_difference(first.to_numpy(), second.reindex(first.index).to_numpy(), level)
