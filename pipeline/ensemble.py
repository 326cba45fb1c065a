"""Ensembles: the (validation-weighted) average of members' temperature-calibrated probabilities.

Averaging calibrated members still gives a badly calibrated ensemble (members that disagree
flatten it), so the ensemble fits a temperature of its own on the validation split.
An ensemble is described by ``ensemble.json`` (members' checkpoints, weights and temperature),
which ``wbc predict`` accepts like a model file. Evaluating it reuses the members' test and
validation probabilities from their evaluation folders, so no member is run twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.eval_sets import (
    EvalSet,
    EvaluateConfig,
    Scored,
    ScoredValidation,
    restrict_to_classes,
)
from pipeline.evaluate import score_external_sets
from pipeline.io import read_json
from pipeline.leakage import ensemble_check
from pipeline.metrics import fit_temperature
from pipeline.scoring import log_probabilities, temper

logger = logging.getLogger(__name__)

WEIGHTINGS = ("mean", "val_f1")


@dataclass(frozen=True)
class EnsembleConfig:
    """Which evaluated models are averaged, and how (``params.yaml: ensemble``)."""

    members: tuple[str, ...]
    weighting: str = "val_f1"  # mean | val_f1 (weights proportional to validation macro-F1)
    temperature_scaling: bool = True  # fit the ensemble's own temperature on validation

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members or ()))
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"ensemble.weighting must be one of {', '.join(WEIGHTINGS)}, "
                             f"not {self.weighting!r}")
        if not self.members:
            raise ValueError("ensemble.members is empty")


def member_weights(config: EnsembleConfig, val_f1: dict[str, float]) -> dict[str, float]:
    """Normalised weights: equal, or proportional to each member's validation macro-F1."""
    raw = {m: (val_f1[m] if config.weighting == "val_f1" else 1.0) for m in config.members}
    total = sum(raw.values())
    return {m: w / total for m, w in raw.items()}


def _load_members(eval_dirs: dict[str, Path]) -> dict[str, Any]:
    """Each member's saved probabilities (``probabilities.npz`` of its evaluation folder)."""
    for name, folder in eval_dirs.items():
        if not (folder / "probabilities.npz").is_file():
            raise PipelineError(f"member {name} has no evaluation in {folder}; "
                                "rerun its evaluate stage")
    return {name: np.load(folder / "probabilities.npz") for name, folder in eval_dirs.items()}


def combine_evaluations(eval_dirs: dict[str, Path], weights: dict[str, float], data: EvalSet,
                        validation: EvalSet | None = None, temperature: float = 1.0) -> Scored:
    """Average members' saved probabilities on ``data`` into one scored result.

    Every member must have been evaluated on exactly these images with the same classes. With
    ``validation``, the ensemble's temperature is fitted on the members' saved validation
    probabilities (which must cover exactly those images); without it, ``temperature`` is used
    (an external set gets the one fitted on the validation split). A member that trained on the
    validation images (``train.refit``) leaves nothing to fit on: ``temperature`` is kept.
    """
    loaded = _load_members(eval_dirs)
    summaries = {name: read_json(folder / "summary.json") for name, folder in eval_dirs.items()}
    if validation is not None and (refit := [name for name, s in summaries.items()
                                             if s["training"].get("refit_on_val")]):
        logger.warning("%s trained on the validation images (train.refit): the ensemble keeps "
                       "temperature %g and picks no abstention threshold", ", ".join(refit),
                       temperature)
        validation = None
    classes = list(next(iter(loaded.values()))["classes"])
    for name, arrays in loaded.items():
        if list(arrays["classes"]) != classes or list(arrays["names"]) != data.names:
            raise ValueError(f"member {name} was evaluated on other images or classes; "
                             "rerun its evaluate stage")
        if validation is not None and list(arrays["val_names"]) != validation.names:
            raise ValueError(f"member {name} has no probabilities for these validation images; "
                             "rerun its evaluate stage")
    keys = ("calibrated", "uncalibrated") + (("val_calibrated",) if validation else ())
    average = {key: sum(weights[name] * loaded[name][key] for name in loaded) for key in keys}
    if validation is not None:
        labels = torch.tensor([classes.index(label) for label in validation.labels])
        temperature = fit_temperature(log_probabilities(average["val_calibrated"]), labels)
    seconds_per_image = sum(1.0 / s["metrics"]["inference_images_per_second"]
                            for s in summaries.values())
    scored_validation = None if validation is None else ScoredValidation(
        validation.names, validation.labels, temper(average["val_calibrated"], temperature))
    return Scored(
        name="ensemble", classes=classes, data=data, validation=scored_validation,
        unseen_check=ensemble_check([s.get("unseen_check") for s in summaries.values()]),
        probabilities=temper(average["calibrated"], temperature),
        uncalibrated=average["uncalibrated"],
        temperature=temperature, images_per_second=1.0 / seconds_per_image,
        device=next(iter(summaries.values()))["metrics"]["device"],
        training={
            "members": weights,
            "parameters": sum(s["training"]["parameters"] for s in summaries.values()),
            "train_seconds": sum(s["training"]["train_seconds"] for s in summaries.values()),
        },
    )


def combine_external(eval_dirs: dict[str, Path], weights: dict[str, float], data: EvalSet,
                     temperature: float, ignore_unknown: bool) -> Scored:
    """The ensemble on an external set that its members' evaluate stages scored (each member's
    ``external/<set>`` folder): the images they scored, with the ensemble's temperature."""
    first = next(iter(_load_members(eval_dirs).values()))
    known = restrict_to_classes(data, list(first["classes"]), ignore_unknown)
    position = {name: i for i, name in enumerate(known.names)}
    readable = known.subset([position[name] for name in first["names"] if name in position])
    combined = combine_evaluations(eval_dirs, weights, readable, temperature=temperature)
    return replace(combined, skipped_unreadable=len(known.names) - len(readable.names))


def evaluate_ensemble_external(eval_root: Path, weights: dict[str, float], temperature: float,
                               config: EvaluateConfig, out_dir: Path) -> dict[str, Any]:
    """The ensemble on every external set (``evaluate.external``, and ``<set>-adapted`` for
    those ``evaluate.adapt`` names) that its members' evaluate stages scored into
    ``eval_root/<member>/external``, written as ``evaluate_external`` does."""
    return score_external_sets(  # an adapted set: the members' adapted evaluations
        lambda name, data, _adapt_on: combine_external(
            {m: eval_root / m / "external" / name for m in weights}, weights, data, temperature,
            config.ignore_unknown_classes),
        config.external, config, out_dir)
