"""Top-k predictions for image files with a trained model or an ensemble (``wbc predict``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
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


def resolve_model(model: str | Path, models_dir: Path = Path("data/models")
                  ) -> tuple[list[tuple[Path, float]], float]:
    """``(checkpoint, weight)`` members and the ensemble temperature for a checkpoint, an
    ``ensemble.json``, an exported ``.onnx``, a folder holding one, or a model name."""
    path = Path(model)
    if not path.exists() and (models_dir / str(model)).is_dir():
        path = models_dir / str(model)
    if path.is_dir():
        path = _model_file(path)
    if not path.is_file():
        raise PipelineError(f"no model at {model}: give a {MODEL_FILE}, an ensemble.json or the "
                            f"name of a folder in {models_dir}")
    if path.suffix == ".json":
        spec = read_spec(path)
        return [(m["checkpoint"], m["weight"]) for m in spec["members"]], spec["temperature"]
    return [(path, 1.0)], 1.0


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
    the ensemble's temperature; members with the same preprocessing share one pass of decoding
    and masking.
    """
    members, temperature = resolve_model(model)
    files = collect_inputs(inputs)
    if not files:
        raise PipelineError("no image files among the inputs")
    torch_device = select_device(device)
    total, classes, errors = None, None, {}
    prepared_by_setting: dict[str, list[np.ndarray | str]] = {}
    for checkpoint_path, weight in members:
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
        total = probabilities * weight if total is None else total + probabilities * weight
    total = temper(total, temperature)
    rows = []
    for i, path in enumerate(files):
        row: dict[str, Any] = {"path": str(path), "error": errors.get(i, "")}
        if i not in errors:
            for rank, c in enumerate(np.argsort(-total[i])[:top_k], start=1):
                row |= {f"top{rank}": classes[c], f"p{rank}": round(float(total[i, c]), 6)}
        rows.append(row)
    logger.info("scored %d of %d files", len(files) - len(errors), len(files))
    return rows
