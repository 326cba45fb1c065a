"""Top-k predictions for image files with a trained model or an ensemble (``wbc predict``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data import Preprocess, prepare_all, stack_images
from pipeline.device import select_device
from pipeline.ensemble import temper
from pipeline.errors import PipelineError
from pipeline.evaluate import infer, load_model
from pipeline.masks import MaskParams
from pipeline.model_files import LEGACY_MODEL_FILE, MODEL_FILE, read_spec
from pipeline.sources import collect_inputs

logger = logging.getLogger(__name__)


def _model_file(folder: Path) -> Path:
    """The model inside a folder: its checkpoint, else its ensemble description."""
    for name in (MODEL_FILE, "ensemble.json", LEGACY_MODEL_FILE):
        if (folder / name).is_file():
            return folder / name
    return folder / MODEL_FILE


@dataclass(frozen=True)
class ModelTree:
    """What a model path names: one checkpoint (no members), or an ensemble whose members --
    checkpoints or ensembles themselves -- are averaged with their weights (normalised here),
    then rescaled by its temperature."""

    path: Path
    members: tuple[tuple[ModelTree, float], ...] = ()
    temperature: float = 1.0

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


def _read_tree(path: Path, within: tuple[Path, ...]) -> ModelTree:
    """The checkpoint or ensemble description at ``path``; ``within``: the ensembles above it."""
    if path.suffix != ".json":
        return ModelTree(path)
    if path.resolve() in within:
        raise PipelineError(f"{path}: an ensemble that contains itself")
    spec = read_spec(path)
    total = sum(member["weight"] for member in spec["members"])
    members = []
    for member in spec["members"]:
        if not Path(member["checkpoint"]).is_file():
            raise PipelineError(f"{path}: member {member['name']} has no file at "
                                f"{member['checkpoint']}")
        members.append((_read_tree(Path(member["checkpoint"]), (*within, path.resolve())),
                        member["weight"] / total))
    return ModelTree(path, tuple(members), spec["temperature"])


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
    return _read_tree(path, ())


def output_columns(top_k: int) -> list[str]:
    """The CSV header of ``wbc predict``, the same whether or not any file could be read."""
    return ["path", "error"] + [f"{kind}{rank}" for rank in range(1, top_k + 1)
                                for kind in ("top", "p")]


def prepare_inputs(files: list[Path], prep: Preprocess, mask_params: MaskParams,
                   workers: int | None = None) -> list[np.ndarray | str]:
    """Decode, mask and resize every file in parallel; an error line where a file is unreadable."""
    return prepare_all(files, prep, None, mask_params, f"read {prep.image_size}px "
                       f"{prep.mask_mode}", workers)


def predict(model: str | Path, inputs: Sequence[str | Path], top_k: int = 3,
            batch_size: int = 64, device: str = "auto", tta: bool = False,
            workers: int | None = None) -> list[dict[str, Any]]:
    """One row per input file: the top-k classes with probabilities, or an ``error``.

    Ensemble members' calibrated probabilities are averaged with their weights and rescaled by
    the ensemble's temperature (level by level for an ensemble of ensembles); checkpoints with
    the same preprocessing share one pass of decoding and masking, and each runs once.
    """
    tree = resolve_model(model)
    files = collect_inputs(inputs)
    if not files:
        raise PipelineError("no image files among the inputs")
    torch_device = select_device(device)
    classes, errors = None, {}
    prepared_by_setting: dict[str, list[np.ndarray | str]] = {}
    probabilities_of: dict[Path, np.ndarray] = {}
    for checkpoint_path in tree.checkpoints():
        network, checkpoint = load_model(checkpoint_path, torch_device)
        if classes is not None and checkpoint["classes"] != classes:
            raise PipelineError(f"{checkpoint_path} predicts other classes than the first member")
        classes = checkpoint["classes"]
        prep = Preprocess(**checkpoint["preprocess"])
        setting = json.dumps([checkpoint["preprocess"], checkpoint["mask_params"]], sort_keys=True)
        if setting not in prepared_by_setting:
            prepared_by_setting[setting] = prepare_inputs(
                files, prep, MaskParams(**checkpoint["mask_params"]), workers)
        prepared = prepared_by_setting[setting]
        errors = {i: p for i, p in enumerate(prepared) if isinstance(p, str)}
        good = [i for i in range(len(files)) if i not in errors]
        probabilities = np.zeros((len(files), len(classes)))
        if good:
            images = stack_images([prepared[i] for i in good])
            logits, _, _ = infer(network, images, prep, torch_device, batch_size, tta)
            probabilities[good] = torch.softmax(logits / checkpoint["temperature"], 1).numpy()
        probabilities_of[checkpoint_path] = probabilities
    total = tree.combine(probabilities_of.__getitem__)
    rows = []
    for i, path in enumerate(files):
        row: dict[str, Any] = {"path": str(path), "error": errors.get(i, "")}
        if i not in errors:
            for rank, c in enumerate(np.argsort(-total[i])[:top_k], start=1):
                row |= {f"top{rank}": classes[c], f"p{rank}": round(float(total[i, c]), 6)}
        rows.append(row)
    logger.info("scored %d of %d files", len(files) - len(errors), len(files))
    return rows
