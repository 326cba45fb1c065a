"""The README's real-data recipe on a GPU, timed stage by stage, and a full-PBC-sized run.

Runs dvc.yaml's stage commands in order (source, download, masks, split, train, evaluate) with
the README recipe's parameters (20 epochs, patience 8, 160 px, 8-view test-time augmentation) on
one source folder, then trains the same recipe three ways on the same split: one process
compiled (``train.compile``), one process eager, and under ``torchrun`` (DistributedDataParallel,
one process per GPU). Last, a full-PBC-sized source (17,092 images, PBC's own class sizes, made
by repeating the source's images) goes through masks, split and ``--full-epochs`` epochs of
training (eager), for the time per epoch and per stage at the archive's size.

Usage (from the repository root, on the GPU machine)::

    python bench/gpu_recipe.py --source ../shared/datasets/pbc-1560 [--out bench/gpu.json]
        [--work /tmp/wbc-gpu] [--variants compiled,eager,torchrun] [--full-epochs 2] [--quick]

Each run has a work folder of its own under ``--work`` (the project's ``pipeline`` and
``stages`` linked in, ``params.yaml`` written there), so the project's ``data/`` is left alone
and no DVC is needed where it runs. Stage logs stay in each work folder's ``logs/``.
``--quick`` (for a check on a CPU) shrinks the recipe to 1 epoch at 64 px without TTA and the
full-size run to 64 images per class.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.recipes import read_json  # noqa: E402
from bench.run import machine_info  # noqa: E402
from pipeline.errors import PipelineError, run_entry_point  # noqa: E402

MODEL = "efficientnet_lite0_attention"
RECIPE = {"train.epochs": 20, "train.patience": 8, f"models.{MODEL}.image_size": 160,
          "evaluate.tta": True}
QUICK_RECIPE = {"train.epochs": 1, "train.patience": 1, f"models.{MODEL}.image_size": 64,
                "evaluate.tta": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "compiled": {"train.compile": True},
    "eager": {"train.compile": False},
    "torchrun": {"train.compile": False, "train.distributed": True},
}
# Class sizes of the full PBC archive (PBC_dataset_normal_DIB): 17,092 images.
PBC_CLASS_SIZES = {"basophil": 1218, "eosinophil": 3117, "erythroblast": 1551, "ig": 2895,
                   "lymphocyte": 1214, "monocyte": 1420, "neutrophil": 3329, "platelet": 2348}
PREPARE_STAGES = ("source", "download", "masks", "split")
SHARED_DATA = ("data/fingerprint.json", "data/raw", "data/masks", "data/split")


def with_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` with dotted keys (``train.epochs``) set, as ``dvc exp run -S`` does."""
    params = copy.deepcopy(params)
    for dotted, value in overrides.items():
        *parents, key = dotted.split(".")
        section = params
        for parent in parents:
            section = section[parent]
        section[key] = value
    return params


def workspace(root: Path, params: dict[str, Any], data_from: Path | None = None) -> Path:
    """A fresh work folder: the project's code linked in, ``params`` written, data linked."""
    shutil.rmtree(root, ignore_errors=True)
    (root / "data").mkdir(parents=True)
    (root / "logs").mkdir()
    for code in ("pipeline", "stages"):
        (root / code).symlink_to(REPO / code)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if data_from is not None:
        for shared in SHARED_DATA:
            (root / shared).symlink_to((data_from / shared).resolve())
    return root


def run_stage(root: Path, stage: str, *args: str, torchrun: bool = False) -> float:
    """Run ``python -m stages.<stage>`` in ``root`` (under torchrun if asked); its seconds."""
    processes = max(torch.cuda.device_count(), 1)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}"] if torchrun else [sys.executable]
    log = root / "logs" / f"{stage}.log"
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run([*launcher, "-m", f"stages.{stage}", *args], cwd=root,
                              stdout=handle, stderr=subprocess.STDOUT, check=False)
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise PipelineError(f"{root.name}: stage {stage} failed ({done.returncode}): {tail[0]}")
    print(f"{root.name}: {stage} {seconds} s", flush=True)
    return seconds


def training_record(root: Path) -> dict[str, Any]:
    """What a trained model's records say: schedule, validation, time, memory, numeric mode."""
    keys = ("best_epoch", "epochs_run", "val_accuracy", "val_macro_f1", "train_images",
            "numeric_mode")
    record = {k: read_json(root / "metrics" / MODEL / "train.json").get(k) for k in keys}
    record.update(read_json(root / "resources" / MODEL / "train.json"))
    return record


def test_record(root: Path) -> dict[str, Any]:
    """The evaluate stage's test metrics, with their 95% bootstrap intervals."""
    metrics = read_json(root / "metrics" / MODEL / "eval.json")  # quality figures
    metrics |= read_json(root / "resources" / MODEL / "eval.json")  # intervals, counts, settings
    keys = ("accuracy", "accuracy_ci95_low", "accuracy_ci95_high", "balanced_accuracy",
            "macro_f1", "images", "tta", "attention_in_cell")
    return {k: metrics.get(k) for k in keys}


def prepare(root: Path, params: dict[str, Any]) -> dict[str, float]:
    """Source, download, masks and split in a fresh work folder; seconds per stage."""
    workspace(root, params)
    return {stage: run_stage(root, stage) for stage in PREPARE_STAGES}


def recipe_variant(root: Path, params: dict[str, Any], data_from: Path, torchrun: bool
                   ) -> dict[str, Any]:
    """Train and evaluate one variant on the prepared split."""
    workspace(root, params, data_from)
    seconds = {"train": run_stage(root, "train", MODEL, torchrun=torchrun),
               "evaluate": run_stage(root, "evaluate", MODEL)}
    return {"seconds": seconds, "train": training_record(root), "test": test_record(root)}


def repeated_source(source: Path, dest: Path, class_sizes: dict[str, int]) -> int:
    """A folder with ``class_sizes`` images per class, cycling through ``source``'s images."""
    shutil.rmtree(dest, ignore_errors=True)
    total = 0
    for label, size in class_sizes.items():
        images = sorted(p for p in (source / label).iterdir() if p.is_file())
        if not images:
            raise PipelineError(f"{source / label}: no images to repeat")
        (dest / label).mkdir(parents=True)
        for index in range(size):
            original = images[index % len(images)]
            shutil.copyfile(original, dest / label / f"{original.stem}_r{index}{original.suffix}")
        total += size
    return total


def full_size_run(work: Path, params: dict[str, Any], source: Path, epochs: int,
                  class_sizes: dict[str, int], record: dict[str, Any]) -> None:
    """Masks, split and a few eager epochs of training at the full archive's size, into
    ``record`` stage by stage (what was measured survives a time limit)."""
    record.update(images=repeated_source(source, work / "full_source", class_sizes),
                  epochs=epochs, seconds={})
    params = with_overrides(params, {"data.source": str(work / "full_source"),
                                     "train.epochs": epochs, "train.compile": False})
    root = workspace(work / "full_size", params)
    for stage in PREPARE_STAGES:
        record["seconds"][stage] = run_stage(root, stage)
    record["seconds"]["train"] = run_stage(root, "train", MODEL)
    record["train"] = training_record(root)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="a folder of class folders")
    parser.add_argument("--out", type=Path, default=Path("bench/gpu.json"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/wbc-gpu"))
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)} ('': none)")
    parser.add_argument("--full-epochs", type=int, default=2, help="0: no full-size run")
    parser.add_argument("--quick", action="store_true", help="a tiny run, to check the script")
    args = parser.parse_args(argv)
    args.variants = [name for name in args.variants.split(",") if name]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    if not args.source.is_dir():
        parser.error(f"--source {args.source}: not a folder")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = QUICK_RECIPE if args.quick else RECIPE
    base = with_overrides(yaml.safe_load((REPO / "params.yaml").read_text()),
                          {"data.source": str(args.source.resolve()), **recipe})
    report: dict[str, Any] = {"machine": machine_info(), "recipe": recipe, "quick": args.quick}
    try:
        prepared = args.work / "prepared"
        if args.variants:
            report["prepare_seconds"] = prepare(prepared, base)
        report["variants"] = {}
        for name in args.variants:
            report["variants"][name] = recipe_variant(
                args.work / name, with_overrides(base, VARIANTS[name]), prepared,
                name == "torchrun")
        if args.full_epochs > 0:
            sizes = {k: 64 for k in PBC_CLASS_SIZES} if args.quick else PBC_CLASS_SIZES
            report["full_size"] = {}
            full_size_run(args.work, base, args.source, args.full_epochs, sizes,
                          report["full_size"])
    finally:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
