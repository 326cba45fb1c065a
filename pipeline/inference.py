"""The one inference loop: a network's logits over batches of normalised images.

Training validates with it (batches from a data loader) and evaluation scores with it (batches of
prepared images, optionally with test-time augmentation and the class-token attention maps).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pipeline.device import autocast


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and 90-degree rotations of a batch (smear images have no up or left)."""
    rotations = [torch.rot90(images, k, dims=(2, 3)) for k in range(4)]
    return rotations + [view.flip(3) for view in rotations]


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
                   amp: bool, channels_last: bool = True, tta: bool = False,
                   attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (float32, on the CPU, in order; averaged over the 8 views with ``tta``) and, with
    ``attention``, the class-token attention maps of the plain view."""
    model.eval()
    outputs, maps = [], []
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        views = dihedral_views(batch) if tta else [batch]
        logits = 0
        for number, view in enumerate(views):
            if channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                logits = logits + model(view).float()
            if attention and number == 0:
                maps.append(model.last_attention.float().cpu())
        outputs.append((logits / len(views)).cpu())
    return torch.cat(outputs), torch.cat(maps) if maps else None
