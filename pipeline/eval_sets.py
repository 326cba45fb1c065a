"""What an evaluation scores and what comes out of it: its settings (``params.yaml:
evaluate``), the images to score (the test split, or another data set) and a model's answers on
them, which :mod:`pipeline.reports` writes out."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import as_tuple
from pipeline.errors import InputError
from pipeline.io import read_split
from pipeline.masks import mask_path
from pipeline.sources import labelled_files

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """How models are scored (``params.yaml: evaluate``; ``wbc evaluate`` builds one from its
    options). ``device`` is not a params key: stages score on the best device found."""

    batch_size: int = 64
    gradient_batch_size: int = 16  # images per Grad-CAM backward pass (its memory)
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
        for key in ("batch_size", "gradient_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"evaluate.{key} must be at least 1, not {getattr(self, key)}")
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
    training_data: dict[str, Any] | None = None  # the model file's record (source, images)
