"""Scoring a trained model (or an ensemble) on the test split or on another data set.

Writes, into one evaluation folder: ``report.csv`` (per class), ``predictions.csv`` (probability
of every class per image), ``summary.json`` (the row of the comparison table), DVC plot data
(``roc.csv``, ``precision_recall.csv``, ``reliability.csv``) and PNG figures (``figures/``); and the
headline numbers to ``metrics/<model>/eval.json`` for ``dvc metrics diff``.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_curve, roc_curve
from tqdm import tqdm

from pipeline import abstain, explain, plots
from pipeline.data import Preprocess, eval_transform, prepare_file, read_split
from pipeline.device import autocast, select_device, use_bf16
from pipeline.errors import InputError, PipelineError, one_line
from pipeline.io import (
    atomic_path,
    decode_image,
    opencv_threads,
    read_json,
    write_csv,
    write_json,
)
from pipeline.masks import MaskParams, mask_path
from pipeline.metrics import (
    classification_metrics,
    expected_calibration_error,
    restricted_to_present,
)
from pipeline.metrics_ci import bootstrap_intervals
from pipeline.model_card import card_facts, write_model_card
from pipeline.models import load_checkpoint
from pipeline.onnx_runtime import OnnxClassifier
from pipeline.sources import normalize_label, scan_layout

logger = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """Images to score: absolute paths, canonical labels, and stored masks when there are any."""

    paths: list[Path]
    labels: list[str]
    names: list[str]
    mask_files: list[Path] | None = None


def held_out_set(split_dir: Path, images_dir: Path, masks_dir: Path, part: str = "test"
                 ) -> EvalSet:
    """One part of the pipeline's own split (test by default), with the mask stage's masks."""
    rows = read_split(split_dir, part)
    return EvalSet([images_dir / p for p in rows["path"]], list(rows["label"]), list(rows["path"]),
                   [mask_path(masks_dir, p) for p in rows["path"]])


def external_set(location: Path) -> EvalSet:
    """Another data set: a folder in either layout, or a ``manifest.csv`` beside its ``images/``."""
    if location.suffix == ".csv":
        rows = pd.read_csv(location, keep_default_na=False)
        root = location.parent / "images"
        labels = [normalize_label(label) for label in rows["label"]]
        return EvalSet([root / p for p in rows["path"]], labels, list(rows["path"]))
    candidates, _ = scan_layout(location)
    return EvalSet([c.source for c in candidates], [c.label for c in candidates],
                   [c.relative for c in candidates])


def evaluation_set(settings: dict[str, Any], split_dir: Path, images_dir: Path,
                   masks_dir: Path) -> EvalSet:
    """``evaluate.dataset`` when set (another data set), else the pipeline's test split."""
    if settings["dataset"]:
        return external_set(Path(settings["dataset"]))
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
    pick = lambda items: [items[i] for i in keep] if items is not None else None  # noqa: E731
    return EvalSet(pick(data.paths), pick(data.labels), pick(data.names), pick(data.mask_files))


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and 90-degree rotations of a batch (smear images have no up or left)."""
    rotations = [torch.rot90(images, k, dims=(2, 3)) for k in range(4)]
    return rotations + [view.flip(3) for view in rotations]


def load_model(path: Path, device: torch.device) -> tuple[torch.nn.Module | OnnxClassifier,
                                                         dict[str, Any]]:
    """A ``model.safetensors`` (PyTorch) or an exported ``.onnx`` (onnxruntime), and metadata."""
    if Path(path).suffix == ".onnx":
        runner = OnnxClassifier(path)
        return runner, runner.metadata
    return load_checkpoint(path, device)


@torch.no_grad()
def infer(model: torch.nn.Module | OnnxClassifier, images: torch.Tensor, prep: Preprocess,
          device: torch.device, batch_size: int, tta: bool = False, attention: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Logits (averaged over views with TTA), class-token attention maps and images/s."""
    if isinstance(model, OnnxClassifier):
        return model.infer(images, batch_size, tta)
    normalise = eval_transform(prep)
    amp = use_bf16(device)  # fp32 on CPU: the same numbers on every CPU
    model.eval().to(device, memory_format=torch.channels_last)
    outputs, maps = [], []
    started = time.perf_counter()
    for start in tqdm(range(0, len(images), batch_size), desc="infer", unit="batch",
                      leave=False):
        batch = normalise(images[start:start + batch_size]).to(device)
        views = dihedral_views(batch) if tta else [batch]
        logits = 0
        for view in views:
            with autocast(device, amp):
                logits = logits + model(view.contiguous(memory_format=torch.channels_last)).float()
            if attention and view is views[0]:
                maps.append(model.last_attention.float().cpu())
        outputs.append((logits / len(views)).cpu())
    seconds = time.perf_counter() - started
    return torch.cat(outputs), torch.cat(maps) if maps else None, len(images) / seconds


def prepare_or_reason(job: tuple[Path, Path | None, Preprocess, MaskParams]
                      ) -> np.ndarray | str:
    """The model input for one file, or the one-line reason it cannot be read."""
    try:
        return prepare_file(job)
    except (PipelineError, OSError, ValueError, MemoryError) as error:
        return one_line(error)


def prepare_all(paths: list[Path], prep: Preprocess, mask_files: list[Path] | None,
                mask_params: MaskParams, desc: str, workers: int | None = None
                ) -> list[np.ndarray | str]:
    """Decode, mask and resize every file in parallel; a reason string where one is unreadable."""
    masks = mask_files if prep.mask_mode != "none" and mask_files else [None] * len(paths)
    jobs = [(p, m, prep, mask_params) for p, m in zip(paths, masks, strict=True)]
    with opencv_threads(1), ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        return list(tqdm(pool.map(prepare_or_reason, jobs, chunksize=16), total=len(jobs),
                         desc=desc, unit="img", leave=False))


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
    if len(keep) < len(prepared):
        logger.warning("%s: skipped %d unreadable of %d images", desc, len(prepared) - len(keep),
                       len(prepared))
    pick = lambda items: [items[i] for i in keep] if items is not None else None  # noqa: E731
    subset = EvalSet(pick(data.paths), pick(data.labels), pick(data.names),
                     pick(data.mask_files))
    images = torch.from_numpy(np.stack([prepared[i] for i in keep])).permute(0, 3, 1, 2)
    return subset, images.contiguous()


def score_checkpoint(model_path: Path, data: EvalSet, settings: dict[str, Any],
                     validation: EvalSet | None = None) -> dict[str, Any]:
    """Run a trained model over an evaluation set; return everything the report needs.

    With ``validation``, the model's calibrated probabilities on it are returned too (same
    TTA setting), so that an ensemble can fit its own temperature on them.
    """
    device = select_device(settings.get("device", "auto"))
    model, checkpoint = load_model(model_path, device)
    classes = checkpoint["classes"]
    data = restrict_to_classes(data, classes, settings.get("ignore_unknown_classes", False))
    prep = Preprocess(**checkpoint["preprocess"])
    mask_params = MaskParams(**checkpoint["mask_params"])
    temperature = checkpoint["temperature"]

    strict = settings.get("strict_images", False)

    def run(subset: EvalSet, desc: str, attention: bool = False
            ) -> tuple[EvalSet, torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
        subset, images = load_readable(subset, prep, mask_params, desc, strict)
        return subset, images, *infer(model, images, prep, device, settings["batch_size"],
                                      settings["tta"], attention=attention)

    readable, images, logits, maps, speed = run(data, "evaluate", attention=True)
    scored = {
        "name": checkpoint["name"], "classes": classes, "data": readable,
        "skipped_unreadable": len(data.paths) - len(readable.paths),
        "probabilities": torch.softmax(logits / temperature, 1).numpy(),
        "uncalibrated": torch.softmax(logits, 1).numpy(),
        "temperature": temperature, "images_per_second": speed, "device": str(device),
        "prepared": images, "attention": maps, "training": checkpoint["summary"],
        "recipe": {key: checkpoint.get(f"{key}_config", {}) for key in ("model", "train")}
        | {"preprocess": checkpoint["preprocess"]},
    }
    if maps is not None:  # an ONNX export has no attention maps and no gradients
        scored["localisation"] = explain.localise(
            model, images, maps, readable.paths, readable.mask_files, prep, mask_params, device,
            settings["batch_size"], logits.argmax(1).numpy())
    if validation is not None:
        validation, _, val_logits, _, _ = run(validation, "validation")
        scored["validation"] = {"names": validation.names, "labels": validation.labels,
                                "probabilities": torch.softmax(val_logits / temperature, 1).numpy()}
    return scored


RESOURCE_KEYS = ("inference_images_per_second", "device")


def write_evaluation(scored: dict[str, Any], out_dir: Path, metrics_path: Path,
                     settings: dict[str, Any], resources_path: Path | None = None,
                     raw_dir: Path | None = None, external: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """Compute metrics and write every evaluation output (see the module docstring).

    Throughput and device go to ``resources_path`` (default: ``eval_resources.json`` beside the
    metrics), not to the metrics, so that metric diffs show quality only; with ``raw_dir`` (the
    ingested training data) the model card names its provenance; ``external`` (summaries of
    other data sets, by name) goes beside the test results in ``summary.json`` and the card."""
    classes, data = scored["classes"], scored["data"]
    index = {label: i for i, label in enumerate(classes)}
    labels = np.array([index[label] for label in data.labels])
    probabilities = scored["probabilities"]
    headline, per_class = classification_metrics(labels, probabilities, classes)
    headline["skipped_unreadable"] = scored.get("skipped_unreadable", 0)
    headline |= _interval_columns(bootstrap_intervals(labels, probabilities.argmax(1)))
    if headline["absent_classes"]:
        headline |= _restricted_scores(labels, probabilities)
    if headline["absent_classes"]:
        logger.warning("%s: no image of %s in the data; macro averages are over the %d classes "
                       "present", scored["name"], headline["absent_classes"],
                       headline["classes_scored"])
    headline["ece_uncalibrated"] = expected_calibration_error(scored["uncalibrated"], labels)
    headline |= {"temperature": scored["temperature"], "tta": bool(settings["tta"]),
                 "inference_images_per_second": scored["images_per_second"],
                 "device": scored["device"]}
    predicted = probabilities.argmax(1)
    predictions = pd.DataFrame({
        "path": data.names, "label": data.labels, "predicted": [classes[i] for i in predicted],
        "confidence": probabilities.max(1),
        **{f"p_{name}": probabilities[:, i] for i, name in enumerate(classes)},
        **scored.get("localisation", {}).get("scores", {}),
    })
    if "localisation" in scored:
        headline |= explain.mean_scores(scored["localisation"]["scores"])
    write_csv(out_dir / "predictions.csv", predictions)
    write_csv(out_dir / "report.csv", pd.DataFrame(per_class))
    with atomic_path(out_dir / "probabilities.npz") as tmp, open(tmp, "wb") as handle:
        validation = scored.get("validation") or {"names": [], "probabilities": np.zeros(0)}
        np.savez(handle, calibrated=probabilities, uncalibrated=scored["uncalibrated"],
                 classes=np.array(classes), names=np.array(data.names),
                 val_calibrated=validation["probabilities"],
                 val_names=np.array(validation["names"]))
    _write_curve_data(labels, probabilities, classes, out_dir)
    abstention, curves = _abstention(scored, labels, settings)
    with atomic_path(out_dir / "figures") as figures:
        _write_figures(scored, labels, predicted, headline, figures, settings)
        if abstention:
            write_csv(out_dir / "risk_coverage.csv", curves["test"])
            abstain.risk_coverage_png(curves, abstention, scored["name"],
                                      figures / "risk_coverage.png")
            headline |= {f"abstain_{k}": abstention["test"][k] for k in ("coverage", "accuracy")}
            headline["abstain_threshold"] = abstention["threshold"]
    write_json(out_dir / "summary.json", {
        "model": scored["name"], "metrics": headline, "training": scored["training"],
        "abstention": abstention,
        "card": card_facts(classes, labels, predicted, per_class, scored.get("recipe", {}),
                           raw_dir),
        "external": external or {}})
    write_model_card(out_dir / "summary.json", out_dir / "MODEL_CARD.md")
    write_json(metrics_path, {k: v for k, v in headline.items() if k not in RESOURCE_KEYS})
    write_json(resources_path or metrics_path.with_name("eval_resources.json"),
               {k: headline[k] for k in RESOURCE_KEYS})
    logger.info("%s: accuracy %.4f, macro-F1 %.4f, ECE %.4f (uncalibrated %.4f) on %d images",
                scored["name"], headline["accuracy"], headline["macro_f1"], headline["ece"],
                headline["ece_uncalibrated"], len(labels))
    return headline


def evaluate_external(model_path: Path, locations: list[str], settings: dict[str, Any],
                      out_dir: Path) -> dict[str, Any]:
    """Score a model on every external data set (``evaluate.external``), each into
    ``out_dir/<set name>`` (the folder's own name); return their summaries by name.

    ``out_dir`` is replaced whole, with an ``index.json`` naming the sets (possibly none).
    """
    results = {}
    with atomic_path(out_dir) as staging:
        staging.mkdir()
        for location in map(Path, locations):
            name = location.parent.name if location.suffix == ".csv" else location.name
            if name in results:
                raise InputError(f"two external sets are named {name!r}: rename one folder")
            logger.info("external set %s: %s", name, location)
            scored = score_checkpoint(model_path, external_set(location), settings)
            write_evaluation(scored, staging / name, staging / name / "eval.json", settings)
            results[name] = read_json(staging / name / "summary.json")
        write_json(staging / "index.json", {name: str(location) for name, location in
                                            zip(results, locations, strict=True)})
    return results


def _interval_columns(intervals: dict[str, list[float]]) -> dict[str, float]:
    """``accuracy_ci95_low`` / ``_high`` ...: flat keys, as ``dvc metrics`` shows them."""
    return {f"{name}_ci95_{side}": bound for name, (low, high) in intervals.items()
            for side, bound in (("low", low), ("high", high))}


def _restricted_scores(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Scores when the model may only answer with the classes the data holds."""
    restricted, _ = restricted_to_present(labels, probabilities)
    predicted = restricted.argmax(1)
    scores = {"restricted_accuracy": float((predicted == labels).mean()),
              "restricted_balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
              "restricted_macro_f1": float(f1_score(labels, predicted, average="macro",
                                                    zero_division=0))}
    return scores | {f"restricted_{k}": v for k, v in
                     _interval_columns(bootstrap_intervals(labels, predicted)).items()}


def _abstention(scored: dict[str, Any], labels: np.ndarray, settings: dict[str, Any]
                ) -> tuple[dict[str, Any] | None, dict[str, pd.DataFrame]]:
    """Threshold picked on validation and its test coverage/accuracy; None without validation."""
    validation = scored.get("validation")
    target = settings.get("abstain_target_accuracy")
    if not validation or not validation.get("labels") or target is None:
        return None, {}
    index = {label: i for i, label in enumerate(scored["classes"])}
    val_labels = np.array([index[label] for label in validation["labels"]])
    summary = abstain.abstention_summary(validation["probabilities"], val_labels,
                                         scored["probabilities"], labels, target)
    return summary, {"validation": abstain.risk_coverage(validation["probabilities"], val_labels),
                     "test": abstain.risk_coverage(scored["probabilities"], labels)}


def _write_curve_data(labels: np.ndarray, probabilities: np.ndarray, classes: list[str],
                      out_dir: Path) -> None:
    """One-vs-rest ROC and precision-recall points (one file each, a ``class`` column naming
    the series) and reliability bins, for ``dvc plots``."""
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
    write_csv(out_dir / "roc.csv", pd.concat(roc or [empty], ignore_index=True))
    write_csv(out_dir / "precision_recall.csv", pd.concat(pr or [empty], ignore_index=True))
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    bins = np.minimum((confidence * 10).astype(int), 9)
    reliability = pd.DataFrame({"bin": bins, "confidence": confidence, "accuracy": correct})
    write_csv(out_dir / "reliability.csv",
              reliability.groupby("bin").agg(confidence=("confidence", "mean"),
                                             accuracy=("accuracy", "mean"),
                                             images=("accuracy", "size")).reset_index())


def _thumbnail(path: Path, size: int = 200) -> np.ndarray:
    import cv2

    image = decode_image(path)
    scale = size / max(image.shape[:2])
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


def _write_figures(scored: dict[str, Any], labels: np.ndarray, predicted: np.ndarray,
                   headline: dict[str, Any], figures: Path, settings: dict[str, Any]) -> None:
    classes, data, name = scored["classes"], scored["data"], scored["name"]
    probabilities = scored["probabilities"]
    title = (f"{name}: accuracy {headline['accuracy']:.3f}, macro-F1 {headline['macro_f1']:.3f}"
             f" ({len(labels)} images)")
    plots.confusion_matrix_png(labels, predicted, classes, title, figures / "confusion.png")
    plots.curves_png(labels, probabilities, classes, title, figures / "roc_pr.png")
    plots.reliability_png(labels, probabilities, headline["ece"], name,
                          figures / "reliability.png")
    wrong = np.nonzero(predicted != labels)[0]
    worst = wrong[np.argsort(-probabilities[wrong].max(1))][: settings["mistakes"]]
    plots.image_grid_png(
        [_thumbnail(data.paths[i]) for i in worst],
        [f"true {data.labels[i]}\npred {classes[predicted[i]]} ({probabilities[i].max():.0%})"
         for i in worst],
        f"{name}: most confident mistakes ({len(wrong)} errors in {len(labels)})",
        figures / "mistakes.png")
    if "localisation" in scored:
        explain.figure_for(scored["prepared"], scored["localisation"], scored["attention"],
                           explain.sample_for_figure(labels, predicted, classes),
                           [classes[i] for i in predicted], probabilities.max(1), data.labels,
                           f"{name}: where the model looks (attention rollout, Grad-CAM)",
                           figures / "explain.png")
