"""Across laboratories: cell-scale and stain normalisation, and stain augmentation.

Two microscopes differ in how many pixels a cell spans and in the colour of the stain. Both are
measured from the image itself, so training and inference apply the same correction (the settings
live in :class:`pipeline.data.Preprocess`, saved in every checkpoint):

- scale: the white cell's mask (GrabCut, :mod:`pipeline.masks`) gives its diameter; the image is
  cropped around the cell to a square in which that diameter is ``cell_fraction`` of the side.
- stain: each channel's optical density is scaled so that the slide around the cell (plasma and
  red cells) matches a fixed reference (``STAIN_REFERENCE``, measured on PBC), and the image is
  lit with the reference lamp.
- augmentation: the HED jitter of Tellez et al. (2018) scales and shifts the haematoxylin, eosin
  and residual channels of the Ruifrok-Johnston colour deconvolution.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB), as in scikit-image.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

# Reference slide: the lamp (RGB) and the mean optical density per channel of plasma and red
# cells, the medians over pbc-1560 (bench/transfer.py prints them).
STAIN_REFERENCE = ((255.0, 232.0, 205.0), (0.094, 0.145, 0.095))
# What ``train.transfer: true`` turns on (each can also be set on its own in params.yaml: train).
TRANSFER_SETTINGS: dict[str, Any] = {"cell_fraction": 0.6, "stain_normalise": True,
                                     "stain_jitter": 0.3, "blur_sigma": 2.0}
LIGHT = 255.0  # the lamp: the brightness of an empty field
_BLACK_FILL = 20  # pixels darker than this in every channel are fill left by rotation, not stain


def transfer_preprocessing(config: Any) -> dict[str, Any]:
    """The ``Preprocess`` settings of a training recipe (``TrainConfig``): its own values, with
    ``transfer: true`` filling those left at their off value from ``TRANSFER_SETTINGS``."""
    chosen = {key: getattr(config, key) for key in TRANSFER_SETTINGS}
    if config.transfer:
        chosen |= {key: value for key, value in TRANSFER_SETTINGS.items() if not chosen[key]}
    return chosen


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Absorbance per channel, ``-log(I / I0)``, of an RGB uint8 image (float32, same shape)."""
    return -np.log((rgb.astype(np.float32) + 1.0) / (LIGHT + 1.0))


def from_optical_density(density: np.ndarray) -> np.ndarray:
    """Inverse of :func:`optical_density`, clipped to uint8."""
    return np.clip((LIGHT + 1.0) * np.exp(-density) - 1.0, 0, 255).astype(np.uint8)


def cell_diameter(mask: np.ndarray) -> float:
    """Diameter in pixels of the circle with the mask's area (0 for an empty mask)."""
    return float(2.0 * np.sqrt(np.count_nonzero(mask) / np.pi))


def crop_to_cell_scale(image: np.ndarray, mask: np.ndarray, fraction: float) -> np.ndarray:
    """Square crop centred on the mask's centroid in which the cell's diameter (that of the
    circle with the mask's area) is ``fraction`` of the side.

    The image is reflected beyond its borders where the square reaches past them; an empty mask
    leaves the image as it is."""
    diameter = cell_diameter(mask)
    if diameter == 0:
        return image
    ys, xs = np.nonzero(mask)
    half = max(int(round(diameter / fraction / 2)), 1)
    padded = cv2.copyMakeBorder(image, half, half, half, half, cv2.BORDER_REFLECT_101)
    top, left = int(round(ys.mean())), int(round(xs.mean()))
    return padded[top:top + 2 * half, left:left + 2 * half]


def _slide(rgb: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The pixels that describe the slide: neither black fill left by a rotation nor (given its
    mask) the white cell, whose size and class would otherwise move the statistics."""
    field = rgb.max(axis=2) >= _BLACK_FILL
    if mask is not None and (field & (mask == 0)).any():
        field &= mask == 0
    return rgb[field] if field.any() else rgb.reshape(-1, 3)


def slide_statistics(rgb: np.ndarray, mask: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The lamp (99th percentile of each channel over the slide) and the slide's mean optical
    density per channel relative to that lamp."""
    pixels = _slide(rgb, mask).astype(np.float32)
    lamp = np.maximum(np.percentile(pixels, 99, axis=0), 1.0)
    density = -np.log((pixels + 1.0) / (lamp + 1.0))
    return lamp, np.maximum(density, 0).mean(0)


def normalise_stain(rgb: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Scale each channel's optical density (relative to the image's own lamp) so that the slide
    (plasma and red cells, see :func:`slide_statistics`) has the reference mean density, then
    light it with the reference lamp (``STAIN_REFERENCE``, measured on pbc-1560). Stains differ
    between laboratories mostly by a strength per channel, which this undoes; black fill is
    painted with the reference plasma."""
    lamp, density = slide_statistics(rgb, mask)
    reference_lamp, reference_density = (np.asarray(v, np.float32) for v in STAIN_REFERENCE)
    gain = np.clip(reference_density / np.maximum(density, 1e-3), 0.25, 4.0)
    optical = np.maximum(-np.log((rgb.astype(np.float32) + 1.0) / (lamp + 1.0)), 0) * gain
    out = (reference_lamp + 1.0) * np.exp(-optical) - 1.0
    out[rgb.max(axis=2) < _BLACK_FILL] = reference_lamp
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """Ruifrok-Johnston colour deconvolution: (..., 3) uint8 RGB to H, E, D optical densities."""
    return optical_density(rgb) @ HED_FROM_RGB.astype(np.float32)


class HedJitter(v2.Transform):
    """Stain augmentation (Tellez et al., 2018): each of the H, E, D densities of a uint8 (3, H, W)
    image is scaled by U(1 - sigma, 1 + sigma) and shifted by U(-sigma, sigma) times its mean.
    A cell mask passed beside the image is left as it is (a colour change moves no pixel)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma
        self.register_buffer("to_hed", torch.from_numpy(HED_FROM_RGB.astype(np.float32)))
        self.register_buffer("to_rgb", torch.from_numpy(RGB_FROM_HED.astype(np.float32)))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return inpt
        return tv_tensors.wrap(self._jitter(inpt), like=inpt) \
            if isinstance(inpt, tv_tensors.Image) else self._jitter(inpt)

    def _jitter(self, image: torch.Tensor) -> torch.Tensor:
        density = -torch.log((image.float() + 1.0) / (LIGHT + 1.0))  # (3, H, W)
        hed = torch.einsum("chw,cd->dhw", density, self.to_hed)
        scale = 1.0 + (torch.rand(3, 1, 1) * 2 - 1) * self.sigma
        shift = (torch.rand(3, 1, 1) * 2 - 1) * self.sigma * hed.mean((1, 2), keepdim=True).abs()
        jittered = torch.einsum("dhw,dc->chw", hed * scale + shift, self.to_rgb)
        rgb = (LIGHT + 1.0) * torch.exp(-jittered) - 1.0
        return rgb.clamp(0, 255).round().to(torch.uint8)
