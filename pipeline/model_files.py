"""Models on disk: the checkpoint's file name, and the ensemble description (``ensemble.json``)
that ``wbc predict`` reads like a model file: member checkpoints, weights and a temperature.

Kept free of torch, so that a stage which only names model files imports nothing heavy.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError, one_line
from pipeline.io import read_json, write_json

MODEL_FILE = "model.safetensors"
LEGACY_MODEL_FILE = "model.pt"  # pickled: refused with a message


def write_spec(path: Path, members: dict[str, Path], weights: dict[str, float],
               temperature: float = 1.0) -> None:
    """Record the ensemble for ``wbc predict``: member checkpoints (or ensemble files: an
    ensemble of ensembles), weights and temperature."""
    write_json(path, {
        "kind": "ensemble",
        "members": [{"name": name, "checkpoint": os.path.relpath(checkpoint, path.parent),
                     "weight": weights[name]}
                    for name, checkpoint in members.items()],
        "temperature": temperature,
    })


def write_fold_average(path: Path, fold_models: list[Path]) -> None:
    """The fold models (checkpoints or ensemble files, fold 0 first) as one equally weighted
    ensemble: the model that cross-validation's ``fold_average`` figures score."""
    if not fold_models:
        raise PipelineError(f"{path}: no fold models to average")
    members = {f"fold{fold}": model for fold, model in enumerate(fold_models)}
    write_spec(path, members, {name: 1 / len(members) for name in members})


def read_spec(path: Path) -> dict[str, Any]:
    """An ensemble file: ``members`` (checkpoints -- or ensemble files -- relative to the file
    itself, resolved here; positive weights) and ``temperature``."""
    try:
        spec = read_json(path)
        members = [{**m, "checkpoint": (Path(path).parent / m["checkpoint"]).resolve(),
                    "weight": float(m["weight"])} for m in spec["members"]]
        temperature = float(spec.get("temperature", 1.0))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise PipelineError(f"{path}: not an ensemble description ({one_line(error)})") from error
    if spec.get("kind") != "ensemble" or not members:
        raise PipelineError(f"{path}: not an ensemble description")
    for name, value in [(f"weight of {m.get('name')}", m["weight"]) for m in members] + [
            ("temperature", temperature)]:
        if not (math.isfinite(value) and value > 0):
            raise PipelineError(f"{path}: the {name} must be a positive number, not {value}")
    return {"members": members, "temperature": temperature}
