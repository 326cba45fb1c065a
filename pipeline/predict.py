"""Top-k predictions for image files with a trained model or an ensemble (``wbc predict``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import stack_images
from pipeline.device import select_device
from pipeline.errors import PipelineError
from pipeline.scoring import (
    calibrated,
    infer,
    load_model,
    prepare_inputs,
    resolve_model,
    warn_if_synthetic,
)
from pipeline.sources import collect_inputs

logger = logging.getLogger(__name__)

NOT_FINITE = "the model's output is not a finite number"


def output_columns(top_k: int) -> list[str]:
    """The CSV header of ``wbc predict``, the same whether or not any file could be read."""
    return ["path", "error"] + [f"{kind}{rank}" for rank in range(1, top_k + 1)
                                for kind in ("top", "p")]


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
    classes, errors = None, {}  # errors: file index -> why it has no answer
    prepared_by_setting: dict[str, list[np.ndarray | str]] = {}
    probabilities_of: dict[Path, np.ndarray] = {}
    loaded = []
    for checkpoint_path in tree.checkpoints():
        network, model_file = load_model(checkpoint_path, torch_device)
        loaded.append((checkpoint_path, model_file))
        if classes is not None and model_file.classes != classes:
            raise PipelineError(f"{checkpoint_path} predicts other classes than the first member")
        classes = model_file.classes
        setting = repr((model_file.preprocess, model_file.mask_params))
        if setting not in prepared_by_setting:
            prepared_by_setting[setting] = prepare_inputs(
                files, model_file.preprocess, model_file.mask_params, workers)
        prepared = prepared_by_setting[setting]
        unreadable = {i: p for i, p in enumerate(prepared) if isinstance(p, str)}
        errors |= unreadable
        good = [i for i in range(len(files)) if i not in unreadable]
        probabilities = np.zeros((len(files), len(classes)))
        if good:
            images = stack_images([prepared[i] for i in good])
            logits, _, _ = infer(network, images, model_file.preprocess, torch_device,
                                 batch_size, tta)
            probabilities[good] = calibrated(logits, model_file.temperature)
        probabilities_of[checkpoint_path] = probabilities
    warn_if_synthetic(loaded)
    total = tree.combine(probabilities_of.__getitem__)
    errors |= {i: NOT_FINITE for i in range(len(files))
               if i not in errors and not np.isfinite(total[i]).all()}
    rows = [_row(path, total[i], classes, top_k, errors.get(i, ""))
            for i, path in enumerate(files)]
    logger.info("scored %d of %d files", len(files) - len(errors), len(files))
    return rows


def _row(path: Path, probabilities: np.ndarray, classes: list[str], top_k: int, error: str
         ) -> dict[str, Any]:
    """One output row: the top-k classes and probabilities, or the error alone."""
    row: dict[str, Any] = {"path": str(path), "error": error}
    if not error:
        for rank, c in enumerate(np.argsort(-probabilities)[:top_k], start=1):
            row |= {f"top{rank}": classes[c], f"p{rank}": round(float(probabilities[c]), 6)}
    return row
