"""Model loading, batched inference and temperature: what predict, explain, adapt, evaluate and
export share, below all of them.

A model path names a checkpoint (``model.safetensors``), an exported ``.onnx``, an ensemble file
(``ensemble.json``, whose members may be ensembles themselves) or a folder holding one; each is
read once, checked against its schema (:mod:`pipeline.model_file`, :mod:`pipeline.model_files`),
and an ensemble's nesting and number of models are capped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data import Preprocess, eval_transform, prepare_all
from pipeline.device import use_bf16
from pipeline.errors import InputError, PipelineError
from pipeline.inference import predict_logits
from pipeline.masks import MaskParams
from pipeline.model_file import ModelFile
from pipeline.model_files import LEGACY_MODEL_FILE, MODEL_FILE, read_spec
from pipeline.models import load_model_file
from pipeline.onnx_runtime import OnnxClassifier

logger = logging.getLogger(__name__)

MAX_DEPTH = 8  # ensembles of ensembles, this deep at most
MAX_LEAVES = 64  # checkpoints averaged under one ensemble, counted with repeats

Runner = torch.nn.Module | OnnxClassifier


@dataclass(frozen=True)
class ModelTree:
    """What a model path names: one checkpoint (no members), or an ensemble whose members --
    checkpoints or ensembles themselves -- are averaged with their weights (normalised here),
    then rescaled by its temperature."""

    path: Path
    members: tuple[tuple[ModelTree, float], ...] = ()
    temperature: float = 1.0
    abstain_threshold: float | None = None  # an ensemble file's own, once evaluated
    leaf_count: int = 1

    def leaves(self, weight: float = 1.0) -> list[tuple[Path, float]]:
        """Every checkpoint under the tree with its share of the average (the product of the
        weights above it); a checkpoint named twice appears twice."""
        if not self.members:
            return [(self.path, weight)]
        return [leaf for member, share in self.members for leaf in member.leaves(weight * share)]

    def checkpoints(self) -> list[Path]:
        """The distinct checkpoints under the tree, in order of first appearance."""
        return list(dict.fromkeys(path for path, _ in self.leaves()))

    def combine(self, probabilities: Callable[[Path], np.ndarray]) -> np.ndarray:
        """The tree's probabilities, from each checkpoint's calibrated ``probabilities(path)``."""
        if not self.members:
            return probabilities(self.path)
        return temper(sum(share * member.combine(probabilities)
                          for member, share in self.members), self.temperature)


def _model_file(folder: Path) -> Path:
    """The model inside a folder: its checkpoint, else its ensemble description."""
    for name in (MODEL_FILE, "ensemble.json", LEGACY_MODEL_FILE):
        if (folder / name).is_file():
            return folder / name
    return folder / MODEL_FILE


def _read_tree(path: Path, within: tuple[Path, ...], read: dict[Path, ModelTree]) -> ModelTree:
    """The checkpoint or ensemble description at ``path``; ``within``: the ensembles above it;
    ``read``: the ensemble files read so far (each file is read once, however often named)."""
    if path.suffix != ".json":
        return ModelTree(path)
    key = path.resolve()
    if key in within:
        raise PipelineError(f"{path}: an ensemble that contains itself")
    if len(within) >= MAX_DEPTH:
        raise PipelineError(f"{path}: ensembles nested more than {MAX_DEPTH} deep")
    if key not in read:
        spec = read_spec(path)
        total = sum(member["weight"] for member in spec["members"])
        members = []
        for member in spec["members"]:
            if not Path(member["checkpoint"]).is_file():
                raise PipelineError(f"{path}: member {member['name']} has no file at "
                                    f"{member['checkpoint']}")
            members.append((_read_tree(Path(member["checkpoint"]), (*within, key), read),
                            member["weight"] / total))
        leaf_count = sum(member.leaf_count for member, _ in members)
        if leaf_count > MAX_LEAVES:
            raise PipelineError(f"{path}: averages {leaf_count} models (members of members "
                                f"counted), more than the {MAX_LEAVES} allowed")
        read[key] = ModelTree(path, tuple(members), spec["temperature"],
                              spec["abstain_threshold"], leaf_count)
    return read[key]


def resolve_model(model: str | Path, models_dir: Path = Path("data/models")) -> ModelTree:
    """What ``model`` names: a checkpoint, an ``ensemble.json`` (whose members may be ensembles
    themselves), an exported ``.onnx``, a folder holding one, or a model name."""
    path = Path(model)
    if not path.exists() and (models_dir / str(model)).is_dir():
        path = models_dir / str(model)
    if path.is_dir():
        path = _model_file(path)
    if not path.is_file():
        raise PipelineError(f"no model at {model}: give a {MODEL_FILE}, an ensemble.json or the "
                            f"name of a folder in {models_dir}")
    return _read_tree(path, (), {})


def load_model(path: Path, device: torch.device) -> tuple[Runner, ModelFile]:
    """A ``model.safetensors`` (PyTorch) or an exported ``.onnx`` (onnxruntime), and its
    validated record."""
    if Path(path).suffix == ".onnx":
        runner = OnnxClassifier(path)
        return runner, runner.model_file
    return load_model_file(path, device)


def warn_if_synthetic(model_files: Sequence[tuple[Path, ModelFile]]) -> None:
    """One warning line when any of the models learned from generated cells."""
    synthetic = [str(path) for path, model_file in model_files if model_file.synthetic]
    if synthetic:
        logger.warning("%s trained on synthetic cells (generated images, not blood smears): "
                       "its answers say nothing about real cells", ", ".join(synthetic))


def infer(model: Runner, images: torch.Tensor, prep: Preprocess, device: torch.device,
          batch_size: int, tta: bool = False, attention: bool = False
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
    return logits, maps, len(images) / max(time.perf_counter() - started, 1e-9)


def calibrated(logits: torch.Tensor, temperature: float) -> np.ndarray:
    """``softmax(logits / temperature)``; a row the model answered with NaN or infinity stays
    NaN (callers make it an error row), never a confident-looking number."""
    probabilities = torch.softmax(logits / temperature, 1)
    finite = torch.isfinite(logits).all(1, keepdim=True)
    return torch.where(finite, probabilities, torch.nan).numpy()


def log_probabilities(probabilities: np.ndarray) -> torch.Tensor:
    """``log(p)``, with p clipped at 1e-12 (no minus infinity)."""
    return torch.from_numpy(np.log(np.clip(probabilities, 1e-12, None)))


def temper(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale averaged probabilities: ``softmax(log(p) / T)`` (T = 1 returns them as they are)."""
    if temperature == 1.0:
        return probabilities
    return torch.softmax(log_probabilities(probabilities) / temperature, 1).numpy()


def prepare_inputs(files: list[Path], prep: Preprocess, mask_params: MaskParams,
                   workers: int | None = None) -> list[np.ndarray | str]:
    """Decode, mask and resize every file in parallel; an error line where a file is unreadable."""
    return prepare_all(files, prep, None, mask_params, f"read {prep.image_size}px "
                       f"{prep.mask_mode}", workers)


def pytorch_checkpoint(path: Path, command: str) -> Path:
    """``path`` if it is a checkpoint; an InputError saying what ``command`` takes otherwise."""
    if path.suffix == ".onnx":
        raise InputError(f"{path}: {command} needs the {MODEL_FILE} an ONNX export was made "
                         "from (gradients and attention maps are not in the export)")
    return path


def evaluation_of(model_path: Path) -> Path:
    """Where the evaluate stage writes the evaluation of the model at ``model_path``:
    ``<root>/models/<name>/<file>`` -> ``<root>/eval/<name>/summary.json`` (a cross-validation
    fold's ``<fold>/train/model/<file>`` -> ``<fold>/eval/summary.json``). Found by the model's
    path, so that ``wbc predict --abstain`` works from any folder."""
    folder = Path(model_path).resolve().parent
    if folder.name == "model" and folder.parent.name == "train":
        return folder.parent.parent / "eval" / "summary.json"
    return folder.parent.parent / "eval" / folder.name / "summary.json"
