"""Running a ``wbc export``ed ONNX classifier with onnxruntime (CUDA provider when present).

Kept apart from ``pipeline.export`` so that scoring and prediction need onnxruntime only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from pipeline.errors import InputError, one_line
from pipeline.model_file import ModelFile

METADATA_KEY = "wbc"


def session(path: Path | str, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session: CUDA when its provider is present, else CPU."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), options, providers=providers)


class OnnxClassifier:
    """Runs an exported model; ``metadata`` is the checkpoint-like dict stored with it."""

    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {path}")
        try:
            self.session = session(path, threads)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise InputError(f"{path} is not a readable ONNX model: "
                             f"{str(error).splitlines()[0]}") from error
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise InputError(f"{path} is an ONNX model but not one exported by wbc export")
        try:
            self.metadata: dict[str, Any] = json.loads(props[METADATA_KEY])
        except ValueError as error:
            raise InputError(f"{path}: its {METADATA_KEY} metadata is not JSON "
                             f"({one_line(error)})") from error
        self.model_file = ModelFile.from_metadata(self.metadata, path, checkpoint=False)

    def logits(self, images: torch.Tensor | np.ndarray, batch_size: int = 64,
               tta: bool = False) -> torch.Tensor:
        """Logits for prepared uint8 images (N, 3, S, S), averaged over the 8 views with TTA."""
        array = images.numpy() if isinstance(images, torch.Tensor) else images
        outputs = []
        for start in range(0, len(array), batch_size):
            batch = np.ascontiguousarray(array[start:start + batch_size])
            views = _dihedral(batch) if tta else [batch]
            total = sum(self.session.run(["logits"], {"images": np.ascontiguousarray(v)})[0]
                        for v in views)
            outputs.append(total / len(views))
        return torch.from_numpy(np.concatenate(outputs).astype(np.float32))

    def infer(self, images: torch.Tensor, batch_size: int, tta: bool = False
              ) -> tuple[torch.Tensor, None, float]:
        """Like ``pipeline.evaluate.infer``: logits, no attention maps, images per second."""
        started = time.perf_counter()
        logits = self.logits(images, batch_size, tta)
        return logits, None, len(images) / max(time.perf_counter() - started, 1e-9)


def _dihedral(batch: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and rotations, in the order of ``pipeline.evaluate.dihedral_views``."""
    rotations = [np.rot90(batch, k, axes=(2, 3)) for k in range(4)]
    return rotations + [view[..., ::-1] for view in rotations]
