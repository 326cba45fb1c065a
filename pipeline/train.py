"""Training of one attention classifier: plain loop, single process or DistributedDataParallel.

Recipe: AdamW (or SGD: ``optimizer``) with a lower backbone learning rate, warmup
then cosine decay (timm's scheduler), label smoothing, class-balanced loss or sampling, an
optional frozen-backbone first phase, gradient clipping, early stopping on validation macro-F1
and the best weights kept. With ``refit``, a second run from the same start then trains on the
training and validation images together for the epoch count validation chose. Outputs are
written atomically by rank 0 only, so an interrupted run leaves the previous outputs intact, and
so does a diverged one: a loss, weight or temperature that is NaN or infinite stops the run with
:class:`TrainingDiverged` (one line, exit code 2).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from pipeline.config import ConfigError
from pipeline.data import (
    CellDataset,
    Preprocess,
    eval_transform,
    load_masks,
    load_prepared,
    train_transform,
)
from pipeline.device import autocast, numeric_mode, select_device, use_bf16
from pipeline.environment import run_environment
from pipeline.errors import PipelineError
from pipeline.inference import predict_logits
from pipeline.io import atomic_path, read_split, write_json
from pipeline.leakage import seen_record
from pipeline.masks import MaskParams, mask_path
from pipeline.metrics import fit_temperature, macro_f1
from pipeline.model_file import training_record
from pipeline.model_files import MODEL_FILE
from pipeline.models import (
    CHECKPOINT_FORMAT,
    AttentionClassifier,
    ModelConfig,
    attention_outside_cell_loss,
    build_model,
    data_config,
    reestimate_batchnorm,
    save_checkpoint,
    token_cover,
)
from pipeline.resume import (
    clear_state,
    load_state,
    random_state,
    restore_random_state,
    run_key,
    save_state,
)

logger = logging.getLogger(__name__)

# AdamW fine-tunes pretrained features; SGD with Nesterov momentum learned faster from scratch at
# 64 px on the synthetic set (BENCHMARKS.md, "Random-init fallback"), but no default uses it yet.
OPTIMIZERS = ("adamw", "sgd")


RESUME_KEYS = ("resume", "resume_every_s")  # how a run is saved, not what it computes


@dataclass(frozen=True)
class TrainConfig:
    """The shared recipe (``params.yaml: train``; the defaults are its values)."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adamw"  # adamw | sgd (Nesterov momentum 0.9): timm.optim names
    backbone_lr_scale: float = 0.3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    freeze_epochs: int = 0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.998  # 0: off; else validate and keep an exponential moving average
    recompute_bn: bool = False  # re-estimate batch-norm statistics of the kept weights each epoch
    recompute_bn_images: int | None = None  # ...on the first batches reaching this many (None: all)
    patience: int = 4
    balance: str = "loss_weights"
    mask_mode: str = "crop"
    mask_margin: float = 0.3
    suppress_strength: float = 0.7  # mask_mode suppress: how far the background fades (0 to 1)
    # weight of the loss on the class token's attention outside the cell mask (0: off)
    mask_guidance: float = 0.3
    device: str = "auto"
    amp: bool | str = "auto"  # auto: bf16 on CUDA, fp32 on CPU | true: bf16 on CPU too | false
    channels_last: bool = True
    compile: bool = False
    num_workers: int | str = "auto"
    # the decoded training and validation images are held in memory up to this size, beyond it
    # in a memory-mapped temporary file (100,000 images at 160 px: 7.7 GB)
    in_memory_max_mb: float = 8192
    seed: int = 0
    temperature_scaling: bool = True
    distributed: str | bool = "auto"
    cell_fraction: float | None = None
    stain_normalise: bool = False
    stain_jitter: float = 0.0
    blur_sigma: float = 0.0
    red_cell_crop: float | None = None
    cell_stain_normalise: bool = False
    # after early stopping chose the epoch count on validation, train again from the same start
    # on train + validation for that many epochs and keep those weights (and the temperature
    # fitted on validation in the first run)
    refit: bool = False
    # continue an interrupted run after its last saved epoch (same params, split and code): the
    # state is saved after a validated epoch (``pipeline.resume``) once ``resume_every_s`` have
    # passed since the last save (0: after every epoch)
    resume: bool = True
    resume_every_s: float = 60.0
    # The recipe's keys that a backbone starting from random weights (no pretrained weights
    # found) trains with instead, as written: a recipe tuned to fine-tune ImageNet features does
    # not train one from scratch. Nothing else in the recipe is ever changed in code.
    random_init: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.amp not in ("auto", True, False):
            raise ValueError(f"train.amp must be auto, true or false, not {self.amp!r}")
        if self.distributed not in ("auto", True, False):
            raise ValueError(f"train.distributed must be auto, true or false, "
                             f"not {self.distributed!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), not {self.ema_decay}")
        keys = {f.name for f in dataclasses.fields(self)} - {"random_init", *RESUME_KEYS}
        if unknown := sorted(set(self.random_init) - keys):
            raise ValueError(f"train.random_init may set recipe keys only, not {unknown}")
        guidance = self.mask_guidance
        if not isinstance(guidance, int | float) or not 0 <= guidance < math.inf:
            raise ValueError(f"train.mask_guidance must be a number >= 0, not {guidance!r}")
        if not isinstance(self.refit, bool):
            raise ValueError(f"train.refit must be true or false, not {self.refit!r}")
        # the preprocessing knobs are checked where they live, now rather than after set-up
        Preprocess(1, (0.0,) * 3, (1.0,) * 3, **self.preprocess_settings())
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, "
                             f"not {self.optimizer!r}")
        if self.balance not in ("none", "loss_weights", "sampler"):
            raise ValueError(f"train.balance must be none, loss_weights or sampler, "
                             f"not {self.balance!r}")

    def preprocess_settings(self) -> dict[str, Any]:
        """The recipe's image preprocessing (its keys that are ``Preprocess`` fields), as
        written."""
        return {key.name: getattr(self, key.name) for key in dataclasses.fields(Preprocess)
                if key.name in self.__dataclass_fields__}


RANDOM_INIT_RECIPE = "random-init fallback"
RESOURCE_KEYS = ("seconds", "train_seconds", "images_per_second", "peak_memory_mb", "device",
                 "environment", "world_size", "distributed")


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
    distributed: bool = False  # in a torchrun job's process group (DDP), whatever its size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_runtime(config: TrainConfig) -> Runtime:
    """Join the torchrun job that launched this process (``distributed: auto`` when the job has
    more than one process, ``true`` at any size, one GPU included), else run alone."""
    launched = "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.distributed is True and not launched:
        raise ConfigError("train.distributed is true but the stage was not launched by torchrun "
                          "(torchrun --nproc_per_node N -m stages.train MODEL)")
    if not launched or config.distributed is False or (config.distributed == "auto"
                                                        and world_size == 1):
        device = select_device(config.device)
        if device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        return Runtime(device)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = select_device(config.device, local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return Runtime(device, dist.get_rank(), dist.get_world_size(), distributed=True)


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
    """Optimiser groups: backbone at a scaled learning rate; no weight decay on norms and biases."""
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


def loader_workers(num_workers: int | str, device: torch.device) -> int:
    """Data-loader processes for ``train.num_workers`` (``auto``: up to 8 beside a GPU, none on
    a CPU, where a loader process steals cores from the model)."""
    if num_workers != "auto":
        return int(num_workers)
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA, else this process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _seed_everything(seed: int) -> None:
    """Seed every generator; CPU kernels are deterministic without the (3x slower) strict mode."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def build_datasets(rows: dict[str, pd.DataFrame], classes: list[str], prep: Preprocess,
                   images_dir: Path, masks_dir: Path, mask_params: MaskParams,
                   with_masks: bool = False, in_memory_max_mb: float = math.inf
                   ) -> tuple[CellDataset, CellDataset]:
    """The training images (augmented on access; with their cell masks if ``with_masks``) and
    the validation images, prepared once (memory-mapped past ``in_memory_max_mb`` a part)."""
    index = {label: i for i, label in enumerate(classes)}
    datasets = []
    for part, transform in (("train", train_transform(prep)), ("val", eval_transform(prep))):
        paths = list(rows[part]["path"])
        images = [images_dir / p for p in paths]
        mask_files = [mask_path(masks_dir, p) for p in paths]
        prepared = load_prepared(images, prep, mask_files, mask_params, desc=f"load {part}",
                                 in_memory_max_mb=in_memory_max_mb)
        labels = torch.tensor(rows[part]["label"].map(index).to_numpy())
        masks = None
        if with_masks and part == "train":
            masks = torch.from_numpy(load_masks(images, mask_files, prep, mask_params)[:, None])
            masks = masks.to(torch.uint8)
        datasets.append(CellDataset(prepared, labels, transform, masks))
    return datasets[0], datasets[1]


def build_loaders(train_set: CellDataset, val_set: CellDataset, config: TrainConfig,
                  runtime: Runtime) -> tuple[DataLoader, DataLoader]:
    """Shuffled (or class-balanced) training batches, and this rank's share of validation."""
    sampler = BalancedSampler(train_set.labels, config.seed, runtime.rank, runtime.world_size) \
        if config.balance == "sampler" else None
    if sampler is None and runtime.distributed:
        sampler = torch.utils.data.DistributedSampler(train_set, seed=config.seed)
    workers = loader_workers(config.num_workers, runtime.device)
    loader_args = {"batch_size": config.batch_size, "num_workers": workers,
                   "pin_memory": runtime.device.type == "cuda", "persistent_workers": workers > 0}
    train_loader = DataLoader(train_set, sampler=sampler, shuffle=sampler is None,
                              drop_last=len(train_set) > config.batch_size,
                              generator=torch.Generator().manual_seed(config.seed), **loader_args)
    val_shard = torch.utils.data.Subset(val_set, range(runtime.rank, len(val_set),
                                                       runtime.world_size))
    return train_loader, DataLoader(val_shard, **loader_args)


@dataclass
class Optimisation:
    """What updates the weights: the loss, the optimiser and its schedule, the weights' moving
    average (``ema``, None when off) and the count of optimiser steps taken."""

    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    ema: ModelEmaV3 | None
    step: int = 0


def build_optimisation(model: AttentionClassifier, config: TrainConfig, train_labels: torch.Tensor,
                       num_classes: int, steps_per_epoch: int, device: torch.device
                       ) -> Optimisation:
    """Loss (class-weighted with ``balance: loss_weights``), the optimiser (timm's, by name),
    warmup then cosine decay."""
    # The average's decay warms up (1 - (1 + step)^(-2/3), capped at ema_decay): short runs work.
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema_decay else None
    class_weights = None
    if config.balance == "loss_weights":
        counts = torch.bincount(train_labels, minlength=num_classes).clamp(min=1).float()
        class_weights = (counts.sum() / (num_classes * counts)).to(device)
    criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=config.label_smoothing)
    optimizer = create_optimizer_v2(_param_groups(model, config), opt=config.optimizer,
                                    lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, steps_per_epoch)
    scheduler = CosineLRScheduler(optimizer, t_initial=config.epochs * steps_per_epoch,
                                  warmup_t=int(config.warmup_epochs * steps_per_epoch),
                                  warmup_lr_init=config.lr * 0.01, lr_min=config.lr * 0.01,
                                  t_in_epochs=False)
    return Optimisation(criterion, optimizer, scheduler, ema)


def _wrap(model: nn.Module, config: TrainConfig, runtime: Runtime) -> nn.Module:
    """The network the training steps call: DDP across ranks, compiled when asked."""
    wrapped = model
    if runtime.distributed:
        wrapped = DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    return torch.compile(wrapped) if config.compile else wrapped


def train_one_epoch(network: nn.Module, model: AttentionClassifier, loader: DataLoader,
                    fit: Optimisation, config: TrainConfig, runtime: Runtime, amp: bool,
                    epoch: int, desc: str) -> tuple[dict[str, float], int]:
    """One pass over the training batches (epoch numbered from 0); the mean loss and accuracy
    over every rank's images, and how many images that was."""
    if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    network.train()
    if epoch < config.freeze_epochs:
        model.backbone.eval()  # keep batch-norm statistics frozen too
    loss_sum, correct, count = 0.0, 0, 0
    progress = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not runtime.is_main)
    for images, targets, *masks in progress:
        targets = targets.to(runtime.device, non_blocking=True)
        loss, logits = train_step(network, model, images, targets, masks, fit, config,
                                  runtime.device, amp)
        loss_sum += loss * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        count += len(targets)
        progress.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}")
    # on the training device: NCCL (CUDA) reduces CUDA tensors only
    totals = torch.tensor([loss_sum, correct, count], dtype=torch.float64, device=runtime.device)
    if runtime.distributed:
        dist.all_reduce(totals)
    scores = {"train_loss": float(totals[0] / totals[2]),
              "train_accuracy": float(totals[1] / totals[2])}
    return scores, int(totals[2])


def train_step(network: nn.Module, model: AttentionClassifier, images: torch.Tensor,
               targets: torch.Tensor, masks: list[torch.Tensor], fit: Optimisation,
               config: TrainConfig, device: torch.device, amp: bool
               ) -> tuple[float, torch.Tensor]:
    """One optimiser step on a batch (``masks``: the cell masks when mask guidance is on);
    the batch's loss and logits."""
    images = images.to(device, non_blocking=True)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        logits = network(images)
        loss = fit.criterion(logits.float(), targets)
    if masks:  # mask guidance: the class token's attention belongs on the cell
        attention = model.last_attention.float()
        cover = token_cover(masks[0].to(device), attention.shape[-2:])
        loss = loss + config.mask_guidance * attention_outside_cell_loss(attention, cover)
    fit.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    fit.optimizer.step()
    fit.step += 1
    if fit.ema is not None:
        fit.ema.update(model, step=fit.step)
    fit.scheduler.step_update(fit.step)
    return loss.item(), logits


def validate(model: nn.Module, loader: DataLoader, labels: torch.Tensor, runtime: Runtime,
             amp: bool, channels_last: bool, num_classes: int
             ) -> tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor]]:
    """Validation loss, accuracy and macro-F1 over every rank's share (``labels``: this
    rank's), with the gathered logits and labels (for temperature scaling)."""
    logits, _ = predict_logits(model, (images for images, _ in loader), runtime.device, amp,
                               channels_last)
    logits, labels = _gather(logits, runtime), _gather(labels, runtime)
    scores = {"val_loss": float(nn.functional.cross_entropy(logits, labels)),
              "val_accuracy": float((logits.argmax(1) == labels).float().mean()),
              "val_macro_f1": macro_f1(labels.numpy(), logits.argmax(1).numpy(), num_classes)}
    return scores, (logits, labels)


@dataclass
class EarlyStopping:
    """The best epoch so far (by validation macro-F1; a tie is no gain), its weights and
    validation logits; stop once ``patience`` epochs have passed without a gain."""

    patience: int
    epoch: int = -1
    score: float = -1.0
    record: dict[str, Any] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    val: tuple[torch.Tensor, torch.Tensor] | None = None

    def should_stop(self, record: dict[str, Any], model: nn.Module,
                    val: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Keep this epoch if it is the best yet, else say whether patience has run out."""
        if record["val_macro_f1"] > self.score:
            self.epoch, self.score, self.record = record["epoch"], record["val_macro_f1"], record
            self.state, self.val = copy.deepcopy(model.state_dict()), val
            return False
        return record["epoch"] - self.epoch >= self.patience


@dataclass
class Throughput:
    """Wall time of the whole run, and time and images spent in training steps."""

    started: float = field(default_factory=time.perf_counter)
    train_seconds: float = 0.0
    images: int = 0


@dataclass
class Run:
    """What a training run sets up before its first epoch."""

    model: AttentionClassifier
    weight_source: str
    config: TrainConfig  # the recipe trained with (random_init overrides applied)
    recipe: str
    classes: list[str]
    prep: Preprocess
    train_set: CellDataset
    train_loader: DataLoader
    val_loader: DataLoader
    val_labels: torch.Tensor  # of this rank's validation share
    amp: bool
    fit: Optimisation

    @property
    def kept(self) -> nn.Module:
        """The weights validated and saved: their moving average when on, else the model."""
        return self.fit.ema.module if self.fit.ema is not None else self.model


def set_up(name: str, model_config: ModelConfig, config: TrainConfig, mask_params: MaskParams,
           rows: dict[str, pd.DataFrame], images_dir: Path, masks_dir: Path, runtime: Runtime
           ) -> Run:
    """Model, recipe, data and optimisation of a run (``rows``: its train and val images), on
    ``runtime``'s device."""
    classes = sorted(set(rows["train"]["label"]) | set(rows["val"]["label"]))
    model, weight_source = build_model(model_config, len(classes))
    config, recipe = recipe_for(config, weight_source)
    if recipe != "default" and runtime.is_main:
        logger.warning("%s: %s, so training with the random-init recipe: %s", name,
                       weight_source, config.random_init)
    prep = Preprocess(model_config.image_size, **data_config(model), **config.preprocess_settings())
    train_set, val_set = build_datasets(rows, classes, prep, images_dir, masks_dir, mask_params,
                                        with_masks=config.mask_guidance > 0,
                                        in_memory_max_mb=config.in_memory_max_mb)
    train_loader, val_loader = build_loaders(train_set, val_set, config, runtime)
    model.to(runtime.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    fit = build_optimisation(model, config, train_set.labels, len(classes), len(train_loader),
                             runtime.device)
    return Run(model, weight_source, config, recipe, classes, prep, train_set, train_loader,
               val_loader, val_set.labels[runtime.rank::runtime.world_size],
               use_bf16(runtime.device, config.amp), fit)


def train_model(name: str, model_config: ModelConfig, config: TrainConfig, mask_params: MaskParams,
                split_dir: Path, images_dir: Path, masks_dir: Path, out_dir: Path,
                metrics_path: Path, live_dir: Path, resources_path: Path | None = None,
                resume_path: Path | None = None) -> dict[str, Any]:
    """Train one model end to end and write its checkpoint, metrics and DVCLive logs.

    Timings, throughput and memory go to ``resources_path`` (default: beside the metrics, as
    ``train_resources.json``), not to the metrics, so that metric diffs show quality only. With
    ``resume_path`` (and ``config.resume``), the state saved there between epochs (at least
    ``config.resume_every_s`` apart) lets an interrupted run continue after its last saved epoch."""
    runtime = start_runtime(config)
    _seed_everything(config.seed)
    clock = Throughput()
    rows = {part: read_split(split_dir, part) for part in ("train", "val")}
    run = set_up(name, model_config, config, mask_params, rows, images_dir, masks_dir, runtime)
    saving = None
    if resume_path is not None and config.resume:
        settings = {key: value for key, value in asdict(config).items() if key not in RESUME_KEYS}
        saving = Saving(resume_path, run_key(
            [name, asdict(model_config), settings, asdict(mask_params), runtime.world_size],
            _run_files(rows, split_dir, masks_dir)))
    with _live_logs(live_dir, runtime) as live:
        stopper, history = fit_with_early_stopping(name, run, runtime, clock, live, saving)
        run.model.load_state_dict(stopper.state)
        temperature = _temperature(name, run, stopper)
        epochs_run = len(history)
        if config.refit:
            _seed_everything(config.seed)  # the same start: initial head, shuffles, augmentations
            both = {"train": pd.concat([rows["train"], rows["val"]]), "val": rows["val"]}
            run = set_up(name, model_config, config, mask_params, both, images_dir, masks_dir,
                         runtime)
            history += refit(name, run, stopper.epoch, runtime, clock)
        summary = _summary(name, model_config, run, stopper, epochs_run, temperature, clock,
                           runtime)
        if runtime.is_main:
            # weights fitted on train, epoch and temperature chosen on val: both are seen images
            seen = seen_record(pd.concat(rows.values()))
            checkpoint = _checkpoint(name, model_config, mask_params, run, temperature, summary,
                                     history, seen, ingested_data(images_dir.parent))
            write_outputs(checkpoint, out_dir, metrics_path, resources_path)
            _end_live(live, stopper.record)
            if saving is not None:
                clear_state(saving.path)
    if runtime.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _epochs(name: str, run: Run, epochs: int, runtime: Runtime, clock: Throughput,
            phase: str = "epoch", first: int = 0):
    """Train ``run`` epoch after epoch (from ``first``, at most ``epochs``); yield each epoch's
    number (from 0) and training scores, its kept weights (the moving average when on) up to
    date."""
    config, model, fit = run.config, run.model, run.fit
    for epoch in range(first, epochs):
        if epoch in (first, config.freeze_epochs):
            set_backbone_frozen(model, epoch < config.freeze_epochs)
            network = _wrap(model, config, runtime)
        epoch_start = time.perf_counter()
        train_scores, images = train_one_epoch(network, model, run.train_loader, fit, config,
                                               runtime, run.amp, epoch,
                                               f"{name} {phase} {epoch + 1}/{epochs}")
        clock.train_seconds += time.perf_counter() - epoch_start
        clock.images += images
        if config.recompute_bn:  # from scratch, the running averages lag behind the weights
            with random_streams_kept(run.train_loader):
                batches = first_images(run.train_loader, config.recompute_bn_images)
                reestimate_batchnorm(run.kept, batches, runtime.device, run.amp,
                                     config.channels_last)
        stop_if_diverged(f"{name} {phase} {epoch + 1}", config, train_scores, model, run.kept)
        yield epoch, train_scores


def first_images(loader: DataLoader, count: int | None) -> Iterator[torch.Tensor]:
    """The loader's image batches, up to the one that reaches ``count`` images (None: all)."""
    seen = 0
    for images, *_ in loader:
        if count is not None and seen >= count:
            return
        yield images
        seen += len(images)


@contextmanager
def random_streams_kept(loader: DataLoader) -> Iterator[None]:
    """Within the block, draws from the generators an epoch uses (PyTorch's, NumPy's, the
    loader's) are given back: an extra pass over the data leaves every later epoch as it was."""
    state = random_state(loader.generator)
    try:
        yield
    finally:
        restore_random_state(state, loader.generator)


def _run_files(rows: dict[str, pd.DataFrame], split_dir: Path, masks_dir: Path) -> list[Path]:
    """The files whose bytes identify a run's data: its split's CSVs (which hold every image's
    sha256) and the mask files of its images."""
    masks = {mask_path(masks_dir, path) for part in rows.values() for path in part["path"]}
    return [*(split_dir / f"{part}.csv" for part in rows),
            *sorted(mask for mask in masks if mask.is_file())]


@dataclass(frozen=True)
class Saving:
    """Where a run saves its state between epochs, and the key of the run (``run_key``)."""

    path: Path
    key: str


def fit_with_early_stopping(name: str, run: Run, runtime: Runtime, clock: Throughput, live,
                            saving: Saving | None = None
                            ) -> tuple[EarlyStopping, list[dict[str, Any]]]:
    """Train, validating each epoch; return the best epoch (its weights and validation logits)
    and every epoch's record. With ``saving``, the state is saved after an epoch once
    ``config.resume_every_s`` have passed since the last save, and a saved state of the same run
    is picked up where it stopped."""
    config, fit, kept = run.config, run.fit, run.kept
    stopper, history = EarlyStopping(config.patience), []
    stopped = resume_run(saving, run, stopper, history, clock) if saving else False
    saved_at = time.perf_counter()
    for record in history:  # the epochs of the interrupted run, in the logs again
        _log_epoch(live, record, name, config.epochs, runtime)
    epochs = _epochs(name, run, config.epochs, runtime, clock, first=len(history))
    for epoch, train_scores in () if stopped else epochs:
        val_scores, val = validate(kept, run.val_loader, run.val_labels, runtime, run.amp,
                                   config.channels_last, len(run.classes))
        stop_if_diverged(f"{name} epoch {epoch + 1}", config, val_scores)
        record = {"epoch": epoch + 1, **train_scores, **val_scores,
                  "lr": fit.optimizer.param_groups[-1]["lr"]}
        history.append(record)
        _log_epoch(live, record, name, config.epochs, runtime)
        stopped = stopper.should_stop(record, kept, val)
        if saving and runtime.is_main and time.perf_counter() - saved_at >= config.resume_every_s:
            save_state(saving.path, saving.key, training_state(run, stopper, history, clock,
                                                               stopped))
            saved_at = time.perf_counter()
        if stopped:
            if runtime.is_main:
                logger.info("%s: early stop, no val macro-F1 gain for %d epochs", name,
                            config.patience)
            break
    return stopper, history


def training_state(run: Run, stopper: EarlyStopping, history: list[dict[str, Any]],
                   clock: Throughput, stopped: bool) -> dict[str, Any]:
    """Everything the next epoch depends on, for ``pipeline.resume.save_state``."""
    fit = run.fit
    return {"model": run.model.state_dict(), "optimizer": fit.optimizer.state_dict(),
            "ema": fit.ema.state_dict() if fit.ema is not None else None, "step": fit.step,
            "best": {"epoch": stopper.epoch, "score": stopper.score, "record": stopper.record,
                     "state": stopper.state, "val": stopper.val},
            "history": history, "stopped": stopped,
            "clock": [time.perf_counter() - clock.started, clock.train_seconds, clock.images],
            "random": random_state(run.train_loader.generator)}


def resume_run(saving: Saving, run: Run, stopper: EarlyStopping, history: list[dict[str, Any]],
               clock: Throughput) -> bool:
    """Load the saved state of this run, if any, into ``run``, ``stopper``, ``history`` and
    ``clock``; return whether that run had already stopped early."""
    state = load_state(saving.path, saving.key)
    if state is None:
        return False
    fit = run.fit
    run.model.load_state_dict(state["model"])
    fit.optimizer.load_state_dict(state["optimizer"])
    if fit.ema is not None:
        fit.ema.load_state_dict(state["ema"])
    fit.step = state["step"]
    fit.scheduler.step_update(fit.step)
    best = state["best"]
    stopper.epoch, stopper.score, stopper.record = best["epoch"], best["score"], best["record"]
    stopper.state, stopper.val = best["state"], best["val"]
    history.extend(state["history"])
    elapsed, clock.train_seconds, clock.images = state["clock"]
    clock.started = time.perf_counter() - elapsed
    restore_random_state(state["random"], run.train_loader.generator)
    logger.info("%s: resuming after epoch %d of %d (%s)", saving.path, len(history),
                run.config.epochs, "stopped early" if state["stopped"] else "continuing")
    return state["stopped"]


class TrainingDiverged(PipelineError):
    """The loss, the weights or the temperature stopped being finite numbers."""


def stop_if_diverged(where: str, config: TrainConfig, scores: dict[str, float],
                     *modules: nn.Module) -> None:
    """Raise :class:`TrainingDiverged` when a score or a floating-point tensor (weights and
    buffers) of ``modules`` is NaN or infinite: such a run has nothing worth saving."""
    problems = [f"{key} is {value}" for key, value in scores.items() if not math.isfinite(value)]
    tensors = {id(t): t for module in modules for t in module.state_dict().values()
               if t.is_floating_point()}  # the kept weights may be the model itself
    finite = [torch.isfinite(t).all() for t in tensors.values()]
    if finite and (broken := int((~torch.stack(finite)).sum())):  # one device sync
        problems.append(f"{broken} weight tensor(s) hold NaN or infinity")
    if problems:
        raise TrainingDiverged(f"{where}: training diverged ({'; '.join(problems)}); nothing "
                               f"was written: lower train.lr (now {config.lr}) or the recipe's "
                               "other step sizes")


def _temperature(name: str, run: Run, stopper: EarlyStopping) -> float:
    """The kept epoch's fitted temperature (1 when ``temperature_scaling`` is off); a
    non-finite fit is refused."""
    if not run.config.temperature_scaling:
        return 1.0
    temperature = fit_temperature(*stopper.val)
    stop_if_diverged(f"{name} temperature scaling", run.config, {"temperature": temperature})
    return temperature


def refit(name: str, run: Run, epochs: int, runtime: Runtime, clock: Throughput
          ) -> list[dict[str, Any]]:
    """Train ``run`` (train and validation images together) for the ``epochs`` validation chose,
    on the same schedule, with nothing left to validate on; keep its last (averaged) weights in
    ``run.model``. Returns the epochs' records (``phase: refit``)."""
    history = []
    for epoch, train_scores in _epochs(name, run, epochs, runtime, clock, "refit epoch"):
        record = {"epoch": epoch + 1, "phase": "refit", **train_scores,
                  "lr": run.fit.optimizer.param_groups[-1]["lr"]}
        history.append(record)
        if runtime.is_main:
            logger.info("%s refit epoch %d/%d train_loss=%.4g train_accuracy=%.4g", name,
                        epoch + 1, epochs, record["train_loss"], record["train_accuracy"])
    run.model.load_state_dict(run.kept.state_dict())
    return history


def _summary(name: str, model_config: ModelConfig, run: Run, best: EarlyStopping,
             epochs_run: int, temperature: float, clock: Throughput, runtime: Runtime
             ) -> dict[str, Any]:
    """The run in one flat record: quality figures, then resources (``RESOURCE_KEYS``)."""
    return {
        "model": name,
        "backbone": model_config.backbone,
        "image_size": model_config.image_size,
        "weight_source": run.weight_source,
        "recipe": run.recipe,
        "best_epoch": best.epoch,
        "epochs_run": epochs_run,
        "val_accuracy": best.record["val_accuracy"],
        "val_macro_f1": best.record["val_macro_f1"],
        "temperature": temperature,
        # with refit: the images of the second run (train + validation); the validation figures
        # above and the temperature are the first run's, on images it did not train on
        "train_images": len(run.train_set),
        **({"refit_on_val": True} if run.config.refit else {}),
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "seconds": time.perf_counter() - clock.started,
        "train_seconds": clock.train_seconds,
        "images_per_second": clock.images / max(clock.train_seconds, 1e-9),
        "device": str(runtime.device),
        "environment": run_environment(runtime.device),
        "world_size": runtime.world_size,
        "distributed": runtime.distributed,
        "numeric_mode": numeric_mode(run.amp),
        "peak_memory_mb": peak_memory_mb(runtime.device),
    }


def _checkpoint(name: str, model_config: ModelConfig, mask_params: MaskParams, run: Run,
                temperature: float, summary: dict[str, Any], history: list[dict[str, Any]],
                seen: dict[str, list[str]], training_data: dict[str, Any] | None
                ) -> dict[str, Any]:
    """The trained model with everything needed to use and to reproduce it, what it was trained
    on, and the digests of the images it has seen (``pipeline.leakage``)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "name": name,
        "state_dict": {k: v.cpu() for k, v in run.model.state_dict().items()},
        "classes": run.classes,
        "model_config": asdict(model_config),
        "preprocess": run.prep.to_dict(),
        "mask_params": asdict(mask_params),
        "train_config": asdict(run.config),
        "temperature": temperature,
        "summary": summary,
        "history": history,
        "training_data": training_data,
        **seen,
    }


def ingested_data(raw_dir: Path) -> dict[str, Any] | None:
    """What the download stage ingested (source, synthetic or not, images per class), for the
    model file; None when the images do not come from an ingested folder."""
    if not (raw_dir / "source.json").is_file() or not (raw_dir / "manifest.csv").is_file():
        return None
    return training_record(raw_dir).model_dump()


def write_outputs(checkpoint: dict[str, Any], out_dir: Path, metrics_path: Path,
                  resources_path: Path | None = None) -> None:
    """The checkpoint (the folder replaced atomically), the training record (``metrics_path``:
    epochs, validation scores, temperature, weight source, kernels; a plain output, not a DVC
    metric, so ``dvc metrics show`` holds evaluation figures only) and, apart, the resources
    used (default: ``train_resources.json`` beside the record)."""
    summary = checkpoint["summary"]
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_checkpoint(checkpoint, tmp / MODEL_FILE)
    write_json(metrics_path, {k: v for k, v in summary.items() if k not in RESOURCE_KEYS})
    write_json(resources_path or metrics_path.with_name("train_resources.json"),
               {k: summary[k] for k in RESOURCE_KEYS})

@contextmanager
def _live_logs(live_dir: Path, runtime: Runtime) -> Iterator[Any]:
    """DVCLive logger on rank 0 (None elsewhere; its plots are declared in dvc.yaml), logging
    into a temporary folder that replaces ``live_dir`` only when the run succeeds: a failed or
    interrupted run leaves the previous logs, not half of its own."""
    if not runtime.is_main:
        yield None
        return
    from dvclive import Live

    with atomic_path(live_dir) as folder:
        yield Live(dir=str(folder), dvcyaml=None, save_dvc_exp=False, report=None)


def _log_epoch(live, record: dict[str, Any], name: str, epochs: int, runtime: Runtime) -> None:
    """One log line per epoch, and one row in DVCLive's plots (``step``: the epoch number)."""
    if runtime.is_main:
        logger.info("%s epoch %d/%d %s", name, record["epoch"], epochs,
                    " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
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
