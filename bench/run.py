"""Throughput benchmark of the pipeline: data loading, training, inference, masks and DVC.

Usage::

    python bench/run.py [--models a,b] [--image-size N] [--mask-images DIR] [--quick]
                        [--out bench/results.json]

Every model runs in its own spawned process, so its peak RSS is its own. Models are built with
``pretrained: false`` (weights do not change speed). Inputs are random tensors of the right shape:
the transforms and the networks cost the same whatever the pixels are.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.config import from_params
from pipeline.data import CellDataset, Preprocess, train_transform
from pipeline.device import amp_supported, select_device
from pipeline.evaluate import infer
from pipeline.io import load_params
from pipeline.masks import MaskParams, build_masks, compute_mask
from pipeline.models import AttentionClassifier, ModelConfig, build_model, data_config
from pipeline.sources import PBC_CLASSES, generate_dataset, render_example, scan_layout
from pipeline.train import (
    Runtime,
    TrainConfig,
    build_optimisation,
    loader_workers,
    peak_memory_mb,
    train_one_epoch,
)

ROOT = Path(__file__).resolve().parent.parent
LOADER_TARGET_RATIO = 3.0
LITE0_NAME = "efficientnet_lite0_attention"
LITE0_TARGET = 100.0  # images/s at batch 64
TRAIN_BATCH = 32


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much work each measurement does (``--quick`` shrinks it)."""

    loader_images: int = 256
    train_warmup: int = 2
    train_steps: int = 4
    infer1_images: int = 16
    infer64_images: int = 128
    mask_single: int = 20
    mask_pool: int = 480


QUICK = Budget(loader_images=128, train_warmup=1, train_steps=2, infer1_images=8,
               infer64_images=64, mask_single=8, mask_pool=48)


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    device = select_device("auto")
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "bf16_autocast": amp_supported(device),
        "load_average_at_start": list(os.getloadavg()),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_images(count: int, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)


def bench_loader(prep: Preprocess, count: int, device: torch.device) -> float:
    """Images/s of the training DataLoader (train_transform over preloaded uint8 images)."""
    workers = loader_workers("auto", device)
    labels = torch.arange(count) % len(PBC_CLASSES)
    dataset = CellDataset(_random_images(count, prep.image_size), labels, train_transform(prep))
    loader = DataLoader(dataset, batch_size=TRAIN_BATCH, shuffle=True, drop_last=True,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))
    seen = 0
    started = time.perf_counter()
    for images, _ in loader:
        seen += len(images)
    return seen / (time.perf_counter() - started)


def bench_training(model: AttentionClassifier, size: int, device: torch.device, budget: Budget
                   ) -> float:
    """Images/s of the pipeline's own training step (``train.train_one_epoch`` with the default
    recipe: forward, backward, clipping, AdamW, schedule, moving average; channels_last, batch
    32, bf16 where supported), warm-up excluded."""
    config = TrainConfig(epochs=1, batch_size=TRAIN_BATCH, lr=1e-3)
    model.to(device, memory_format=torch.channels_last)
    images = torch.randn(TRAIN_BATCH, 3, size, size)
    targets = torch.arange(TRAIN_BATCH) % len(PBC_CLASSES)
    fit = build_optimisation(model, config, targets, len(PBC_CLASSES), budget.train_steps,
                             device)

    def steps(count: int) -> None:
        train_one_epoch(model, model, [(images, targets)] * count, fit, config, Runtime(device),
                        amp_supported(device), 0, "bench train")

    steps(budget.train_warmup)
    _sync(device)
    started = time.perf_counter()
    steps(budget.train_steps)
    _sync(device)
    return budget.train_steps * TRAIN_BATCH / (time.perf_counter() - started)


def bench_inference(model: nn.Module, prep: Preprocess, device: torch.device, batch: int,
                    count: int) -> float:
    """Images/s of ``pipeline.evaluate.infer`` (eval, no_grad, channels_last), after a warm-up."""
    warmup = _random_images(max(batch, 2), prep.image_size)
    infer(model, warmup, prep, device, batch)
    _sync(device)
    images = _random_images(count, prep.image_size)
    started = time.perf_counter()
    infer(model, images, prep, device, batch)
    _sync(device)
    return count / (time.perf_counter() - started)


def _make(config: ModelConfig, size: int) -> tuple[nn.Module, Preprocess]:
    config = dataclasses.replace(config, pretrained=False, image_size=size)
    model, _ = build_model(config, len(PBC_CLASSES))
    return model, Preprocess(size, **data_config(model))


def bench_model(name: str, config: ModelConfig, budget: Budget, extra_sizes: tuple[int, ...] = ()
                ) -> dict[str, Any]:
    """All per-model numbers; meant to run in a fresh process (peak RSS is per model)."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    device = select_device("auto")
    model, prep = _make(config, config.image_size)
    parameters = sum(p.numel() for p in model.parameters())
    loader = bench_loader(prep, budget.loader_images, device)
    training = bench_training(model, config.image_size, device, budget)
    infer1 = bench_inference(model, prep, device, 1, budget.infer1_images)
    infer64 = bench_inference(model, prep, device, 64, budget.infer64_images)
    result = {
        "model": name, "backbone": config.backbone, "image_size": config.image_size,
        "parameters_m": parameters / 1e6, "loader_images_per_s": loader,
        "train_images_per_s": training, "loader_to_train_ratio": loader / training,
        "loader_ratio_ok": loader / training >= LOADER_TARGET_RATIO,
        "infer_b1_images_per_s": infer1, "infer_b64_images_per_s": infer64,
        "infer_b64_by_size": {str(config.image_size): infer64},
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "rss",
    }
    for size in extra_sizes:
        del model
        model, prep = _make(config, size)
        result["infer_b64_by_size"][str(size)] = bench_inference(model, prep, device, 64,
                                                                 budget.infer64_images)
    return result


def bench_models(models: dict[str, ModelConfig], budget: Budget) -> list[dict[str, Any]]:
    """Benchmark each model in its own spawned process, one after the other."""
    results = []
    context = multiprocessing.get_context("spawn")
    for name, config in models.items():
        extra = (224,) if name == LITE0_NAME and config.image_size != 224 else ()
        print(f"[bench] {name} ({config.backbone}, {config.image_size}px) ...", flush=True)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            results.append(pool.submit(bench_model, name, config, budget, extra).result())
    return results


def _image_folder_manifest(root: Path) -> pd.DataFrame:
    """Manifest rows (path relative to ``root``, label) of a real data set's class folders."""
    candidates, _ = scan_layout(root)
    return pd.DataFrame({"path": [c.source.relative_to(root).as_posix() for c in candidates],
                         "label": [c.label for c in candidates]})


def bench_masks(params: MaskParams, budget: Budget, images_root: Path | None) -> dict[str, Any]:
    """compute_mask in one process, and build_masks with 2 workers over a whole data set.

    The data set is ``images_root`` (real images, e.g. ../shared/datasets/pbc-1560) when given,
    else a generated synthetic one.
    """
    images = [render_example(PBC_CLASSES[i % len(PBC_CLASSES)], i, seed=0)[0]
              for i in range(budget.mask_single)]
    started = time.perf_counter()
    for image in images:
        compute_mask(image, params)
    single = len(images) / (time.perf_counter() - started)
    with tempfile.TemporaryDirectory(prefix="wbc-bench-") as tmp:
        if images_root is None:
            images_dir = Path(tmp) / "images"
            generate_dataset(images_dir, max(1, budget.mask_pool // len(PBC_CLASSES)), seed=0)
        else:
            images_dir = images_root
        manifest = _image_folder_manifest(images_dir)
        started = time.perf_counter()
        stats = build_masks(manifest, images_dir, Path(tmp) / "masks", params, workers=2)
        pool_seconds = time.perf_counter() - started
    return {
        "image_size": list(images[0].shape[:2]), "single_images": len(images),
        "single_process_images_per_s": single, "pool_workers": 2, "pool_images": len(manifest),
        "pool_images_per_s": len(manifest) / pool_seconds,
        "pool_source": str(images_root) if images_root else "synthetic",
        "pool_ok_share": float((stats["status"] == "ok").mean()),
        "pool_note": "build_masks end to end: decode, mask, PNG write, stats.csv and gallery",
    }


def _timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    return time.perf_counter() - started, done


def bench_dvc() -> dict[str, Any]:
    """``dvc status`` seconds; no-op ``dvc repro`` seconds only when the pipeline is up to date."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    if not Path(dvc).exists():
        return {"status_s": None, "repro_noop_s": None, "reason": "dvc not installed"}
    status_s, status = _timed([dvc, "status", "--json"])
    result: dict[str, Any] = {"status_s": status_s, "repro_noop_s": None}
    if status.returncode != 0:
        result["reason"] = f"dvc status failed: {status.stderr.strip()[-200:]}"
        return result
    changes = json.loads(status.stdout or "{}")
    if changes:
        result["reason"] = f"pipeline not up to date ({len(changes)} stages changed: " \
                           f"{', '.join(sorted(changes))})"
        return result
    repro_s, repro = _timed([dvc, "repro"])
    if repro.returncode == 0:
        result["repro_noop_s"] = repro_s
    else:
        result["reason"] = f"dvc repro failed: {repro.stderr.strip()[-200:]}"
    return result


def lite0_summary(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The offline-pretrained model's batch-64 inference speed against its target."""
    row = next((r for r in results if r["model"] == LITE0_NAME), None)
    if row is None:
        return None
    speeds = row["infer_b64_by_size"]
    return {"model": LITE0_NAME, "target_images_per_s": LITE0_TARGET,
            "infer_b64_images_per_s": speeds,
            "meets_target": {size: speed >= LITE0_TARGET for size, speed in speeds.items()}}


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table."""
    m = report["machine"]
    lines = [f"machine: {m['cpu']} | {m['cores']} cores | torch {m['torch']} | "
             f"device {m['device']} | gpu {m['gpu'] or '-'} | bf16 autocast {m['bf16_autocast']}"
             f" | budget {report['budget']}"]
    load = m["load_average_at_start"][0]
    if load > (m["cores"] or 1):
        lines.append(f"WARNING: load average {load:.1f} > {m['cores']} cores at start: other "
                     "processes share the CPU, so these numbers understate the machine")
    lines.append("")
    header = (f"{'model':<30}{'size':>5}{'Mparam':>8}{'loader/s':>10}{'train/s':>9}"
              f"{'ratio':>8}{'inf b1/s':>10}{'inf b64/s':>11}{'peak MB':>9}")
    lines += [header, "-" * len(header)]
    for r in report["models"]:
        flag = "" if r["loader_ratio_ok"] else "!"
        lines.append(f"{r['model']:<30}{r['image_size']:>5}{r['parameters_m']:>8.1f}"
                     f"{r['loader_images_per_s']:>10.1f}{r['train_images_per_s']:>9.1f}"
                     f"{r['loader_to_train_ratio']:>7.1f}{flag:1}{r['infer_b1_images_per_s']:>10.1f}"
                     f"{r['infer_b64_images_per_s']:>11.1f}{r['peak_memory_mb']:>9.0f}")
    lines.append(f"(ratio = loader/train, target >= {LOADER_TARGET_RATIO:g}; '!' marks a miss; "
                 f"peak MB = {report['models'][0]['peak_memory_kind'] if report['models'] else ''}"
                 f", per model process)")
    lite0 = report.get("lite0")
    if lite0:
        verdict = {size: "ok" if ok else "BELOW" for size, ok in lite0["meets_target"].items()}
        speeds = ", ".join(f"{size}px {speed:.1f} img/s ({verdict[size]})"
                           for size, speed in lite0["infer_b64_images_per_s"].items())
        lines += ["", f"{LITE0_NAME} inference b64 (target {LITE0_TARGET:g} img/s): {speeds}"]
    masks = report.get("masks")
    if masks:
        lines += ["", f"masks ({masks['image_size'][0]}x{masks['image_size'][1]}): "
                      f"1 process {masks['single_process_images_per_s']:.1f} img/s "
                      f"({masks['single_images']} images); build_masks {masks['pool_workers']} "
                      f"workers {masks['pool_images_per_s']:.1f} img/s ({masks['pool_images']} "
                      f"{masks['pool_source']} images, incl. PNG writes + gallery; "
                      f"{masks['pool_ok_share']:.1%} ok; target 40 img/s)"]
    dvc = report.get("dvc")
    if dvc:
        status = f"{dvc['status_s']:.2f} s" if dvc["status_s"] is not None else "n/a"
        repro = f"{dvc['repro_noop_s']:.2f} s" if dvc["repro_noop_s"] is not None \
            else f"null ({dvc.get('reason', '')})"
        lines += [f"dvc status: {status}; no-op dvc repro: {repro}"]
    lines.append(f"total benchmark time: {report['total_s']:.0f} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated names from params.yaml models")
    parser.add_argument("--image-size", type=int, help="override every model's image_size")
    parser.add_argument("--quick", action="store_true", help="fewer steps and images (smoke test)")
    parser.add_argument("--mask-images", type=Path,
                        help="real image folder for the masks benchmark (default: synthetic)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run every benchmark, print the table and write the JSON results."""
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    params = load_params(ROOT / "params.yaml")
    configs = {name: from_params(ModelConfig, entry, f"models.{name}")
               for name, entry in params["models"].items()}
    if args.models:
        wanted = [name.strip() for name in args.models.split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(configs))
        if unknown:
            raise SystemExit(f"unknown models {unknown}; params.yaml has {sorted(configs)}")
        configs = {name: configs[name] for name in wanted}
    if args.image_size:
        configs = {name: dataclasses.replace(c, image_size=args.image_size)
                   for name, c in configs.items()}
    budget = QUICK if args.quick else Budget()
    report: dict[str, Any] = {"machine": machine_info(), "budget": "quick" if args.quick
                              else "default"}
    os.environ["TQDM_DISABLE"] = "1"  # inherited by the spawned model processes
    print("[bench] masks ...", flush=True)
    masks = from_params(MaskParams, params["masks"], "masks")
    report["masks"] = bench_masks(masks, budget, args.mask_images)
    print("[bench] dvc ...", flush=True)
    report["dvc"] = bench_dvc()
    report["models"] = bench_models(configs, budget)
    report["lite0"] = lite0_summary(report["models"])
    report["total_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(format_report(report))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
