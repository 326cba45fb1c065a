"""Writing an evaluation: tables, figures, the model card and the metrics files.

Writes, into one evaluation folder: ``report.csv`` (per class), ``predictions.csv`` (probability
of every class per image), ``summary.json`` (the row of the comparison table), DVC plot data
(``roc.csv``, ``precision_recall.csv``, ``reliability.csv``) and PNG figures (``figures/``); the
quality figures a reviewer compares (``QUALITY_KEYS``, external sets nested by name) to
``metrics/<model>/eval.json`` for ``dvc metrics show/diff``, and everything else the evaluation
records (intervals, counts, temperature, throughput, device) to a plain record file beside it.
Nothing here scores a model: it writes out a :class:`~pipeline.eval_sets.Scored`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_curve, roc_curve

from pipeline import abstain, explain, plots
from pipeline.eval_sets import EvaluateConfig, Scored, ScoredValidation
from pipeline.figures import model_title
from pipeline.io import atomic_path, decode_image, write_csv, write_json
from pipeline.metrics import (
    CALIBRATION_BINS,
    QUALITY_KEYS,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    quality_metrics,
    restricted_predictions,
)
from pipeline.metrics_ci import bootstrap_intervals
from pipeline.model_card import card_facts, write_model_card

logger = logging.getLogger(__name__)


def write_evaluation(scored: Scored, out_dir: Path, metrics_path: Path, config: EvaluateConfig,
                     record_path: Path | None = None, raw_dir: Path | None = None,
                     external: dict[str, Any] | None = None, data_name: str = "test"
                     ) -> dict[str, Any]:
    """Compute metrics and write every evaluation output (see the module docstring).

    ``metrics_path`` gets the quality figures only (``quality_metrics``), with ``external``'s
    (summaries of other data sets, by name) under ``"external"`` by set name; the rest of the
    headline (intervals, counts, temperature, throughput, device) goes to ``record_path``
    (default: ``eval_record.json`` beside the metrics), so that metric diffs show quality only.
    With ``raw_dir`` (the ingested training data) the model card names its provenance;
    ``external`` goes beside the test results in ``summary.json`` and the card too. Returns the
    whole headline."""
    classes, data = scored.classes, scored.data
    index = {label: i for i, label in enumerate(classes)}
    labels = np.array([index[label] for label in data.labels])
    headline, per_class = _headline(scored, labels, config)
    predicted = scored.probabilities.argmax(1)
    _write_tables(scored, per_class, out_dir)
    plot_data = _plot_data(labels, scored.probabilities, classes)
    for name, table in plot_data.items():
        write_csv(out_dir / f"{name}.csv", table)
    abstention, curves = _abstention(scored, labels, config)
    with atomic_path(out_dir / "figures") as figures:
        _write_figures(scored, labels, predicted, headline, plot_data, figures, config,
                       data_name)
        if abstention:
            write_csv(out_dir / "risk_coverage.csv", curves["test"])
            abstain.risk_coverage_png(
                curves, abstention,
                f"{figure_name(scored)}: accuracy vs share classified automatically",
                figures / "risk_coverage.png")
            headline |= {f"abstain_{k}": abstention["test"][k] for k in ("coverage", "accuracy")
                         if abstention["test"][k] is not None}
            headline["abstain_threshold"] = abstention["threshold"]
    write_json(out_dir / "summary.json", {
        "model": scored.name, "data_name": data_name, "metrics": headline,
        "training": scored.training,
        "abstention": abstention, "adapted_on": scored.adapted_on,
        "unseen_check": scored.unseen_check,
        "card": card_facts(classes, labels, predicted, per_class, scored.recipe, raw_dir,
                           scored.training_data),
        "external": external or {}})
    write_model_card(out_dir / "summary.json", out_dir / "MODEL_CARD.md")
    quality = quality_metrics(headline)
    if external:
        quality["external"] = {set_name: quality_metrics(summary["metrics"])
                               for set_name, summary in external.items()}
    write_json(metrics_path, quality)
    write_json(record_path or metrics_path.with_name("eval_record.json"),
               {k: v for k, v in headline.items() if k not in QUALITY_KEYS})
    logger.info("%s: accuracy %.4f, macro-F1 %.4f, ECE %.4f (uncalibrated %.4f) on %d images",
                scored.name, headline["accuracy"], headline["macro_f1"], headline["ece"],
                headline["ece_uncalibrated"], len(labels))
    return headline


def _headline(scored: Scored, labels: np.ndarray, config: EvaluateConfig
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The headline metrics (``eval.json``, with throughput and device) and per-class rows."""
    probabilities = scored.probabilities
    headline, per_class = classification_metrics(labels, probabilities, scored.classes)
    headline["skipped_unreadable"] = scored.skipped_unreadable
    if scored.unseen_check and "near_duplicates" in scored.unseen_check:
        headline["near_duplicates_of_training"] = scored.unseen_check["near_duplicates"]
    headline |= _interval_columns(bootstrap_intervals(labels, probabilities.argmax(1)))
    if headline["absent_classes"]:
        headline |= _restricted_scores(labels, probabilities)
        logger.warning("%s: no image of %s in the data; macro averages are over the %d classes "
                       "present", scored.name, headline["absent_classes"],
                       headline["classes_scored"])
    headline["ece_uncalibrated"] = expected_calibration_error(scored.uncalibrated, labels)
    if scored.adapted_on is not None:
        headline["adaptation_images"] = scored.adapted_on["images"]
    headline |= {"temperature": scored.temperature, "tta": bool(config.tta),
                 "inference_images_per_second": scored.images_per_second,
                 "device": scored.device}
    if scored.localisation is not None:
        headline |= explain.mean_scores(scored.localisation["scores"])
    return headline, per_class


def _write_tables(scored: Scored, per_class: list[dict[str, Any]], out_dir: Path) -> None:
    """``predictions.csv``, ``report.csv`` and ``probabilities.npz`` (which the ensemble reads:
    calibrated and uncalibrated test probabilities, calibrated validation ones)."""
    classes, data, probabilities = scored.classes, scored.data, scored.probabilities
    predictions = pd.DataFrame({
        "path": data.names, "label": data.labels,
        "predicted": [classes[i] for i in probabilities.argmax(1)],
        "confidence": probabilities.max(1),
        **{f"p_{name}": probabilities[:, i] for i, name in enumerate(classes)},
        **(scored.localisation or {}).get("scores", {}),
    })
    write_csv(out_dir / "predictions.csv", predictions)
    write_csv(out_dir / "report.csv", pd.DataFrame(per_class))
    validation = scored.validation or ScoredValidation([], [], np.zeros(0))
    with atomic_path(out_dir / "probabilities.npz") as tmp, open(tmp, "wb") as handle:
        np.savez(handle, calibrated=probabilities, uncalibrated=scored.uncalibrated,
                 classes=np.array(classes), names=np.array(data.names),
                 val_calibrated=validation.probabilities, val_names=np.array(validation.names))


def _interval_columns(intervals: dict[str, list[float]]) -> dict[str, float]:
    """``accuracy_ci95_low`` / ``_high`` ...: flat keys, as ``dvc metrics`` shows them."""
    return {f"{name}_ci95_{side}": bound for name, (low, high) in intervals.items()
            for side, bound in (("low", low), ("high", high))}


def _restricted_scores(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Scores when the model may only answer with the classes the data holds."""
    predicted = restricted_predictions(labels, probabilities)
    scores = {"restricted_accuracy": float((predicted == labels).mean()),
              "restricted_balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
              "restricted_macro_f1": float(f1_score(labels, predicted, average="macro",
                                                    zero_division=0))}
    return scores | {f"restricted_{k}": v for k, v in
                     _interval_columns(bootstrap_intervals(labels, predicted)).items()}


def _abstention(scored: Scored, labels: np.ndarray, config: EvaluateConfig
                ) -> tuple[dict[str, Any] | None, dict[str, pd.DataFrame]]:
    """Threshold picked on validation and its test coverage/accuracy; None without validation."""
    validation, target = scored.validation, config.abstain_target_accuracy
    if validation is None or not validation.labels or target is None:
        return None, {}
    index = {label: i for i, label in enumerate(scored.classes)}
    val_labels = np.array([index[label] for label in validation.labels])
    summary = abstain.abstention_summary(validation.probabilities, val_labels,
                                         scored.probabilities, labels, target)
    return summary, {"validation": abstain.risk_coverage(validation.probabilities, val_labels),
                     "test": abstain.risk_coverage(scored.probabilities, labels)}


def _plot_data(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]
               ) -> dict[str, pd.DataFrame]:
    """The tables behind the curves, by file name (for ``dvc plots`` and the PNG figures):
    one-vs-rest ROC and precision-recall points (a ``class`` column naming the series) and
    the reliability bins the ECE is computed over."""
    roc, pr = [], []
    for i, name in enumerate(classes):
        positive = labels == i
        if not positive.any() or positive.all():
            continue
        fpr, tpr, _ = roc_curve(positive, probabilities[:, i])
        roc.append(pd.DataFrame({"class": name, "fpr": fpr, "tpr": tpr}))
        precision, recall, _ = precision_recall_curve(positive, probabilities[:, i])
        pr.append(pd.DataFrame({"class": name, "recall": recall, "precision": precision}))
    empty = pd.DataFrame(columns=["class"])
    return {"roc": pd.concat(roc or [empty], ignore_index=True),
            "precision_recall": pd.concat(pr or [empty], ignore_index=True),
            "reliability": calibration_bins(probabilities, labels)}


def _restricted_confusion_png(scored: Scored, labels: np.ndarray, headline: dict[str, Any],
                              path: Path) -> None:
    """The confusion matrix over the classes the data holds, the model answering among them
    only (the ``restricted_*`` scores)."""
    present = np.unique(labels)
    predicted = restricted_predictions(labels, scored.probabilities)
    title = (f"{figure_name(scored)}, answering among the {len(present)} classes present\n"
             f"accuracy {headline['restricted_accuracy']:.3f}, macro-F1 "
             f"{headline['restricted_macro_f1']:.3f} ({len(labels)} images)")
    plots.confusion_matrix_png(np.searchsorted(present, labels),
                               np.searchsorted(present, predicted),
                               [scored.classes[i] for i in present], title, path)


def figure_name(scored: Scored) -> str:
    """The model's name as figure titles show it (``(random init)`` when it is)."""
    return model_title(scored.name, scored.training)


def _thumbnail(path: Path, size: int = 200) -> np.ndarray:
    image = decode_image(path)
    scale = size / max(image.shape[:2])
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


def _write_figures(scored: Scored, labels: np.ndarray, predicted: np.ndarray,
                   headline: dict[str, Any], plot_data: dict[str, pd.DataFrame], figures: Path,
                   config: EvaluateConfig, data_name: str) -> None:
    classes, data = scored.classes, scored.data
    name = f"{figure_name(scored)} on {data_name}"
    probabilities = scored.probabilities
    title = (f"{name}: accuracy {headline['accuracy']:.3f}, macro-F1 {headline['macro_f1']:.3f}"
             f" ({len(labels)} images)")
    plots.confusion_matrix_png(labels, predicted, classes, title, figures / "confusion.png")
    if headline["absent_classes"]:
        _restricted_confusion_png(scored, labels, headline, figures / "confusion_restricted.png")
    plots.curves_png(plot_data["roc"], plot_data["precision_recall"], classes, title,
                     figures / "roc_pr.png")
    plots.reliability_png(plot_data["reliability"], CALIBRATION_BINS, headline["ece"],
                          f"{name}, temperature {scored.temperature:.3g}",
                          figures / "reliability.png")
    wrong = np.nonzero(predicted != labels)[0]
    worst = wrong[np.argsort(-probabilities[wrong].max(1))][: config.mistakes]
    plots.image_grid_png(
        [_thumbnail(data.paths[i]) for i in worst],
        [f"true {data.labels[i]}\npred {classes[predicted[i]]} ({probabilities[i].max():.0%})"
         for i in worst],
        f"{name}: most confident mistakes ({len(wrong)} errors in {len(labels)})",
        figures / "mistakes.png")
    if scored.localisation is not None:
        explain.figure_for(scored.prepared, scored.localisation, scored.attention,
                           explain.sample_for_figure(labels, predicted, classes),
                           [classes[i] for i in predicted], probabilities.max(1), data.labels,
                           f"{name}: where the model looks (attention rollout, HiResCAM)",
                           figures / "explain.png")
