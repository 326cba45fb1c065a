"""Where a model looks, and whether that is the cell: attention, Grad-CAM and a number for each.

Both maps are scored against the pipeline's own GrabCut mask, carried through the same crop and
resize the model's input went through (``data.prepare_mask``):

- ``attention_in_cell``: share of the class token's attention mass inside the mask. The map is
  the model's ``last_attention`` (attention rollout over all blocks, heads averaged; see
  ``pipeline.models``); each token stands for its block of the input, so a token's mass counts
  in proportion to the part of its block the mask covers.
- ``gradcam_in_cell``: the same for the gradient map of the predicted class on the backbone's
  last feature stage (as timm's ``feature_info`` names it), computed with HiResCAM (Draelos &
  Carin 2020; the maintained ``pytorch_grad_cam`` package): each location's activations times
  the class score's gradient *at that location*, summed over channels. Plain Grad-CAM averages
  the gradient over all locations first, which assumes the classifier pools the feature map
  evenly; this one pools it by attention, so Grad-CAM lit up the background wherever the cell's
  channels were active (0.38 in the cell, chance 0.27, on pbc-train's test split; HiResCAM 0.87:
  BENCHMARKS.md, "Where the model looks"). The map is the package's output (ReLU, min-max
  scaled), at input resolution; where no location raises the class score the map is all zero
  and the score is NaN (left out of means).
- ``cell_area``: the share of the input the mask covers, i.e. what a uniform map scores.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam import HiResCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from tqdm import tqdm

from pipeline.data import Preprocess, eval_transform, load_masks
from pipeline.device import select_device
from pipeline.figures import model_title, new_figure, plain_text, save_figure
from pipeline.io import write_csv
from pipeline.masks import MaskParams
from pipeline.models import load_model_file
from pipeline.scoring import (
    calibrated,
    infer,
    prepare_inputs,
    pytorch_checkpoint,
    resolve_model,
    warn_if_synthetic,
)
from pipeline.sources import collect_inputs

logger = logging.getLogger(__name__)

SCORES = ("attention_in_cell", "gradcam_in_cell", "cell_area")


def mass_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of a non-negative map's mass inside a boolean mask (NaN for an all-zero map).

    A map coarser than the mask (a token grid) is scored cell by cell: each cell's mass counts
    in proportion to the fraction of its block of the input that the mask covers.
    """
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.min() < 0:
        raise ValueError("a heat map must be non-negative")
    cover = mask.astype(np.float32)
    if heatmap.shape != mask.shape:
        cover = cv2.resize(cover, heatmap.shape[::-1], interpolation=cv2.INTER_AREA)
    total = heatmap.sum()
    return float((heatmap * cover).sum() / total) if total > 0 else float("nan")


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The backbone's last feature stage, as timm's ``feature_info`` names it."""
    backbone = model.backbone
    return backbone.get_submodule(backbone.feature_info[-1]["module"])


def gradcam_maps(model: nn.Module, images: torch.Tensor, prep: Preprocess,
                 device: torch.device | str = "cpu", batch_size: int = 32,
                 targets: np.ndarray | None = None) -> np.ndarray:
    """The gradient map (HiResCAM, N x S x S, in [0, 1]) of uint8 images, for ``targets`` or the
    predicted class."""
    model = model.eval().to(device)
    normalise = eval_transform(prep)
    maps = []
    with HiResCAM(model=model, target_layers=[gradcam_layer(model)]) as cam:
        for start in tqdm(range(0, len(images), batch_size), desc="grad-cam", unit="batch",
                          leave=False):
            batch = normalise(images[start:start + batch_size]).to(device)
            chosen = None
            if targets is not None:
                chosen = [ClassifierOutputTarget(int(t)) for t in targets[start:start + len(batch)]]
            maps.append(cam(input_tensor=batch, targets=chosen))
    return np.concatenate(maps)


def localisation_scores(attention: np.ndarray | None, gradcam: np.ndarray | None,
                        masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image ``attention_in_cell``, ``gradcam_in_cell`` and ``cell_area`` (NaN if no map)."""
    def score(maps: np.ndarray | None) -> np.ndarray:
        if maps is None:
            return np.full(len(masks), np.nan)
        return np.array([mass_in_mask(m, k) for m, k in zip(maps, masks, strict=True)])

    return {"attention_in_cell": score(attention), "gradcam_in_cell": score(gradcam),
            "cell_area": masks.reshape(len(masks), -1).mean(1)}


def _density(heatmap: np.ndarray, size: int) -> np.ndarray:
    """A map at input size, as density relative to uniform (1 = chance, 3 = thrice chance)."""
    heat = cv2.resize(np.asarray(heatmap, np.float32), (size, size),
                      interpolation=cv2.INTER_NEAREST)
    return heat / max(float(heat.mean()), 1e-12)


def explain_png(images: np.ndarray, masks: np.ndarray, attention: np.ndarray,
                gradcam: np.ndarray, titles: list[str], wrong: list[bool], title: str,
                path: Path, per_row: int = 4) -> None:
    """Panels of (crop with mask outline, attention, Grad-CAM) per image, one colour scale.

    Both maps are drawn as density relative to a uniform map, so a colour means the same in
    every panel and for both methods; the mask outline shows where the cell is.
    """
    size = images.shape[1]
    densities = [(_density(a, size), _density(g, size)) for a, g in
                 zip(attention, gradcam, strict=True)]
    top = max([float(np.percentile(np.stack(d), 99)) for d in densities] + [2.0])
    rows = max(1, int(np.ceil(len(images) / per_row)))
    fig = new_figure((2.0 * 3 * per_row, 2.35 * rows))
    axes = fig.subplots(rows, 3 * per_row, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    shown = None
    for index, (image, mask, maps) in enumerate(zip(images, masks, densities, strict=True)):
        row, column = divmod(index, per_row)
        crop_ax, *map_axes = axes[row, 3 * column: 3 * column + 3]
        colour = "red" if wrong[index] else "black"
        crop_ax.imshow(image)
        crop_ax.set_title(plain_text(("WRONG  " if wrong[index] else "") + titles[index]),
                          fontsize=7, color=colour)
        names = ("attention", "Grad-CAM (HiResCAM)")
        for ax, density, name in zip(map_axes, maps, names, strict=True):
            ax.imshow(image, alpha=0.5)
            shown = ax.imshow(density, cmap="inferno", vmin=0, vmax=top, alpha=0.65)
            share = mass_in_mask(density, mask)
            ax.set_title(f"{name}: {share:.0%} in cell" if np.isfinite(share)
                         else f"{name}: all zero", fontsize=7, color=colour)
        for ax in (crop_ax, *map_axes):
            ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
    if shown is not None:
        bar = fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.015, pad=0.01)
        bar.set_label("density relative to a uniform map (1 = chance)")
    fig.suptitle(plain_text(title))
    save_figure(fig, path, tight=False)


def sample_for_figure(labels: np.ndarray, predicted: np.ndarray, classes: list[str],
                      seed: int = 0) -> list[int]:
    """Per class, one seeded correct and one seeded wrong test image (where there is one)."""
    rng = np.random.default_rng(seed)
    picks = []
    for index in range(len(classes)):
        for group in (np.nonzero((labels == index) & (predicted == index))[0],
                      np.nonzero((labels == index) & (predicted != index))[0]):
            if len(group):
                picks.append(int(rng.choice(group)))
    return picks


def localise(model: nn.Module, images: torch.Tensor, attention: torch.Tensor | None,
             paths: list[Path], mask_files: list[Path] | None, prep: Preprocess,
             mask_params: MaskParams, device: torch.device | str, batch_size: int,
             predicted: np.ndarray) -> dict[str, np.ndarray | dict[str, np.ndarray]]:
    """Masks on the model's input, Grad-CAM of the predicted class and the per-image scores."""
    masks = load_masks(paths, mask_files, prep, mask_params)
    gradcam = gradcam_maps(model, images, prep, device, batch_size, targets=predicted)
    maps = None if attention is None else attention.float().numpy()
    return {"masks": masks, "gradcam": gradcam,
            "scores": localisation_scores(maps, gradcam, masks)}


def mean_scores(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """The three scores averaged over images (NaN-skipping), for ``eval.json``."""
    return {name: float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            for name, values in scores.items()}


def figure_for(images: torch.Tensor, localised: dict, attention: torch.Tensor,
               picks: list[int], predicted: list[str], confidence: np.ndarray,
               true: list[str] | None, title: str, path: Path) -> None:
    """``explain_png`` for the chosen images of a scored set (``true`` None: labels unknown)."""
    titles = [f"pred {predicted[i]} ({confidence[i]:.0%})" for i in picks]
    wrong = [False] * len(picks)
    if true is not None:
        titles = [f"true {true[i]}\n{text}" for i, text in zip(picks, titles, strict=True)]
        wrong = [true[i] != predicted[i] for i in picks]
    explain_png(images[picks].permute(0, 2, 3, 1).numpy(), localised["masks"][picks],
                attention[picks].float().numpy(), localised["gradcam"][picks], titles, wrong,
                title, path)


def explain_checkpoint(checkpoint_path: Path, files: list[Path], out_dir: Path,
                       device: torch.device, batch_size: int = 32,
                       per_page: int = 16) -> pd.DataFrame:
    """Scores, maps and ``explain*.png`` pages for one model over image files (bad ones skipped)."""
    model, model_file = load_model_file(checkpoint_path, device)
    warn_if_synthetic([(checkpoint_path, model_file)])
    prep = model_file.preprocess
    prepared = prepare_inputs(files, prep, model_file.mask_params)
    good = [i for i, item in enumerate(prepared) if not isinstance(item, str)]
    rows = pd.DataFrame({"path": [str(f) for f in files], "model": model_file.name,
                         "error": [item if isinstance(item, str) else "" for item in prepared]})
    if not good:
        return rows
    images = torch.from_numpy(np.stack([prepared[i] for i in good])).permute(0, 3, 1, 2)
    logits, attention, _ = infer(model, images, prep, device, batch_size, attention=True)
    probabilities = calibrated(logits, model_file.temperature)
    predicted = probabilities.argmax(1)
    localised = localise(model, images, attention, [files[i] for i in good], None, prep,
                         model_file.mask_params, device, batch_size, predicted)
    names = [model_file.classes[i] for i in predicted]
    rows.loc[good, "predicted"] = names
    rows.loc[good, "confidence"] = probabilities.max(1)
    for score, values in localised["scores"].items():
        rows.loc[good, score] = values
    for page, start in enumerate(range(0, len(good), per_page), start=1):
        picks = list(range(start, min(start + per_page, len(good))))
        figure_for(images, localised, attention, picks, names, probabilities.max(1), None,
                   f"{model_title(model_file.name, model_file.summary)}: where the model looks "
                   "(attention rollout, HiResCAM)",
                   out_dir / ("explain.png" if page == 1 else f"explain_{page}.png"))
    return rows


def explain_files(model: str | Path, inputs: list[str | Path], out_dir: Path,
                  device: str = "auto", batch_size: int = 32) -> pd.DataFrame:
    """``wbc explain``: panels and ``scores.csv`` for a model's (or each ensemble member's) view
    of image files and folders; unreadable files get a row with the reason in ``error``. An
    ONNX export is refused in one line: Grad-CAM needs the PyTorch model."""
    tree = resolve_model(model)
    checkpoints = [pytorch_checkpoint(path, "wbc explain") for path in tree.checkpoints()]
    files = collect_inputs(inputs)
    if not files:
        raise FileNotFoundError("no input files")
    torch_device = select_device(device)
    tables = []
    for index, checkpoint_path in enumerate(checkpoints):  # each checkpoint once
        folder = out_dir / f"member{index + 1}" if tree.members else out_dir
        tables.append(explain_checkpoint(checkpoint_path, files, folder, torch_device,
                                         batch_size))
    table = pd.concat(tables, ignore_index=True)
    write_csv(out_dir / "scores.csv", table)
    return table
