"""ONNX export of a trained classifier (or a same-preprocessing ensemble) and its CPU runtime.

The exported graph takes the prepared uint8 images ``(N, 3, S, S)`` (masked and resized exactly
as for PyTorch), normalises them itself and returns ``logits`` (uncalibrated; for an ensemble the
log of its averaged calibrated probabilities) and ``probabilities`` (calibrated with the model's
temperature). Everything needed to use it -- classes, preprocessing, mask parameters, temperature
and the abstention threshold -- travels in the model's ``metadata_props``. An export is written
only after a parity check against PyTorch on real images; int8 quantisation (static, QDQ,
calibrated on those images) is written only with its accuracy change measured.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from pipeline.abstain import stored_threshold
from pipeline.data import load_prepared
from pipeline.errors import InputError, PipelineError
from pipeline.eval_sets import external_set, held_out_set, restrict_to_classes
from pipeline.io import atomic_path
from pipeline.leakage import combined_seen
from pipeline.model_file import ModelFile
from pipeline.models import load_model_file
from pipeline.onnx_runtime import METADATA_KEY, session
from pipeline.scoring import ModelTree, pytorch_checkpoint, resolve_model

logger = logging.getLogger(__name__)

PROB_TOLERANCE = 1e-3  # largest allowed |p_onnx - p_torch| over the parity sample
OPSET = 17


class ParityError(PipelineError, RuntimeError):
    """The exported graph does not reproduce PyTorch on the parity sample."""


class CalibratedAverage(nn.Module):
    """The log of members' weighted calibrated probabilities, ``(module, weight, temperature)``
    each (a member may be a CalibratedAverage itself: an ensemble of ensembles); one member
    gives its logits over its temperature (the same up to a constant that softmax ignores)."""

    def __init__(self, members: list[tuple[nn.Module, float, float]]) -> None:
        super().__init__()
        self.members = nn.ModuleList(model for model, _, _ in members)
        self.weights = [weight for _, weight, _ in members]
        self.member_temperatures = [t for _, _, t in members]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if len(self.members) == 1:
            return self.members[0](inputs) / self.member_temperatures[0]
        average = sum(weight * torch.softmax(model(inputs) / t, 1) for model, weight, t
                      in zip(self.members, self.weights, self.member_temperatures, strict=True))
        return torch.log(average.clamp_min(1e-12))


class ExportedClassifier(nn.Module):
    """Normalisation, the weighted members' calibrated probabilities and the final temperature."""

    def __init__(self, members: list[tuple[nn.Module, float, float]], mean: list[float],
                 std: list[float], temperature: float) -> None:
        super().__init__()
        self.average = CalibratedAverage(members)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)
        self.temperature = temperature

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.average((images.float() - self.mean) / self.std)
        return logits, torch.softmax(logits / self.temperature, 1)


@dataclass
class ExportReport:
    """What an export checked: parity figures and, with quantisation, the accuracy change."""

    images: int
    max_probability_diff: float
    top1_mismatches: int
    accuracy_torch: float | None = None
    accuracy_quantized: float | None = None
    quantized_top1_agreement: float | None = None

    def lines(self) -> list[str]:
        text = [f"parity on {self.images} images: top-1 mismatches {self.top1_mismatches}, "
                f"max probability difference {self.max_probability_diff:.2e} "
                f"(tolerance {PROB_TOLERANCE:g})"]
        if self.quantized_top1_agreement is not None:
            change = ("" if self.accuracy_torch is None else
                      f", accuracy {self.accuracy_torch:.4f} -> {self.accuracy_quantized:.4f} "
                      f"({self.accuracy_quantized - self.accuracy_torch:+.4f})")
            text.append(f"int8: top-1 agreement with float {self.quantized_top1_agreement:.4f}"
                        f"{change}")
        return text


def onnx_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    """``metadata_props``: the full JSON under ``wbc`` plus readable copies of the main keys."""
    prep = metadata["preprocess"]
    return {
        METADATA_KEY: json.dumps(metadata, sort_keys=True),
        "classes": ",".join(metadata["classes"]),
        "image_size": str(prep["image_size"]),
        "mean": json.dumps(prep["mean"]), "std": json.dumps(prep["std"]),
        "mask_mode": prep["mask_mode"],
        "input": "uint8 RGB (N, 3, image_size, image_size), masked and resized; "
                 "normalised inside the graph",
        "temperature": f"{metadata['temperature']:.6g}",
        "abstain_threshold": json.dumps(metadata.get("abstain_threshold")),
    }


def _trace(wrapper: ExportedClassifier, image_size: int, dest: Path) -> None:
    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)
    torch.onnx.export(wrapper, (example,), str(dest), dynamo=False, opset_version=OPSET,
                      input_names=["images"], output_names=["logits", "probabilities"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"},
                                    "probabilities": {0: "batch"}})


def _probabilities(path: Path, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    run = session(path)
    return np.concatenate([run.run(["probabilities"], {"images": images[s:s + batch_size]})[0]
                           for s in range(0, len(images), batch_size)])


def check_parity(reference: np.ndarray, exported: np.ndarray) -> tuple[float, int]:
    """(max |difference|, top-1 mismatches); ParityError beyond the tolerance or on a mismatch."""
    difference = float(np.abs(reference - exported).max())
    mismatches = int((reference.argmax(1) != exported.argmax(1)).sum())
    if mismatches or not difference <= PROB_TOLERANCE:  # NaN fails too
        raise ParityError(f"ONNX differs from PyTorch: {mismatches} top-1 mismatches, max "
                          f"probability difference {difference:.2e} > {PROB_TOLERANCE:g}")
    return difference, mismatches


def export_onnx(members: list[tuple[nn.Module, float, float]], metadata: dict[str, Any],
                sample: torch.Tensor, dest: Path, quantize: bool = False,
                labels: np.ndarray | None = None, calibration: torch.Tensor | None = None
                ) -> ExportReport:
    """Export ``(model, weight, temperature)`` members to ``dest`` after a parity check.

    ``sample`` holds prepared uint8 images (N, 3, S, S) for the parity check; with ``quantize``
    the int8 model is calibrated on ``calibration`` (default: the sample) and its accuracy
    change measured on the sample against ``labels`` (class indices).
    """
    if len(sample) == 0:
        raise InputError("the parity check needs at least one image")
    prep = metadata["preprocess"]
    wrapper = ExportedClassifier([(m.eval().float().to("cpu"), w, t) for m, w, t in members],
                                 prep["mean"], prep["std"], metadata["temperature"]).eval()
    images = sample.numpy()
    with torch.no_grad():
        reference = torch.cat([wrapper(sample[s:s + 64])[1] for s in range(0, len(sample), 64)])
    reference = reference.numpy()
    with atomic_path(dest) as tmp:
        _trace(wrapper, prep["image_size"], tmp)
        _add_metadata(tmp, metadata)
        difference, mismatches = check_parity(reference, _probabilities(tmp, images))
        report = ExportReport(len(images), difference, mismatches)
        if quantize:
            quantized = tmp.with_name("quantized.onnx")
            quantize_static_int8(tmp, quantized, (sample if calibration is None
                                                  else calibration).numpy())
            _add_metadata(quantized, metadata | {"quantized": "int8-static-qdq"})
            _measure_quantized(report, reference, _probabilities(quantized, images), labels)
            quantized.replace(tmp)
    for line in report.lines():
        logger.info(line)
    return report


def _add_metadata(path: Path, metadata: dict[str, Any]) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, onnx_metadata(metadata))
    onnx.save(model, str(path))


def _measure_quantized(report: ExportReport, reference: np.ndarray, quantized: np.ndarray,
                       labels: np.ndarray | None) -> None:
    report.quantized_top1_agreement = float((reference.argmax(1) == quantized.argmax(1)).mean())
    if labels is not None:
        report.accuracy_torch = float((reference.argmax(1) == labels).mean())
        report.accuracy_quantized = float((quantized.argmax(1) == labels).mean())


def quantize_static_int8(source: Path, dest: Path, calibration: np.ndarray,
                         batch_size: int = 16) -> None:
    """Static int8 quantisation (QDQ, per-channel weights) calibrated on prepared images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": calibration[s:s + batch_size]}
                                 for s in range(0, len(calibration), batch_size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared = dest.with_name("preprocessed.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(dest), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    prepared.unlink()


def _same_setting(model_files: list[ModelFile]) -> None:
    first = model_files[0]
    for other in model_files[1:]:
        if (other.classes, other.preprocess, other.mask_params) != (
                first.classes, first.preprocess, first.mask_params):
            raise InputError(f"ensemble members {first.name} and {other.name} differ in "
                             "classes or preprocessing; export the members one by one")


def export_model(model: str | Path, dest: Path, quantize: bool = False,
                 data_dir: Path = Path("data"), images: Path | None = None,
                 calibration_size: int = 64) -> ExportReport:
    """``wbc export``: a model name, ``model.safetensors`` or ``ensemble.json`` to ``dest`` (.onnx).

    Parity (and the int8 accuracy change) is checked on the test split, or on the labelled
    folder ``images``; int8 calibration uses the validation split (or that folder).
    """
    if dest.suffix != ".onnx":
        raise InputError(f"the export goes to a .onnx file, not {dest}")
    tree = resolve_model(model, data_dir / "models")
    loaded = {path: load_model_file(pytorch_checkpoint(path, "wbc export"))
              for path in tree.checkpoints()}
    model_files = [model_file for _, model_file in loaded.values()]
    _same_setting(model_files)
    first = model_files[0]
    seen = combined_seen([(path, model_file.to_metadata())
                          for path, (_, model_file) in loaded.items()])
    exported = replace(first, name="ensemble" if tree.members else first.name,
                       temperature=tree.temperature if tree.members else first.temperature,
                       abstain_threshold=stored_threshold(tree.path, missing_ok=True), **seen)
    prep, mask_params = first.preprocess, first.mask_params

    def prepared(part: str) -> tuple[torch.Tensor, np.ndarray]:
        if images is None and not (data_dir / "split" / f"{part}.csv").is_file():
            raise InputError(f"no {data_dir / 'split' / part}.csv for the parity check: run the "
                             "split and masks stages, or give --images a labelled folder")
        data = (external_set(images) if images is not None else
                held_out_set(data_dir / "split", data_dir / "raw" / "images",
                             data_dir / "masks", part))
        data = restrict_to_classes(data, first.classes, ignore_unknown=True)
        tensor = load_prepared(data.paths, prep, data.mask_files, mask_params, desc=part)
        return tensor, np.array([first.classes.index(label) for label in data.labels])

    sample, labels = prepared("test")
    calibration = prepared("val")[0][:calibration_size] if quantize else None
    return export_onnx(_graph_members(tree, loaded), exported.to_metadata(), sample, dest,
                       quantize, labels, calibration)


def _graph_members(tree: ModelTree, loaded: dict[Path, tuple[nn.Module, ModelFile]]
                   ) -> list[tuple[nn.Module, float, float]]:
    """``(module, weight, temperature)`` for the graph: a checkpoint's network and temperature,
    or a nested ensemble's CalibratedAverage and its own temperature."""
    if not tree.members:  # its logits as they are: the metadata's temperature calibrates them
        return [(loaded[tree.path][0], 1.0, 1.0)]
    members = []
    for member, share in tree.members:
        if member.members:
            members.append((CalibratedAverage(_graph_members(member, loaded)), share,
                            member.temperature))
        else:
            network, model_file = loaded[member.path]
            members.append((network, share, model_file.temperature))
    return members
