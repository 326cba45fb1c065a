"""The model file: one typed record of a trained model, read and written here only.

A ``model.safetensors`` holds the weights and, as JSON in its header metadata, everything needed
to use and to trust them: classes, model and preprocessing configs, temperature, what the model
was trained on (source, whether synthetic, image counts, the digests the seen-image guard of
:mod:`pipeline.leakage` uses) and, once evaluated, its abstention threshold. An ONNX export
carries the same record. A model file is hostile input: its metadata is validated for type and
range (:class:`MetadataSchema`) before anything is allocated, and a backbone is only ever one
that timm builds offline, by name, without weights (never a hub name, URL or path).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
import timm
import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from pipeline.data import Preprocess
from pipeline.errors import PipelineError, one_line
from pipeline.io import read_csv, read_json
from pipeline.masks import MaskParams
from pipeline.model_files import LEGACY_MODEL_FILE, MODEL_FILE, TEMPERATURE_RANGE, schema_problem

CHECKPOINT_FORMAT = 2  # 1 was a pickled model.pt, never loaded any more
METADATA_KEY = "wbc_checkpoint"
REQUIRED_KEYS = ("format", "name", "classes", "model_config", "preprocess", "mask_params",
                 "temperature", "summary")
PICKLE_PROTOCOLS = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))
MAX_CLASSES = 1000


class CheckpointError(PipelineError, ValueError):
    """A model file is not a readable checkpoint of this pipeline (one line naming the file)."""


@dataclass(frozen=True)
class ModelConfig:
    """One entry of ``params.yaml: models``."""

    backbone: str
    image_size: int
    pretrained: bool | str = False
    weights_file: str | None = None
    embed_dim: int = 256
    heads: int = 4
    depth: int = 1
    dropout: float = 0.1
    drop_path: float = 0.0
    output_stride: int = 32
    registers: int = 0

    def __post_init__(self) -> None:
        if self.pretrained not in (True, False, "if_available"):
            raise ValueError(f"pretrained must be true, false or if_available, "
                             f"not {self.pretrained!r}")


def _offline_backbone(name: str) -> str:
    """A timm architecture, by name (an optional ``.tag``), that timm builds without a network."""
    architecture = name.split(".", 1)[0]
    if any(mark in name for mark in (":", "/", "\\")) or architecture not in _known_backbones():
        raise ValueError(f"{name[:60]!r} is not a timm architecture this project builds offline "
                         "(a hub name, URL or path is never loaded from a model file)")
    return name


@functools.cache
def _known_backbones() -> frozenset[str]:
    return frozenset(timm.list_models())


Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Bounded(BaseModel):
    """Fields a model file may set, with their allowed ranges; others pass to the config."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class ModelConfigSchema(_Bounded):
    """The bounds of a stored :class:`ModelConfig`: nothing larger is ever built."""

    backbone: Annotated[str, AfterValidator(_offline_backbone)]
    image_size: int = Field(ge=16, le=1024)
    embed_dim: int = Field(256, ge=8, le=1024)
    heads: int = Field(4, ge=1, le=16)
    depth: int = Field(1, ge=1, le=12)
    registers: int = Field(0, ge=0, le=16)
    output_stride: Literal[8, 16, 32] = 32
    dropout: Finite = Field(0.1, ge=0, lt=1)
    drop_path: Finite = Field(0.0, ge=0, lt=1)

    @field_validator("heads")
    @classmethod
    def _divides(cls, heads: int, info: Any) -> int:
        embed_dim = info.data.get("embed_dim")
        if embed_dim is not None and embed_dim % heads:
            raise ValueError(f"must divide embed_dim {embed_dim}, not {heads}")
        return heads


Channel3 = Annotated[list[Finite], Field(min_length=3, max_length=3)]


class PreprocessSchema(_Bounded):
    """The bounds of a stored :class:`~pipeline.data.Preprocess`."""

    image_size: int = Field(ge=16, le=1024)
    mean: Channel3
    std: Channel3
    mask_margin: Finite = Field(0.25, ge=0, le=10)
    suppress_strength: Finite = Field(0.7, ge=0, le=1)

    @field_validator("mean")
    @classmethod
    def _mean_range(cls, mean: list[float]) -> list[float]:
        if not all(-10 <= value <= 10 for value in mean):
            raise ValueError(f"must hold 3 numbers in [-10, 10], not {mean}")
        return mean

    @field_validator("std")
    @classmethod
    def _std_positive(cls, std: list[float]) -> list[float]:
        if not all(1e-3 <= value <= 10 for value in std):
            raise ValueError(f"must hold 3 numbers in [0.001, 10], not {std}")
        return std


Pixels = Annotated[int, Field(ge=0, le=256)]


class MaskParamsSchema(_Bounded):
    """The bounds of stored :class:`~pipeline.masks.MaskParams`."""

    work_size: int = Field(128, ge=16, le=4096)
    saturation_min: int = Field(75, ge=0, le=255)
    green_max: int = Field(140, ge=0, le=255)
    prior_open_px: Pixels = 2
    cytoplasm_px: Pixels = 14
    border_px: Pixels = 4
    grabcut_iterations: int = Field(3, ge=0, le=50)
    open_px: Pixels = 2
    close_px: Pixels = 4
    min_area_fraction: Finite = Field(0.002, ge=0, le=1)
    max_area_fraction: Finite = Field(0.85, ge=0, le=1)


class TrainingData(BaseModel):
    """What a model was trained on: the source, whether generated, and how many images."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    source: str = Field(min_length=1, max_length=500)
    synthetic: bool
    images: int = Field(ge=0)
    per_class: dict[str, Annotated[int, Field(ge=0)]] = {}
    fingerprint: str | None = Field(None, max_length=64)


def data_fingerprint(manifest: pd.DataFrame) -> str:
    """sha256 over the sorted (path, label, content sha256) rows of the training manifest."""
    rows = sorted(zip(manifest["path"], manifest["label"], manifest["sha256"], strict=True))
    return hashlib.sha256("\n".join(",".join(map(str, r)) for r in rows).encode()).hexdigest()


def training_record(raw_dir: Path) -> TrainingData:
    """Source, images per class and fingerprint of the ingested data (``data/raw``), for the
    model file (``training_data``) and the model card."""
    source = read_json(raw_dir / "source.json").get("source") or "unknown"
    manifest = read_csv(raw_dir / "manifest.csv", dtype=str)
    return TrainingData(source=str(source), synthetic=source == "synthetic",
                        images=len(manifest), fingerprint=data_fingerprint(manifest),
                        per_class={str(k): int(v) for k, v in
                                   manifest["label"].value_counts().sort_index().items()})


def _unique_names(classes: list[str]) -> list[str]:
    if any(not name.strip() for name in classes):
        raise ValueError("must be non-empty names")
    if len(set(classes)) != len(classes):
        raise ValueError(f"must be unique, not {classes[:10]}")
    return classes


Classes = Annotated[list[Annotated[str, Field(max_length=200)]],
                    Field(min_length=1, max_length=MAX_CLASSES), AfterValidator(_unique_names)]
Temperature = Annotated[float, Field(allow_inf_nan=False, ge=TEMPERATURE_RANGE[0],
                                     le=TEMPERATURE_RANGE[1])]


class MetadataSchema(BaseModel):
    """One schema for a model file's metadata (a checkpoint's and an ONNX export's)."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, protected_namespaces=())

    name: str = Field(max_length=200)
    classes: Classes
    model_config_: ModelConfigSchema = Field(alias="model_config")
    preprocess: PreprocessSchema
    mask_params: MaskParamsSchema
    temperature: Temperature
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    train_config: dict[str, Any] = {}
    training_data: TrainingData | None = None
    trained_on: list[str] | None = None
    trained_on_phash: list[str] | None = None
    adapted_on: dict[str, Any] | None = None
    abstain_threshold: Finite | None = Field(None, ge=0, le=1)


@dataclass(frozen=True)
class ModelFile:
    """A model's record: everything but its weights, typed; ``to_metadata`` is its JSON."""

    name: str
    classes: list[str]
    model_config: ModelConfig
    preprocess: Preprocess
    mask_params: MaskParams
    temperature: float
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    train_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    training_data: TrainingData | None = None
    trained_on: list[str] | None = None
    trained_on_phash: list[str] | None = None
    adapted_on: dict[str, Any] | None = None
    abstain_threshold: float | None = None

    @property
    def synthetic(self) -> bool:
        """Whether the model learned from generated cells (its scores say nothing of real ones)."""
        return self.training_data is not None and self.training_data.synthetic

    def to_metadata(self) -> dict[str, Any]:
        """The JSON-ready record (as stored in the file; ``format`` included)."""
        record = {"format": CHECKPOINT_FORMAT, "name": self.name, "classes": list(self.classes),
                  "model_config": dataclasses.asdict(self.model_config),
                  "preprocess": self.preprocess.to_dict(),
                  "mask_params": dataclasses.asdict(self.mask_params),
                  "temperature": self.temperature, "summary": self.summary,
                  "history": self.history, "train_config": self.train_config,
                  "training_data": None if self.training_data is None
                  else self.training_data.model_dump()}
        optional = {"trained_on": self.trained_on, "trained_on_phash": self.trained_on_phash,
                    "adapted_on": self.adapted_on, "abstain_threshold": self.abstain_threshold}
        return record | {key: value for key, value in optional.items() if value is not None}

    @classmethod
    def from_metadata(cls, metadata: Any, origin: str | Path, checkpoint: bool = True
                      ) -> ModelFile:
        """The record in ``metadata`` (a checkpoint's, or with ``checkpoint`` False an ONNX
        export's); CheckpointError naming ``origin``, the key and its allowed range."""
        try:  # as stored: JSON types (lists, not tuples)
            metadata = json.loads(json.dumps(metadata))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{origin}: metadata not storable as JSON "
                                  f"({one_line(error)})") from None
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{origin}: its metadata is not a JSON object")
        required = REQUIRED_KEYS if checkpoint else REQUIRED_KEYS[1:]
        if missing := sorted(set(required) - set(metadata)):
            raise CheckpointError(f"{origin}: missing {', '.join(missing)}")
        if checkpoint and metadata["format"] != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{origin}: checkpoint format {metadata['format']!r:.40}, "
                                  f"expected {CHECKPOINT_FORMAT}")
        try:
            valid = MetadataSchema.model_validate(metadata)
        except ValidationError as error:
            raise CheckpointError(f"{origin}: {schema_problem(error)}") from None
        try:
            return cls(**_typed(valid, metadata))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{origin}: {one_line(error)}") from None


def _typed(valid: MetadataSchema, metadata: dict[str, Any]) -> dict[str, Any]:
    """The dataclass fields: configs rebuilt from the raw (validated) sections."""
    fields = valid.model_dump(by_alias=True, include=set(MetadataSchema.model_fields) - {
        "model_config_", "preprocess", "mask_params", "training_data"})
    model_config = {k: v for k, v in metadata["model_config"].items() if k != "weights_file"}
    preprocess = metadata["preprocess"] | {key: tuple(metadata["preprocess"][key])
                                           for key in ("mean", "std")}
    return fields | {"model_config": ModelConfig(**model_config),
                     "preprocess": Preprocess(**preprocess),
                     "mask_params": MaskParams(**metadata["mask_params"]),
                     "training_data": valid.training_data}


def write_model_file(model_file: ModelFile, state: dict[str, torch.Tensor], path: Path) -> None:
    """Weights as safetensors, the record as JSON in its header; the file's mode follows the
    umask like any other output (``safetensors.torch.save_file`` writes 0600)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    data = save(tensors, metadata={METADATA_KEY: json.dumps(model_file.to_metadata())})
    Path(path).write_bytes(data)


def read_model_file(path: Path) -> tuple[ModelFile, dict[str, torch.Tensor]]:
    """The record and weights stored at ``path``; CheckpointError for anything else. Never
    unpickles: the metadata is read and validated before any tensor is."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    try:  # safetensors parses a length and JSON only, so trying it first is safe
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {})[METADATA_KEY])
            model_file = ModelFile.from_metadata(metadata, path)
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise _not_a_model_file(path, error) from error
    return model_file, state


def _not_a_model_file(path: Path, error: Exception) -> CheckpointError:
    with open(path, "rb") as raw:
        head = raw.read(4)
    # torch.save's zip, or a pickle's PROTO opcode (0x80, protocol 2-5). A safetensors file may
    # start with 0x80 too (its header length), so this is asked only of a file that is no
    # safetensors file.
    if head.startswith((b"PK\x03\x04", *PICKLE_PROTOCOLS)):
        return CheckpointError(f"{path}: old pickle format ({LEGACY_MODEL_FILE}), which is never "
                               f"loaded since it can run code; retrain or convert it to "
                               f"{MODEL_FILE}")
    if path.suffix == ".onnx":
        return CheckpointError(f"{path}: an ONNX export, not a {MODEL_FILE}: this command needs "
                               f"the PyTorch model it was exported from")
    return CheckpointError(f"{path}: not a safetensors model file of this pipeline "
                           f"({one_line(error)})")

