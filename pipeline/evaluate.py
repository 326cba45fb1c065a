"""Scoring a trained model (or an ensemble) on the test split or on another data set, and every
external set beside it; :mod:`pipeline.reports` writes what comes out. The names an evaluation
is described with (:mod:`pipeline.eval_sets`) and written by are importable from here too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import explain
from pipeline.adapt import adapt_model
from pipeline.data import Preprocess, prepare_all, stack_images
from pipeline.device import select_device
from pipeline.errors import InputError, PipelineError
from pipeline.eval_sets import (
    EvalSet,
    EvaluateConfig,
    Scored,
    ScoredValidation,
    evaluation_set,
    external_set,
    held_out_set,
    restrict_to_classes,
)
from pipeline.io import atomic_path, read_json, write_json
from pipeline.leakage import check_unseen, read_seen
from pipeline.masks import MaskParams
from pipeline.model_file import ModelFile
from pipeline.onnx_runtime import OnnxClassifier
from pipeline.reports import write_evaluation
from pipeline.scoring import Runner, calibrated, infer, load_model, warn_if_synthetic

__all__ = ["EvalSet", "EvaluateConfig", "Scored", "ScoredValidation", "evaluate_external",
           "evaluation_set", "external_set", "held_out_set", "infer", "load_readable",
           "restrict_to_classes", "score_checkpoint", "score_external_sets", "write_evaluation"]

logger = logging.getLogger(__name__)


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
    model, model_file = load_model(model_path, device)
    warn_if_synthetic([(model_path, model_file)])
    classes, prep, mask_params = model_file.classes, model_file.preprocess, model_file.mask_params
    data = restrict_to_classes(data, classes, config.ignore_unknown_classes)
    unseen_check = check_unseen(data.paths, read_seen(model_file.to_metadata(), model_path),
                                model_path)
    adapted_on = model_file.adapted_on
    if adapt_on is not None:
        if isinstance(model, OnnxClassifier):
            raise InputError(f"{model_path}: an ONNX export cannot be adapted; adapt the "
                             f"model.safetensors (wbc adapt), then export it")
        adapted_on = adapt_model(model, adapt_on, prep, mask_params, device, config.batch_size)
    readable, images = load_readable(data, prep, mask_params, "evaluate", config.strict_images)
    logits, maps, speed = infer(model, images, prep, device, config.batch_size, config.tta,
                                attention=True)
    probabilities = _finite(calibrated(logits, model_file.temperature), model_path)
    localisation = None
    if localise and maps is not None:  # an ONNX export has no attention maps nor gradients
        localisation = explain.localise(
            model, images, maps, readable.paths, readable.mask_files, prep, mask_params, device,
            config.gradient_batch_size, probabilities.argmax(1))
    if validation is not None and model_file.summary.get("refit_on_val"):
        logger.info("%s trained on the validation images too (train.refit): no abstention "
                    "threshold nor ensemble temperature is fitted on them", model_file.name)
        validation = None
    return Scored(
        name=model_file.name, classes=classes, data=readable,
        skipped_unreadable=len(data.paths) - len(readable.paths),
        probabilities=probabilities, uncalibrated=calibrated(logits, 1.0),
        temperature=model_file.temperature, images_per_second=speed, device=str(device),
        prepared=images, attention=maps, training=model_file.summary,
        localisation=localisation, adapted_on=adapted_on, unseen_check=unseen_check,
        validation=None if validation is None else _score_validation(
            model, model_file, validation, config, device, model_path),
        training_data=None if model_file.training_data is None
        else model_file.training_data.model_dump(),
        recipe={"model": asdict(model_file.model_config), "train": model_file.train_config,
                "preprocess": prep.to_dict()})


def _score_validation(model: Runner, model_file: ModelFile, validation: EvalSet,
                      config: EvaluateConfig, device: torch.device, model_path: Path
                      ) -> ScoredValidation:
    """The model's calibrated probabilities on the validation split (same TTA setting)."""
    prep = model_file.preprocess
    validation, images = load_readable(validation, prep, model_file.mask_params, "validation",
                                       config.strict_images)
    logits, _, _ = infer(model, images, prep, device, config.batch_size, config.tta)
    return ScoredValidation(validation.names, validation.labels,
                            _finite(calibrated(logits, model_file.temperature), model_path))


def _finite(probabilities: np.ndarray, model_path: Path) -> np.ndarray:
    """``probabilities`` if all finite; a PipelineError otherwise (never a NaN metric)."""
    if bad := int((~np.isfinite(probabilities).all(1)).sum()):
        raise PipelineError(f"{model_path}: the model's output is not a finite number for {bad} "
                            f"of {len(probabilities)} images")
    return probabilities


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
            write_evaluation(scored, staging / name, staging / name / "eval.json", config,
                             data_name=name)
            results[name] = read_json(staging / name / "summary.json")
        write_json(staging / "index.json", {name: str(location) for name, location, _ in runs})
    return results
