"""Builders for model-file tests: tiny checkpoints, crafted metadata, minimal ONNX files."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx
import torch
from safetensors.torch import save_file
from test_hostile import CLASSES, cell_image, class_tree  # noqa: F401 - shared builders

from pipeline.data import Preprocess
from pipeline.masks import MaskParams
from pipeline.model_file import CHECKPOINT_FORMAT, METADATA_KEY
from pipeline.models import ModelConfig, build_model, save_checkpoint

TINY = ModelConfig("mobilenetv2_100", image_size=48, embed_dim=32, heads=2)


def valid_metadata(**changes: Any) -> dict[str, Any]:
    """A complete, valid checkpoint record of the tiny model, with ``changes`` applied."""
    prep = Preprocess(TINY.image_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return {"format": CHECKPOINT_FORMAT, "name": "tiny", "classes": list(CLASSES),
            "model_config": asdict(TINY), "preprocess": prep.to_dict(),
            "mask_params": asdict(MaskParams()), "temperature": 1.0, "summary": {},
            "history": []} | changes


def tiny_checkpoint(path: Path, nan_head: bool = False, **changes: Any) -> Path:
    """An untrained but complete checkpoint (its head NaN with ``nan_head``)."""
    torch.manual_seed(0)
    model, _ = build_model(TINY, len(CLASSES), load_weights=False)
    if nan_head:
        with torch.no_grad():
            model.head[1].weight.fill_(float("nan"))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(valid_metadata(**changes) | {"state_dict": model.state_dict()}, path)
    return path


def crafted_checkpoint(path: Path, metadata: Any) -> Path:
    """A safetensors file carrying ``metadata`` as is (no validation on the way in)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(1)}, str(path), metadata={METADATA_KEY: json.dumps(metadata)})
    return path


def crafted_onnx(path: Path, metadata: Any) -> Path:
    """A one-node ONNX graph with ``metadata`` as the ``wbc`` record of an export."""
    tensor = onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1])
    logits = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["images"], ["logits"])],
                                   "g", [tensor], [logits])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.helper.set_model_props(model, {"wbc": json.dumps(metadata)})
    onnx.save(model, str(path))
    return path
