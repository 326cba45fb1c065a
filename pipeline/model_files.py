"""Models on disk: the checkpoint's file name, and the ensemble description (``ensemble.json``)
that ``wbc predict`` reads like a model file: member checkpoints, weights and a temperature,
validated by one schema (:class:`EnsembleSchema`).

Kept free of torch, so that a stage which only names model files imports nothing heavy.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import PipelineError, one_line
from pipeline.io import read_json, write_json

MODEL_FILE = "model.safetensors"
LEGACY_MODEL_FILE = "model.pt"  # pickled: refused with a message
TEMPERATURE_RANGE = (1e-3, 1e3)  # logits / T must not overflow float32
MAX_WEIGHT = 1e6
MAX_MEMBERS = 64


def write_spec(path: Path, members: dict[str, Path], weights: dict[str, float],
               temperature: float = 1.0, abstain_threshold: float | None = None) -> None:
    """Record the ensemble for ``wbc predict``: member checkpoints (or ensemble files: an
    ensemble of ensembles), weights, temperature and abstention threshold."""
    write_json(path, {
        "kind": "ensemble",
        "members": [{"name": name, "checkpoint": os.path.relpath(checkpoint, path.parent),
                     "weight": weights[name]}
                    for name, checkpoint in members.items()],
        "temperature": temperature,
        "abstain_threshold": abstain_threshold,
    })


def write_fold_average(path: Path, fold_models: list[Path]) -> None:
    """The fold models (checkpoints or ensemble files, fold 0 first) as one equally weighted
    ensemble: the model that cross-validation's ``fold_average`` figures score."""
    if not fold_models:
        raise PipelineError(f"{path}: no fold models to average")
    members = {f"fold{fold}": model for fold, model in enumerate(fold_models)}
    write_spec(path, members, {name: 1 / len(members) for name in members})


class EnsembleMember(BaseModel):
    """One member of an ensemble file: a checkpoint or ensemble file and its weight."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    name: str = Field(min_length=1, max_length=200)
    checkpoint: str = Field(min_length=1, max_length=4096)
    weight: float

    @model_validator(mode="after")
    def _positive_weight(self) -> EnsembleMember:
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"the weight of {self.name} must be a positive number, "
                             f"not {self.weight}")
        if self.weight > MAX_WEIGHT:
            raise ValueError(f"the weight of {self.name} must be at most {MAX_WEIGHT:g}, "
                             f"not {self.weight:g}")
        return self


class EnsembleSchema(BaseModel):
    """An ensemble file (``ensemble.json``): its kind, members, temperature and, once the
    ensemble stage has evaluated it, its abstention threshold."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    kind: Literal["ensemble"]
    members: list[EnsembleMember] = Field(min_length=1, max_length=MAX_MEMBERS)
    temperature: float = 1.0
    abstain_threshold: float | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"the temperature must be a positive number, not {value}")
        low, high = TEMPERATURE_RANGE
        if not low <= value <= high:
            raise ValueError(f"the temperature must be in [{low:g}, {high:g}], not {value:g}")
        return value

    @field_validator("abstain_threshold")
    @classmethod
    def _threshold(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"the abstain_threshold must be in [0, 1] or null, not {value}")
        return value


def schema_problem(error: ValidationError) -> str:
    """The first problem of a failed validation in one line: the key, what is allowed, and the
    value found (a validator's own message as it is)."""
    first = error.errors(include_url=False)[0]
    if first["type"] == "value_error":
        message = str(first["ctx"]["error"])
        key = ".".join(str(part) for part in first["loc"] if not isinstance(part, int))
        return one_line(ValueError(message if message.startswith("the ") or not key
                                   else f"{key} {message}"))
    key = ".".join(map(str, first["loc"])) or "the file"
    found = repr(first.get("input"))
    found = found if len(found) <= 60 else found[:57] + "..."
    return one_line(ValueError(f"{key}: {first['msg'].lower()}, not {found}"))


def read_spec(path: Path) -> dict[str, Any]:
    """An ensemble file: ``members`` (checkpoints -- or ensemble files -- relative to the file
    itself, resolved here; positive weights), ``temperature`` and ``abstain_threshold``."""
    try:
        spec = EnsembleSchema.model_validate(read_json(path))
    except ValidationError as error:
        raise PipelineError(f"{path}: {schema_problem(error)}") from None
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path}: not an ensemble description ({one_line(error)})") from error
    members = [{"name": m.name, "checkpoint": (Path(path).parent / m.checkpoint).resolve(),
                "weight": m.weight} for m in spec.members]
    if not math.isfinite(sum(member["weight"] for member in members)):
        raise PipelineError(f"{path}: the weights' sum is not a finite number")
    return {"members": members, "temperature": spec.temperature,
            "abstain_threshold": spec.abstain_threshold}
