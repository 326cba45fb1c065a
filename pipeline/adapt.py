"""Adapting a trained model to another laboratory's microscope, without labels.

Batch normalisation keeps a running mean and variance of every channel, learnt on the training
laboratory's images. Another laboratory's stain and optics shift those statistics, and every
layer after the first sees inputs it was not trained on. AdaBN (Li et al., 2016, "Revisiting
batch normalization for practical domain adaptation") re-estimates them on unlabelled images of
the new laboratory; the weights stay as trained, no label is read.

- ``wbc adapt MODEL FOLDER -o adapted.safetensors`` writes such a model (its metadata names the
  folder and the number of images), for ``wbc predict`` and ``wbc evaluate``;
- ``evaluate.adapt`` (``{external set name: folder}``) scores the adapted model beside each
  external set it names, as ``<set>-adapted``.

Adapt on images of the new laboratory that are not the ones scored (for bccd-sample: its TRAIN
folder, then score its TEST), or say that the adaptation saw the scored images.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.data import Preprocess, eval_transform, prepare_all, stack_images
from pipeline.device import select_device, use_bf16
from pipeline.errors import InputError
from pipeline.io import atomic_path
from pipeline.masks import MaskParams
from pipeline.model_file import write_model_file
from pipeline.models import load_model_file, reestimate_batchnorm
from pipeline.scoring import resolve_model
from pipeline.sources import collect_inputs

logger = logging.getLogger(__name__)

MIN_IMAGES = 32  # fewer give batch statistics too noisy to replace the trained ones


def adaptation_images(files: list[Path], prep: Preprocess, mask_params: MaskParams
                      ) -> torch.Tensor:
    """The readable ones of ``files`` as model input (N, 3, S, S) uint8; unreadable files are
    skipped and counted; fewer than ``MIN_IMAGES`` readable is an error."""
    prepared = prepare_all(files, prep, None, mask_params, "adaptation images")
    readable = [item for item in prepared if not isinstance(item, str)]
    if skipped := len(prepared) - len(readable):
        logger.warning("adaptation: skipped %d unreadable of %d images", skipped, len(prepared))
    if len(readable) < MIN_IMAGES:
        raise InputError(f"adaptation needs at least {MIN_IMAGES} readable images of the new "
                         f"laboratory, found {len(readable)}")
    return stack_images(readable)


def adapt_model(model: nn.Module, folder: str | Path, prep: Preprocess, mask_params: MaskParams,
                device: torch.device, batch_size: int) -> dict[str, Any]:
    """Re-estimate ``model``'s batch-norm statistics on the images below ``folder`` (labels,
    if any, are not read); return what the adaptation saw."""
    if not Path(folder).is_dir():
        raise InputError(f"{folder}: not a folder of images")
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise InputError("the model has no batch normalisation to adapt")
    images = adaptation_images(collect_inputs([folder]), prep, mask_params)
    normalise = eval_transform(prep)
    batches = (normalise(images[start:start + batch_size])
               for start in range(0, len(images), batch_size))
    reestimate_batchnorm(model, batches, device, use_bf16(device))
    logger.info("adapted batch-norm statistics on %d images of %s", len(images), folder)
    return {"folder": str(folder), "images": len(images)}


def adapt_checkpoint(model: str | Path, folder: Path, out_path: Path, device: str = "auto",
                     batch_size: int = 64) -> dict[str, Any]:
    """``wbc adapt``: the checkpoint ``model`` (a model.safetensors, its folder or a model name
    in data/models) with its batch-norm statistics re-estimated on ``folder``, written to
    ``out_path`` (its metadata gains ``adapted_on``)."""
    tree = resolve_model(model)
    if tree.members or tree.path.suffix != ".safetensors":
        raise InputError(f"{model}: adapt a model.safetensors (not an ensemble or an "
                         f"ONNX export; adapt each member, then export)")
    torch_device = select_device(device)
    network, model_file = load_model_file(tree.path, torch_device)
    adapted_on = adapt_model(network, folder, model_file.preprocess, model_file.mask_params,
                             torch_device, batch_size)
    with atomic_path(out_path) as staging:
        write_model_file(replace(model_file, adapted_on=adapted_on), network.state_dict(),
                         staging)
    return adapted_on
