"""PyTorch vs onnxruntime vs int8 onnxruntime: images/s at batch 64 and 1, and external accuracy.

Usage::

    python bench/onnx_bench.py [--model data/models/efficientnet_lite0_attention/model.safetensors]
                               [--external ../shared/datasets/pbc-external] [--threads 2]
                               [--batch1-images 64] [--out bench/onnx_results.json]

``pytorch`` is ``pipeline.evaluate.infer`` as evaluate and predict run it (channels_last, bf16
autocast where the CPU supports it); ``pytorch fp32`` is the plain float forward pass the ONNX
export reproduces. All run on the same prepared images in one process, each limited to
``--threads`` CPU threads. The batch-64 figure is a full pass over the external set (whose
accuracy is reported);
batch 1 times the first ``--batch1-images`` images, one at a time, after a warm-up. Int8 is
calibrated on the pipeline's validation split, never on the external set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data import Preprocess, eval_transform, load_prepared
from pipeline.evaluate import external_set, held_out_set, infer, restrict_to_classes
from pipeline.export import export_onnx
from pipeline.inference import predict_logits
from pipeline.leakage import check_unseen, read_seen
from pipeline.masks import MaskParams
from pipeline.models import load_checkpoint
from pipeline.onnx_runtime import OnnxClassifier

Runner = Callable[[torch.Tensor, int], torch.Tensor]


def images_per_second(run: Runner, images: torch.Tensor, batch_size: int) -> tuple[float,
                                                                                   torch.Tensor]:
    """Throughput of one pass (after a one-batch warm-up) and the logits it produced."""
    run(images[:batch_size], batch_size)
    started = time.perf_counter()
    logits = run(images, batch_size)
    return len(images) / (time.perf_counter() - started), logits


def prepare(checkpoint: dict[str, Any], external: Path, data_dir: Path, calibration_size: int
            ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """External images (masks computed as ``wbc predict`` does) with labels; validation images."""
    prep, masks = Preprocess(**checkpoint["preprocess"]), MaskParams(**checkpoint["mask_params"])
    data = restrict_to_classes(external_set(external), checkpoint["classes"], False)
    check_unseen(data.paths, read_seen(checkpoint, checkpoint["name"]), checkpoint["name"])
    images = load_prepared(data.paths, prep, None, masks, desc="external")
    labels = np.array([checkpoint["classes"].index(label) for label in data.labels])
    val = held_out_set(data_dir / "split", data_dir / "raw" / "images", data_dir / "masks", "val")
    calibration = load_prepared(val.paths[:calibration_size], prep,
                                val.mask_files[:calibration_size], masks, desc="calibration")
    return images, labels, calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path,
                        default=Path("data/models/efficientnet_lite0_attention/model.safetensors"))
    parser.add_argument("--external", type=Path,
                        default=Path("../shared/datasets/pbc-external"))
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch1-images", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/onnx_results.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, checkpoint = load_checkpoint(args.model)
    images, labels, calibration = prepare(checkpoint, args.external, args.data, 64)
    prep, device = Preprocess(**checkpoint["preprocess"]), torch.device("cpu")
    folder = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    metadata = {key: value for key, value in checkpoint.items() if key != "state_dict"}
    sample = images[:: max(1, len(images) // 128)]
    export_onnx([(model, 1.0, 1.0)], metadata, sample, folder / "fp32.onnx")
    quantized = export_onnx([(model, 1.0, 1.0)], metadata, sample, folder / "int8.onnx",
                            quantize=True, labels=labels[:: max(1, len(images) // 128)],
                            calibration=calibration)
    sessions = {name: OnnxClassifier(folder / f"{name}.onnx", threads=args.threads)
                for name in ("fp32", "int8")}
    normalise = eval_transform(prep)

    def float32(x: torch.Tensor, b: int) -> torch.Tensor:  # contiguous NCHW, no autocast
        batches = (normalise(x[s:s + b]) for s in range(0, len(x), b))
        return predict_logits(model, batches, device, amp=False, channels_last=False)[0]

    runners: dict[str, Runner] = {
        "pytorch": lambda x, b: infer(model, x, prep, device, b)[0],
        "pytorch fp32": float32,
        "onnxruntime": lambda x, b: sessions["fp32"].logits(x, b),
        "onnxruntime int8": lambda x, b: sessions["int8"].logits(x, b),
    }
    results = _measure(runners, images, labels, args.batch1_images)
    report = {"machine": {"cpu": platform.processor() or platform.machine(),
                          "threads": args.threads, "load_average": os.getloadavg(),
                          "torch": torch.__version__},
              "model": str(args.model), "image_size": prep.image_size,
              "external_images": len(labels), "int8_parity": quantized.lines(),
              "results": results}
    _print(report)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


def _measure(runners: dict[str, Runner], images: torch.Tensor, labels: np.ndarray,
             batch1_images: int) -> dict[str, dict[str, float]]:
    results, reference = {}, None
    for name, run in runners.items():
        speed64, logits = images_per_second(run, images, 64)
        speed1, _ = images_per_second(run, images[:batch1_images], 1)
        predicted = logits.argmax(1).numpy()
        reference = predicted if reference is None else reference
        results[name] = {"batch64_images_per_s": speed64, "batch1_images_per_s": speed1,
                         "external_accuracy": float((predicted == labels).mean()),
                         "top1_agreement_with_pytorch": float((predicted == reference).mean())}
    return results


def _print(report: dict[str, Any]) -> None:
    print(f"{report['model']} at {report['image_size']} px, {report['machine']['threads']} "
          f"threads, load average at end {report['machine']['load_average']}, "
          f"{report['external_images']} external images")
    base = report["results"]["pytorch"]
    print(f"{'runtime':<18}{'b64 img/s':>10}{'x':>6}{'b1 img/s':>10}{'x':>6}"
          f"{'ext. acc.':>10}{'agree':>8}")
    for name, row in report["results"].items():
        print(f"{name:<18}{row['batch64_images_per_s']:>10.1f}"
              f"{row['batch64_images_per_s'] / base['batch64_images_per_s']:>6.2f}"
              f"{row['batch1_images_per_s']:>10.1f}"
              f"{row['batch1_images_per_s'] / base['batch1_images_per_s']:>6.2f}"
              f"{row['external_accuracy']:>10.4f}{row['top1_agreement_with_pytorch']:>8.4f}")
    for line in report["int8_parity"]:
        print(line)


if __name__ == "__main__":
    main()
