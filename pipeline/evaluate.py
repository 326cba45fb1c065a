"""Scoring a trained model (or an ensemble) on the test split or on another data set.

Writes, into one evaluation folder: ``report.csv`` (per class), ``predictions.csv`` (probability
of every class per image), ``summary.json`` (the row of the comparison table), DVC plot data
(``roc.csv``, ``precision_recall.csv``, ``reliability.csv``) and PNG figures (``figures/``); and the
headline numbers to ``metrics/<model>/eval.json`` for ``dvc metrics diff``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_curve, roc_curve
from tqdm import tqdm

from pipeline import abstain, explain, plots
from pipeline.adapt import adapt_model
from pipeline.config import as_tuple
from pipeline.data import Preprocess, eval_transform, prepare_all, read_split, stack_images
from pipeline.device import select_device, use_bf16
from pipeline.errors import InputError, PipelineError
from pipeline.inference import predict_logits
from pipeline.io import (
    atomic_path,
    decode_image,
    read_json,
    write_csv,
    write_json,
)
from pipeline.leakage import check_unseen, read_seen
from pipeline.masks import MaskParams, mask_path
from pipeline.metrics import (
    CALIBRATION_BINS,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    restricted_predictions,
)
from pipeline.metrics_ci import bootstrap_intervals
from pipeline.model_card import card_facts, write_model_card
from pipeline.models import load_checkpoint
from pipeline.onnx_runtime import OnnxClassifier
from pipeline.sources import labelled_files

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """How models are scored (``params.yaml: evaluate``; ``wbc evaluate`` builds one from its
    options). ``device`` is not a params key: stages score on the best device found."""

    batch_size: int = 64
    tta: bool = False  # average the 8 flips/rotations
    external: tuple[str, ...] = ()  # other data sets scored beside the test split
    dataset: str | None = None  # None: the test split; else a folder / manifest.csv
    ignore_unknown_classes: bool = False
    strict_images: bool = False  # an unreadable image fails the evaluation (else skipped)
    mistakes: int = 18  # most confident mistakes shown
    abstain_target_accuracy: float | None = 0.995  # None: no abstention threshold
    # external set name -> a folder of that laboratory's unlabelled images: the set is scored
    # again, as <name>-adapted, by the model with batch-norm statistics adapted on them
    adapt: dict[str, str] = field(default_factory=dict)
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "external", as_tuple(self.external))
        adapt = self.adapt or {}
        if not isinstance(adapt, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in adapt.items()):
            raise ValueError(f"evaluate.adapt maps external set names to folders, not {adapt!r}")
        object.__setattr__(self, "adapt", dict(adapt))
        if self.batch_size < 1:
            raise ValueError(f"evaluate.batch_size must be at least 1, not {self.batch_size}")
        if self.mistakes < 0:
            raise ValueError(f"evaluate.mistakes must be 0 or more, not {self.mistakes}")
        target = self.abstain_target_accuracy
        if target is not None and not 0.0 < target <= 1.0:
            raise ValueError(f"evaluate.abstain_target_accuracy must be in (0, 1] or null, "
                             f"not {target}")


@dataclass
class EvalSet:
    """Images to score: absolute paths, canonical labels, and stored masks when there are any."""

    paths: list[Path]
    labels: list[str]
    names: list[str]
    mask_files: list[Path] | None = None

    def subset(self, keep: list[int]) -> EvalSet:
        """The images at positions ``keep``, in that order."""
        pick = lambda items: [items[i] for i in keep] if items is not None else None  # noqa: E731
        return EvalSet(pick(self.paths), pick(self.labels), pick(self.names),
                       pick(self.mask_files))


def held_out_set(split_dir: Path, images_dir: Path, masks_dir: Path, part: str = "test"
                 ) -> EvalSet:
    """One part of the pipeline's own split (test by default), with the mask stage's masks."""
    rows = read_split(split_dir, part)
    return EvalSet([images_dir / p for p in rows["path"]], list(rows["label"]), list(rows["path"]),
                   [mask_path(masks_dir, p) for p in rows["path"]])


def external_set(location: Path) -> EvalSet:
    """Another data set: a folder in either layout, or a ``manifest.csv`` beside its ``images/``."""
    candidates = labelled_files(location)
    return EvalSet([c.source for c in candidates], [c.label for c in candidates],
                   [c.relative for c in candidates])


def evaluation_set(config: EvaluateConfig, split_dir: Path, images_dir: Path,
                   masks_dir: Path) -> EvalSet:
    """``evaluate.dataset`` when set (another data set), else the pipeline's test split."""
    if config.dataset:
        return external_set(Path(config.dataset))
    return held_out_set(split_dir, images_dir, masks_dir)


def restrict_to_classes(data: EvalSet, classes: list[str], ignore_unknown: bool) -> EvalSet:
    """Keep images of classes the model knows; fail (or, if asked, skip) the others."""
    unknown = sorted(set(data.labels) - set(classes))
    if unknown and not ignore_unknown:
        raise InputError(
            f"the model knows {', '.join(classes)} but the data has {', '.join(unknown)}; "
            "set evaluate.ignore_unknown_classes (or --ignore-unknown) to score the rest")
    keep = [i for i, label in enumerate(data.labels) if label in classes]
    if unknown:
        logger.warning("skipping %d images of classes the model does not know: %s",
                       len(data.labels) - len(keep), ", ".join(unknown))
    if not keep:
        raise InputError("no image of a class the model knows")
    return data.subset(keep)


def load_model(path: Path, device: torch.device) -> tuple[torch.nn.Module | OnnxClassifier,
                                                         dict[str, Any]]:
    """A ``model.safetensors`` (PyTorch) or an exported ``.onnx`` (onnxruntime), and metadata."""
    if Path(path).suffix == ".onnx":
        runner = OnnxClassifier(path)
        return runner, runner.metadata
    return load_checkpoint(path, device)


def infer(model: torch.nn.Module | OnnxClassifier, images: torch.Tensor, prep: Preprocess,
          device: torch.device, batch_size: int, tta: bool = False, attention: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Logits (averaged over views with TTA), class-token attention maps and images/s for
    prepared uint8 images (N, 3, S, S)."""
    if isinstance(model, OnnxClassifier):
        return model.infer(images, batch_size, tta)
    normalise = eval_transform(prep)
    model.to(device, memory_format=torch.channels_last)
    starts = range(0, len(images), batch_size)
    batches = (normalise(images[start:start + batch_size]) for start in starts)
    started = time.perf_counter()
    logits, maps = predict_logits(  # fp32 on CPU: the same numbers on every CPU
        model, tqdm(batches, desc="infer", unit="batch", total=len(starts), leave=False),
        device, use_bf16(device), tta=tta, attention=attention)
    return logits, maps, len(images) / (time.perf_counter() - started)


def load_readable(data: EvalSet, prep: Preprocess, mask_params: MaskParams, desc: str,
                  strict: bool = False) -> tuple[EvalSet, torch.Tensor]:
    """The readable part of ``data`` and its images (N, 3, S, S); unreadable files are skipped
    with a warning and counted, or with ``strict`` fail the evaluation."""
    prepared = prepare_all(data.paths, prep, data.mask_files, mask_params, desc)
    keep = [i for i, item in enumerate(prepared) if not isinstance(item, str)]
    reasons = [item for item in prepared if isinstance(item, str)]
    if reasons and strict:
        raise PipelineError(f"{reasons[0]} (evaluate.strict_images / --strict)")
    for reason in reasons:
        logger.warning("skipped unreadable image: %s", reason)
    if not keep:
        raise PipelineError(f"none of the {len(prepared)} images to score could be read")
    if len(keep) == 1:
        raise PipelineError(f"only 1 of the {len(prepared)} images to score could be read: a "
                            f"score and its interval need at least 2 (wbc predict labels one)")
    if len(keep) < len(prepared):
        logger.warning("%s: skipped %d unreadable of %d images", desc, len(prepared) - len(keep),
                       len(prepared))
    return data.subset(keep), stack_images([prepared[i] for i in keep])


@dataclass(frozen=True)
class ScoredValidation:
    """Calibrated probabilities on the validation split (the ensemble fits its temperature and
    the abstention threshold is chosen on them)."""

    names: list[str]
    labels: list[str]
    probabilities: np.ndarray


@dataclass(frozen=True)
class Scored:
    """A model's (or an ensemble's) answers on an evaluation set: what the report is made of."""

    name: str
    classes: list[str]
    data: EvalSet  # the images scored (the readable ones)
    probabilities: np.ndarray  # calibrated: softmax(logits / temperature), one row per image
    uncalibrated: np.ndarray
    temperature: float
    images_per_second: float
    device: str
    training: dict[str, Any]  # the training summary (an ensemble's: members' weights, totals)
    skipped_unreadable: int = 0
    validation: ScoredValidation | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # model, train, preprocess settings
    prepared: torch.Tensor | None = None  # the model's input images (for the explain figure)
    attention: torch.Tensor | None = None  # class-token attention maps (None from ONNX)
    localisation: dict[str, Any] | None = None  # explain.localise's maps and scores
    adapted_on: dict[str, Any] | None = None  # batch-norm adaptation: its folder and images
    # images the model has seen, and scored images near-duplicating them (pipeline.leakage)
    unseen_check: dict[str, int] | None = None


def score_checkpoint(model_path: Path, data: EvalSet, config: EvaluateConfig,
                     validation: EvalSet | None = None, adapt_on: str | None = None,
                     localise: bool = True) -> Scored:
    """Run a trained model over an evaluation set; return everything the report needs.

    With ``validation``, the model's calibrated probabilities on it are returned too (same
    TTA setting), so that an ensemble can fit its own temperature on them. With ``adapt_on``
    (a folder of unlabelled images), the model's batch-norm statistics are first re-estimated
    on them (:mod:`pipeline.adapt`). Without ``localise``, no Grad-CAM and no localisation
    scores (an ensemble member's, which the ensemble's report does not show).
    """
    device = select_device(config.device)
    model, checkpoint = load_model(model_path, device)
    classes = checkpoint["classes"]
    data = restrict_to_classes(data, classes, config.ignore_unknown_classes)
    unseen_check = check_unseen(data.paths, read_seen(checkpoint, model_path), model_path)
    prep = Preprocess(**checkpoint["preprocess"])
    mask_params = MaskParams(**checkpoint["mask_params"])
    adapted_on = checkpoint.get("adapted_on")
    if adapt_on is not None:
        if isinstance(model, OnnxClassifier):
            raise InputError(f"{model_path}: an ONNX export cannot be adapted; adapt the "
                             f"model.safetensors (wbc adapt), then export it")
        adapted_on = adapt_model(model, adapt_on, prep, mask_params, device, config.batch_size)
    temperature = checkpoint["temperature"]
    readable, images = load_readable(data, prep, mask_params, "evaluate", config.strict_images)
    logits, maps, speed = infer(model, images, prep, device, config.batch_size, config.tta,
                                attention=True)
    localisation = None
    if localise and maps is not None:  # an ONNX export has no attention maps nor gradients
        localisation = explain.localise(
            model, images, maps, readable.paths, readable.mask_files, prep, mask_params, device,
            config.batch_size, logits.argmax(1).numpy())
    scored_validation = None
    if validation is not None and checkpoint["summary"].get("refit_on_val"):
        logger.info("%s trained on the validation images too (train.refit): no abstention "
                    "threshold nor ensemble temperature is fitted on them", checkpoint["name"])
        validation = None
    if validation is not None:
        validation, val_images = load_readable(validation, prep, mask_params, "validation",
                                               config.strict_images)
        val_logits, _, _ = infer(model, val_images, prep, device, config.batch_size, config.tta)
        scored_validation = ScoredValidation(
            validation.names, validation.labels,
            torch.softmax(val_logits / temperature, 1).numpy())
    return Scored(
        name=checkpoint["name"], classes=classes, data=readable,
        skipped_unreadable=len(data.paths) - len(readable.paths),
        probabilities=torch.softmax(logits / temperature, 1).numpy(),
        uncalibrated=torch.softmax(logits, 1).numpy(), temperature=temperature,
        images_per_second=speed, device=str(device), prepared=images, attention=maps,
        training=checkpoint["summary"], localisation=localisation, validation=scored_validation,
        adapted_on=adapted_on, unseen_check=unseen_check,
        recipe={key: checkpoint.get(f"{key}_config", {}) for key in ("model", "train")}
        | {"preprocess": checkpoint["preprocess"]})


RESOURCE_KEYS = ("inference_images_per_second", "device")


def write_evaluation(scored: Scored, out_dir: Path, metrics_path: Path, config: EvaluateConfig,
                     resources_path: Path | None = None, raw_dir: Path | None = None,
                     external: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute metrics and write every evaluation output (see the module docstring).

    Throughput and device go to ``resources_path`` (default: ``eval_resources.json`` beside the
    metrics), not to the metrics, so that metric diffs show quality only; with ``raw_dir`` (the
    ingested training data) the model card names its provenance; ``external`` (summaries of
    other data sets, by name) goes beside the test results in ``summary.json`` and the card, and
    their metrics to ``external.json`` beside ``metrics_path``."""
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
        _write_figures(scored, labels, predicted, headline, plot_data, figures, config)
        if abstention:
            write_csv(out_dir / "risk_coverage.csv", curves["test"])
            abstain.risk_coverage_png(curves, abstention, scored.name,
                                      figures / "risk_coverage.png")
            headline |= {f"abstain_{k}": abstention["test"][k] for k in ("coverage", "accuracy")}
            headline["abstain_threshold"] = abstention["threshold"]
    write_json(out_dir / "summary.json", {
        "model": scored.name, "metrics": headline, "training": scored.training,
        "abstention": abstention, "adapted_on": scored.adapted_on,
        "unseen_check": scored.unseen_check,
        "card": card_facts(classes, labels, predicted, per_class, scored.recipe, raw_dir),
        "external": external or {}})
    write_model_card(out_dir / "summary.json", out_dir / "MODEL_CARD.md")
    write_json(metrics_path, {k: v for k, v in headline.items() if k not in RESOURCE_KEYS})
    if external is not None:
        write_json(metrics_path.with_name("external.json"),
                   {set_name: summary["metrics"] for set_name, summary in external.items()})
    write_json(resources_path or metrics_path.with_name("eval_resources.json"),
               {k: headline[k] for k in RESOURCE_KEYS})
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


def evaluate_external(model_path: Path, locations: list[str] | tuple[str, ...],
                      config: EvaluateConfig, out_dir: Path) -> dict[str, Any]:
    """Score a model on every external data set (``evaluate.external``), each into
    ``out_dir/<set name>`` (the folder's own name); return their summaries by name.

    ``out_dir`` is replaced whole, with an ``index.json`` naming the sets (possibly none).
    """
    return score_external_sets(
        lambda _, data, adapt_on: score_checkpoint(model_path, data, config, adapt_on=adapt_on),
        locations, config, out_dir)


def score_external_sets(score: Callable[[str, EvalSet, str | None], Scored],
                        locations: list[str] | tuple[str, ...], config: EvaluateConfig,
                        out_dir: Path) -> dict[str, Any]:
    """``score(set name, images, adaptation folder)`` for every external set, and again as
    ``<name>-adapted`` for those ``evaluate.adapt`` names, written as ``evaluate_external``
    describes; a model's and an ensemble's external evaluations share this."""
    names: dict[str, str] = {}
    for location in map(str, locations):
        path = Path(location)
        name = path.parent.name if path.suffix == ".csv" else path.name
        if name in names.values():
            raise InputError(f"two external sets are named {name!r}: rename one folder")
        names[location] = name
    if unknown := sorted(set(config.adapt) - set(names.values())):
        raise InputError(f"evaluate.adapt names {', '.join(unknown)}, not an external set "
                         f"({', '.join(names.values()) or 'none listed'})")
    runs = [(name, location, None) for location, name in names.items()]
    runs += [(f"{name}-adapted", location, config.adapt[name])
             for location, name in names.items() if name in config.adapt]
    results = {}
    with atomic_path(out_dir) as staging:
        staging.mkdir()
        for name, location, adapt_on in runs:
            logger.info("external set %s: %s", name, location)
            scored = score(name, external_set(Path(location)), adapt_on)
            write_evaluation(scored, staging / name, staging / name / "eval.json", config)
            results[name] = read_json(staging / name / "summary.json")
        write_json(staging / "index.json", {name: str(location) for name, location, _ in runs})
    return results


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
    title = (f"{scored.name}, answering among the {len(present)} classes present\n"
             f"accuracy {headline['restricted_accuracy']:.3f}, macro-F1 "
             f"{headline['restricted_macro_f1']:.3f} ({len(labels)} images)")
    plots.confusion_matrix_png(np.searchsorted(present, labels),
                               np.searchsorted(present, predicted),
                               [scored.classes[i] for i in present], title, path)


def _thumbnail(path: Path, size: int = 200) -> np.ndarray:
    import cv2

    image = decode_image(path)
    scale = size / max(image.shape[:2])
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


def _write_figures(scored: Scored, labels: np.ndarray, predicted: np.ndarray,
                   headline: dict[str, Any], plot_data: dict[str, pd.DataFrame], figures: Path,
                   config: EvaluateConfig) -> None:
    classes, data, name = scored.classes, scored.data, scored.name
    probabilities = scored.probabilities
    title = (f"{name}: accuracy {headline['accuracy']:.3f}, macro-F1 {headline['macro_f1']:.3f}"
             f" ({len(labels)} images)")
    plots.confusion_matrix_png(labels, predicted, classes, title, figures / "confusion.png")
    if headline["absent_classes"]:
        _restricted_confusion_png(scored, labels, headline, figures / "confusion_restricted.png")
    plots.curves_png(plot_data["roc"], plot_data["precision_recall"], classes, title,
                     figures / "roc_pr.png")
    plots.reliability_png(plot_data["reliability"], CALIBRATION_BINS, headline["ece"], name,
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
                           f"{name}: where the model looks (attention rollout, Grad-CAM)",
                           figures / "explain.png")
