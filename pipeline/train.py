"""Training of one attention classifier: plain loop, single process or DistributedDataParallel.

Recipe: AdamW with a lower backbone learning rate, warmup then cosine decay (timm's scheduler),
label smoothing, class-balanced loss or sampling, an optional frozen-backbone first phase,
gradient clipping, early stopping on validation macro-F1 and the best weights kept. Outputs are
written atomically by rank 0 only, so an interrupted run leaves the previous outputs intact.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from pipeline.data import (
    CellDataset,
    Preprocess,
    eval_transform,
    load_prepared,
    read_split,
    train_transform,
)
from pipeline.device import autocast, numeric_mode, select_device, use_bf16
from pipeline.io import atomic_path, write_json
from pipeline.masks import MaskParams, mask_path
from pipeline.metrics import fit_temperature, macro_f1
from pipeline.models import (
    CHECKPOINT_FORMAT,
    MODEL_FILE,
    AttentionClassifier,
    ModelConfig,
    build_model,
    data_config,
    save_checkpoint,
)
from pipeline.transfer import transfer_preprocessing

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class TrainConfig:
    """The shared recipe (``params.yaml: train``)."""

    epochs: int
    batch_size: int
    lr: float
    backbone_lr_scale: float = 0.1
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    freeze_epochs: int = 0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0: off; else validate and keep an exponential moving average
    recompute_bn: bool = False  # re-estimate batch-norm statistics of the kept weights each epoch
    patience: int = 5
    balance: str = "loss_weights"
    mask_mode: str = "crop"
    mask_margin: float = 0.25
    device: str = "auto"
    amp: bool | str = "auto"  # auto: bf16 on CUDA, fp32 on CPU | true: bf16 on CPU too | false
    channels_last: bool = True
    compile: bool = False
    num_workers: int | str = "auto"
    seed: int = 0
    temperature_scaling: bool = True
    distributed: str | bool = "auto"
    transfer: bool = False  # across laboratories: pipeline.transfer.TRANSFER_SETTINGS
    cell_fraction: float | None = None
    stain_normalise: bool = False
    stain_jitter: float = 0.0
    blur_sigma: float = 0.0
    # Overrides of this recipe for a backbone that starts from random weights (no pretrained
    # weights found): a recipe tuned to fine-tune ImageNet features does not train one from scratch.
    random_init: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.amp not in ("auto", True, False):
            raise ValueError(f"train.amp must be auto, true or false, not {self.amp!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), not {self.ema_decay}")
        keys = {f.name for f in dataclasses.fields(self)} - {"random_init"}
        if unknown := sorted(set(self.random_init) - keys):
            raise ValueError(f"train.random_init may set recipe keys only, not {unknown}")
        if self.balance not in ("none", "loss_weights", "sampler"):
            raise ValueError(f"train.balance must be none, loss_weights or sampler, "
                             f"not {self.balance!r}")


RANDOM_INIT_RECIPE = "random-init fallback"
RESOURCE_KEYS = ("seconds", "train_seconds", "images_per_second", "peak_memory_mb", "device",
                 "world_size")


def recipe_for(config: TrainConfig, weight_source: str) -> tuple[TrainConfig, str]:
    """The recipe to train with: ``random_init`` overrides when the backbone has no weights."""
    if not weight_source.startswith("random-init") or not config.random_init:
        return config, "default"
    return replace(config, **config.random_init), RANDOM_INIT_RECIPE


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: device, and its place in a distributed job."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start_runtime(config: TrainConfig) -> Runtime:
    """Join a torchrun job when launched by one (or when ``distributed: true``), else run alone."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if config.distributed is True and not launched:
        raise RuntimeError("train.distributed is true but the stage was not launched by torchrun")
    if config.distributed is False or not launched:
        device = select_device(config.device)
        if device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        return Runtime(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(config.device, local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return Runtime(device, dist.get_rank(), dist.get_world_size())


class BalancedSampler(Sampler[int]):
    """Draw indices with probability inverse to class frequency, sharded across ranks."""

    def __init__(self, labels: torch.Tensor, seed: int, rank: int = 0, world_size: int = 1
                 ) -> None:
        counts = torch.bincount(labels).clamp(min=1).double()
        self.weights = (1.0 / counts)[labels]
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.per_rank = math.ceil(len(labels) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.per_rank * self.world_size, True,
                                  generator=generator)
        return iter(drawn[self.rank::self.world_size].tolist())


def _param_groups(model: AttentionClassifier, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: backbone at a scaled learning rate; no weight decay on norms and biases."""
    backbone, head = model.parameter_groups()
    groups = []
    for params, scale in ((backbone, config.backbone_lr_scale), (head, 1.0)):
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decay]
            groups.append({"params": chosen, "lr": config.lr * scale,
                           "weight_decay": config.weight_decay if decay else 0.0})
    return groups


def set_backbone_frozen(model: AttentionClassifier, frozen: bool) -> None:
    """Freeze or release the backbone's weights."""
    for param in model.backbone.parameters():
        param.requires_grad_(not frozen)


@torch.no_grad()
def predict_logits(model: nn.Module, loader: DataLoader, runtime: Runtime, amp: bool,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over a loader, in order."""
    model.eval()
    outputs, labels = [], []
    for images, targets in loader:
        images = images.to(runtime.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(runtime.device, amp):
            outputs.append(model(images).float().cpu())
        labels.append(targets)
    return torch.cat(outputs), torch.cat(labels)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, loader: DataLoader, runtime: Runtime, amp: bool,
                        channels_last: bool) -> None:
    """Re-estimate every batch-norm layer's running statistics as the plain average over one
    pass of ``loader``. A network trained from scratch changes faster than the running
    averages (momentum 0.1) follow: in eval mode, stale statistics collapse its outputs to one
    class, although the same weights classify well with batch statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    for images, _ in loader:
        images = images.to(runtime.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(runtime.device, amp):
            model(images)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def _gather(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Concatenate every rank's shard (shards are strided: rank r holds items r, r+W, ...)."""
    if not runtime.distributed:
        return tensor
    shards: list[torch.Tensor] = [torch.empty(0)] * runtime.world_size
    dist.all_gather_object(shards, tensor)
    merged = torch.empty((sum(len(s) for s in shards), *tensor.shape[1:]), dtype=tensor.dtype)
    for rank, shard in enumerate(shards):
        merged[rank::runtime.world_size] = shard
    return merged


def _loader_workers(config: TrainConfig, device: torch.device) -> int:
    if config.num_workers != "auto":
        return int(config.num_workers)
    # On a CPU, a loader process steals cores from the model: augment in the main process.
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _seed_everything(seed: int) -> None:
    """Seed every generator; CPU kernels are deterministic without the (3x slower) strict mode."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def train_model(name: str, model_config: ModelConfig, config: TrainConfig, mask_params: MaskParams,
                split_dir: Path, images_dir: Path, masks_dir: Path, out_dir: Path,
                metrics_path: Path, live_dir: Path, resources_path: Path | None = None
                ) -> dict[str, Any]:
    """Train one model end to end and write its checkpoint, metrics and DVCLive logs.

    Timings, throughput and memory go to ``resources_path`` (default: beside the metrics, as
    ``train_resources.json``), not to the metrics, so that metric diffs show quality only."""
    runtime = start_runtime(config)
    _seed_everything(config.seed)
    started = time.perf_counter()
    train_rows, val_rows = read_split(split_dir, "train"), read_split(split_dir, "val")
    classes = sorted(set(train_rows["label"]) | set(val_rows["label"]))
    index = {label: i for i, label in enumerate(classes)}
    model, weight_source = build_model(model_config, len(classes))
    config, recipe = recipe_for(config, weight_source)
    if recipe != "default" and runtime.is_main:
        logger.warning("%s: %s, so training with the random-init recipe: %s", name,
                       weight_source, config.random_init)
    prep = Preprocess(model_config.image_size, **data_config(model), mask_mode=config.mask_mode,
                      mask_margin=config.mask_margin, **transfer_preprocessing(config))

    def dataset(rows, transform) -> CellDataset:
        images = load_prepared([images_dir / p for p in rows["path"]], prep,
                               [mask_path(masks_dir, p) for p in rows["path"]], mask_params)
        return CellDataset(images, torch.tensor(rows["label"].map(index).to_numpy()), transform)

    train_set, val_set = dataset(train_rows, train_transform(prep)), dataset(val_rows,
                                                                             eval_transform(prep))
    sampler = BalancedSampler(train_set.labels, config.seed, runtime.rank, runtime.world_size) \
        if config.balance == "sampler" else None
    if sampler is None and runtime.distributed:
        sampler = torch.utils.data.DistributedSampler(train_set, seed=config.seed)
    workers = _loader_workers(config, runtime.device)
    loader_args = {"batch_size": config.batch_size, "num_workers": workers,
                   "pin_memory": runtime.device.type == "cuda", "persistent_workers": workers > 0}
    train_loader = DataLoader(train_set, sampler=sampler, shuffle=sampler is None,
                              drop_last=len(train_set) > config.batch_size,
                              generator=torch.Generator().manual_seed(config.seed), **loader_args)
    val_shard = torch.utils.data.Subset(val_set, range(runtime.rank, len(val_set),
                                                       runtime.world_size))
    val_loader = DataLoader(val_shard, **loader_args)

    model.to(runtime.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    amp = use_bf16(runtime.device, config.amp)
    # The average's decay warms up (1 - (1 + step)^(-2/3), capped at ema_decay): short runs work.
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema_decay else None
    kept = ema.module if ema is not None else model  # the weights validated and saved
    class_weights = None
    if config.balance == "loss_weights":
        counts = torch.bincount(train_set.labels, minlength=len(classes)).clamp(min=1).float()
        class_weights = (counts.sum() / (len(classes) * counts)).to(runtime.device)
    criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=config.label_smoothing)
    optimizer = torch.optim.AdamW(_param_groups(model, config))
    steps_per_epoch = max(1, len(train_loader))
    scheduler = CosineLRScheduler(optimizer, t_initial=config.epochs * steps_per_epoch,
                                  warmup_t=int(config.warmup_epochs * steps_per_epoch),
                                  warmup_lr_init=config.lr * 0.01, lr_min=config.lr * 0.01,
                                  t_in_epochs=False)

    def wrap() -> nn.Module:
        wrapped: nn.Module = model
        if runtime.distributed:
            wrapped = DistributedDataParallel(
                model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
        return torch.compile(wrapped) if config.compile else wrapped

    live = _open_live(live_dir, runtime)
    best: dict[str, Any] = {"f1": -1.0, "epoch": -1, "state": None}
    history, seen_images, train_seconds, step = [], 0, 0.0, 0
    for epoch in range(config.epochs):
        frozen = epoch < config.freeze_epochs
        if epoch in (0, config.freeze_epochs):
            set_backbone_frozen(model, frozen)
            network = wrap()
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        network.train()
        if frozen:
            model.backbone.eval()  # keep batch-norm statistics frozen too
        epoch_start, loss_sum, correct, count = time.perf_counter(), 0.0, 0, 0
        progress = tqdm(train_loader, desc=f"{name} epoch {epoch + 1}/{config.epochs}",
                        unit="batch", leave=False, disable=not runtime.is_main)
        for images, targets in progress:
            images = images.to(runtime.device, non_blocking=True)
            targets = targets.to(runtime.device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(runtime.device, amp):
                logits = network(images)
                loss = criterion(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            if ema is not None:
                ema.update(model, step=step)
            scheduler.step_update(step)
            loss_sum += loss.item() * len(targets)
            correct += (logits.argmax(1) == targets).sum().item()
            count += len(targets)
            progress.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}")
        train_seconds += time.perf_counter() - epoch_start
        totals = torch.tensor([loss_sum, correct, count], dtype=torch.float64)
        if runtime.distributed:
            dist.all_reduce(totals)
        seen_images += int(totals[2])
        if config.recompute_bn:
            recompute_batchnorm(kept, train_loader, runtime, amp, config.channels_last)
        val_logits, val_labels = predict_logits(kept, val_loader, runtime, amp,
                                                config.channels_last)
        val_logits, val_labels = _gather(val_logits, runtime), _gather(val_labels, runtime)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(totals[0] / totals[2]),
            "train_accuracy": float(totals[1] / totals[2]),
            "val_loss": float(nn.functional.cross_entropy(val_logits, val_labels)),
            "val_accuracy": float((val_logits.argmax(1) == val_labels).float().mean()),
            "val_macro_f1": macro_f1(val_labels.numpy(), val_logits.argmax(1).numpy(),
                                     len(classes)),
            "lr": optimizer.param_groups[-1]["lr"],
        }
        history.append(record)
        _log_epoch(live, record)
        if runtime.is_main:
            logger.info("%s epoch %d/%d %s", name, epoch + 1, config.epochs,
                        " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        if record["val_macro_f1"] > best["f1"]:
            best = {"f1": record["val_macro_f1"], "epoch": epoch + 1,
                    "state": copy.deepcopy(kept.state_dict()), "record": record,
                    "val": (val_logits, val_labels)}
        elif epoch + 1 - best["epoch"] >= config.patience:
            if runtime.is_main:
                logger.info("%s: early stop, no val macro-F1 gain for %d epochs", name,
                            config.patience)
            break

    model.load_state_dict(best["state"])
    temperature = fit_temperature(*best["val"]) if config.temperature_scaling else 1.0
    summary = {
        "model": name,
        "backbone": model_config.backbone,
        "image_size": model_config.image_size,
        "weight_source": weight_source,
        "recipe": recipe,
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "val_accuracy": best["record"]["val_accuracy"],
        "val_macro_f1": best["record"]["val_macro_f1"],
        "temperature": temperature,
        "train_images": len(train_set),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "images_per_second": seen_images / max(train_seconds, 1e-9),
        "device": str(runtime.device),
        "world_size": runtime.world_size,
        "numeric_mode": numeric_mode(amp),
        "peak_memory_mb": _peak_memory_mb(runtime.device),
    }
    if runtime.is_main:
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "name": name,
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "classes": classes,
            "model_config": asdict(model_config),
            "preprocess": prep.to_dict(),
            "mask_params": asdict(mask_params),
            "train_config": asdict(config),
            "temperature": temperature,
            "summary": summary,
            "history": history,
        }
        with atomic_path(out_dir) as tmp:
            tmp.mkdir(parents=True)
            save_checkpoint(checkpoint, tmp / MODEL_FILE)
        write_json(metrics_path, {k: v for k, v in summary.items() if k not in RESOURCE_KEYS})
        write_json(resources_path or metrics_path.with_name("train_resources.json"),
                   {k: summary[k] for k in RESOURCE_KEYS})
        _end_live(live, best["record"])
    if runtime.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _open_live(live_dir: Path, runtime: Runtime):
    """DVCLive logger on rank 0 (None elsewhere); its plots are declared in dvc.yaml."""
    if not runtime.is_main:
        return None
    from dvclive import Live

    return Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)


def _log_epoch(live, record: dict[str, Any]) -> None:
    """One row per epoch in DVCLive's plots; its ``step`` column is the epoch number."""
    if live is None:
        return
    live.step = record["epoch"]
    for key, value in record.items():
        if key != "epoch":
            live.log_metric(key.replace("_", "/", 1), value)
    live.make_summary()


def _end_live(live, best: dict[str, Any]) -> None:
    """Close DVCLive with the kept (best) epoch's values as its summary, as in ``train.json``."""
    if live is None:
        return
    summary: dict[str, Any] = {}
    for key, value in best.items():
        if key != "epoch":
            *group, metric = key.split("_", 1)
            (summary.setdefault(group[0], {}) if group else summary)[metric] = value
    live.summary, live.step = summary, best["epoch"]
    live.end()
