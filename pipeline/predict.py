"""Top-k predictions for image files with a trained model or an ensemble (``wbc predict``)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data import Preprocess, prepare_file
from pipeline.device import select_device
from pipeline.ensemble import read_spec, temper
from pipeline.evaluate import infer, load_model
from pipeline.io import ImageDecodeError, opencv_threads
from pipeline.masks import MaskParams

logger = logging.getLogger(__name__)


def resolve_model(model: str | Path, models_dir: Path = Path("data/models")
                  ) -> tuple[list[tuple[Path, float]], float]:
    """``(checkpoint, weight)`` members and the ensemble temperature for a ``model.pt``, an
    ``ensemble.json``, an exported ``.onnx`` or a model name."""
    path = Path(model)
    if not path.exists() and (models_dir / str(model)).is_dir():
        folder = models_dir / str(model)
        path = folder / "model.pt" if (folder / "model.pt").exists() else folder / "ensemble.json"
    if path.is_dir():
        path = path / "model.pt" if (path / "model.pt").exists() else path / "ensemble.json"
    if not path.is_file():
        raise FileNotFoundError(f"no model at {model}: give a model.pt, an ensemble.json or the "
                                f"name of a folder in {models_dir}")
    if path.suffix == ".json":
        spec = read_spec(path)
        return ([(Path(m["checkpoint"]), float(m["weight"])) for m in spec["members"]],
                spec["temperature"])
    return [(path, 1.0)], 1.0


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files given directly, and every visible file below folders given, in a stable order."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*")
                                if p.is_file() and not p.name.startswith(".")))
        else:
            files.append(item)
    return files


def _prepare(job: tuple[Path, Preprocess, MaskParams]) -> np.ndarray | str:
    """The model input for one file, or the one-line reason it cannot be read."""
    path, prep, mask_params = job
    try:
        return prepare_file((path, None, prep, mask_params))
    except (ImageDecodeError, FileNotFoundError, IsADirectoryError) as error:
        return str(error).splitlines()[0]


def prepare_inputs(files: list[Path], prep: Preprocess, mask_params: MaskParams,
                   workers: int | None = None) -> list[np.ndarray | str]:
    """Decode, mask and resize every file in parallel; an error line where a file is unreadable."""
    jobs = [(f, prep, mask_params) for f in files]
    with opencv_threads(1), ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        return list(tqdm(pool.map(_prepare, jobs, chunksize=8), total=len(jobs),
                         desc=f"read {prep.image_size}px {prep.mask_mode}", unit="img"))


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
        raise FileNotFoundError("no input files")
    torch_device = select_device(device)
    total, classes, errors = None, None, {}
    prepared_by_setting: dict[str, list[np.ndarray | str]] = {}
    for checkpoint_path, weight in members:
        network, checkpoint = load_model(checkpoint_path, torch_device)
        if classes is not None and checkpoint["classes"] != classes:
            raise ValueError(f"{checkpoint_path} predicts other classes than the first member")
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
            images = torch.from_numpy(np.stack([prepared[i] for i in good])).permute(0, 3, 1, 2)
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
