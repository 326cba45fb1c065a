"""Across laboratories: cell-scale and stain normalisation, and stain augmentation.

Two microscopes differ in how many pixels a cell spans and in the colour of the stain. Both are
measured from the image itself, so training and inference apply the same correction (the settings
live in :class:`pipeline.data.Preprocess`, saved in every checkpoint):

- scale: either the white cell's mask (GrabCut, :mod:`pipeline.masks`) gives its diameter and the
  image is cropped around the cell to a square in which that diameter is ``cell_fraction`` of the
  side; or the red cells around it, about 7.5 µm across in every laboratory, give the microscope's
  scale and the square is ``red_cell_crop`` red-cell diameters wide (the white cell keeps its true
  size, a class feature, and a mask that holds only the nucleus does not zoom the crop).
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

from pipeline.masks import disk, fill_holes

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB), as in scikit-image.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

# Reference slide: the lamp (RGB) and the mean optical density per channel of plasma and red
# cells, the medians over pbc-1560 (bench/transfer.py prints them).
STAIN_REFERENCE = ((255.0, 232.0, 205.0), (0.094, 0.145, 0.095))
# The white cell's stain after the slide's is normalised: the 90th percentile of each channel's
# optical density relative to the lamp inside the mask (mostly nucleus, in every class), the
# medians over pbc-1560 (bench/transfer.py prints them).
CELL_STAIN_REFERENCE = (1.30, 2.25, 0.46)
CELL_PERCENTILE = 90
_CELL_GAIN_LIMIT = 6.0  # BCCD's cells absorb a sixth of PBC's blue
# The settings that transferred best across laboratories (BENCHMARKS.md, "Across laboratories"):
# ``params.yaml: train`` keys, set as written by recipes/transfer.yaml; nothing sets them in code.
TRANSFER_SETTINGS: dict[str, Any] = {"cell_fraction": 0.6, "stain_normalise": True,
                                     "stain_jitter": 0.3, "blur_sigma": 2.0}
LIGHT = 255.0  # the lamp: the brightness of an empty field
_BLACK_FILL = 20  # pixels darker than this in every channel are fill left by rotation, not stain
# Red cells, the scale of ``red_cell_crop``: measured on the image shrunk to this short side,
# or finer where their radius there is under 8 pixels; trusted where they cover this share of
# the slide; else the white cell's mask stands in, at its median size in red-cell diameters on
# pbc-1560.
_RED_CELL_WORKING_SIDE = 180
_RED_CELL_FINE_RADIUS = 8
_RED_CELL_COVER = (0.05, 0.9)
WHITE_CELL_IN_RED_CELLS = 2.0


def optical_density(rgb: np.ndarray, lamp: np.ndarray | float = LIGHT) -> np.ndarray:
    """Absorbance per channel, ``-log(I / I0)``, of an RGB uint8 image (float32, same shape),
    relative to a white light or to a ``lamp`` colour (per channel)."""
    return -np.log((rgb.astype(np.float32) + 1.0) / (np.asarray(lamp, np.float32) + 1.0))


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
    return _square_around_cell(image, mask, diameter / fraction, cv2.BORDER_REFLECT_101)


def _square_around_cell(image: np.ndarray, mask: np.ndarray, side: float, border: int,
                        fill: float | list[float] = 0) -> np.ndarray:
    """The square of ``side`` pixels (rounded to an even number, at least 2) centred on the
    mask's centroid; beyond the image it is padded by OpenCV's ``border`` mode (with ``fill``
    for a constant border)."""
    half = max(int(round(side / 2)), 1)
    padded = cv2.copyMakeBorder(image, half, half, half, half, border, value=fill)
    ys, xs = np.nonzero(mask)
    top, left = int(round(ys.mean())), int(round(xs.mean()))
    return padded[top:top + 2 * half, left:left + 2 * half]


def _red_cell_map(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """Red cells (Otsu on the green optical density of the slide outside the dilated white cell,
    their pale centres filled), or None where they cover too little or too much of the slide."""
    reach = max(3, int(0.03 * min(mask.shape)))
    slide = (rgb.max(axis=2) >= _BLACK_FILL) & (cv2.dilate(mask, disk(reach)) == 0)
    if np.count_nonzero(slide) < 0.1 * slide.size:
        return None
    green = np.clip(optical_density(rgb)[..., 1] * 255, 0, 255).astype(np.uint8)
    threshold, _ = cv2.threshold(green[slide].reshape(-1, 1), 0, 255,
                                 cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    red = cv2.morphologyEx(((green > threshold) & slide).astype(np.uint8), cv2.MORPH_CLOSE,
                           disk(1))
    red = fill_holes(red.astype(bool)) & slide
    cover = np.count_nonzero(red) / np.count_nonzero(slide)
    return red.astype(np.uint8) if _RED_CELL_COVER[0] <= cover <= _RED_CELL_COVER[1] else None


def _half_area_radius(red: np.ndarray) -> float | None:
    """Radius of the disc whose morphological opening keeps half of a binary map, to a fraction
    of a pixel (None when a one-pixel disc already removes more than half)."""
    def kept(radius: int) -> int:
        return np.count_nonzero(cv2.morphologyEx(red, cv2.MORPH_OPEN, disk(radius)))

    half_area, low, high = np.count_nonzero(red) / 2, 0, min(red.shape) // 4
    while low < high:  # the opening's area shrinks as the disc grows
        radius = (low + high + 1) // 2
        low, high = (radius, high) if kept(radius) >= half_area else (low, radius - 1)
    if not low:
        return None
    above, below = kept(low), kept(low + 1)
    return low + (above - half_area) / max(above - below, 1)


def red_cell_diameter(rgb: np.ndarray, mask: np.ndarray) -> float | None:
    """The typical red cell's diameter in pixels, by granulometry: twice the radius of the disc
    whose morphological opening keeps half of the red-cell map (touching cells keep their width).
    Measured on the image shrunk to ``_RED_CELL_WORKING_SIDE``, again at a finer scale where the
    cells come out smaller than ``_RED_CELL_FINE_RADIUS`` there. None without red cells."""
    factor = min(1.0, _RED_CELL_WORKING_SIDE / min(mask.shape))
    while True:
        size = (max(1, round(mask.shape[1] * factor)), max(1, round(mask.shape[0] * factor)))
        red = _red_cell_map(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA),
                            cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST))
        radius = None if red is None else _half_area_radius(red)
        finer = min(1.0, factor * _RED_CELL_FINE_RADIUS / max(radius or 1.0, 1.0))
        if radius is not None and radius >= _RED_CELL_FINE_RADIUS or finer <= factor:
            return None if radius is None else (2 * radius + 1) / factor
        factor = finer


def crop_to_red_cell_scale(image: np.ndarray, mask: np.ndarray, red_cells: float,
                           reference: np.ndarray | None = None) -> np.ndarray:
    """Square crop, ``red_cells`` red-cell diameters wide (:func:`red_cell_diameter` of
    ``reference``, the RGB image, by default ``image`` itself; without red cells, the mask's
    diameter over ``WHITE_CELL_IN_RED_CELLS``), centred on the mask's centroid. Beyond the
    image's borders the square is filled with the slide's median colour (0 for a mask cropped
    alongside its image), not a mirror image that would add a second cell. An empty mask leaves
    the image as it is."""
    if not mask.any():
        return image
    reference = image if reference is None else reference
    diameter = (red_cell_diameter(reference, mask)
                or cell_diameter(mask) / WHITE_CELL_IN_RED_CELLS)
    fill = np.median(_slide(image, mask), axis=0).tolist() if image.ndim == 3 else 0
    return _square_around_cell(image, mask, red_cells * diameter, cv2.BORDER_CONSTANT, fill)


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
    pixels = _slide(rgb, mask)
    lamp = np.maximum(np.percentile(pixels, 99, axis=0), 1.0).astype(np.float32)
    return lamp, np.maximum(optical_density(pixels, lamp), 0).mean(0)


def lamp_density(rgb: np.ndarray, mask: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The image's own lamp (:func:`slide_statistics`) and every pixel's optical density
    relative to it (float32, negative values clipped to 0)."""
    lamp = slide_statistics(rgb, mask)[0]
    return lamp, np.maximum(optical_density(rgb, lamp), 0)


def normalise_stain(rgb: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Scale each channel's optical density (relative to the image's own lamp) so that the slide
    (plasma and red cells, see :func:`slide_statistics`) has the reference mean density, then
    light it with the reference lamp (``STAIN_REFERENCE``, measured on pbc-1560). Stains differ
    between laboratories mostly by a strength per channel, which this undoes; black fill is
    painted with the reference plasma."""
    lamp, density = slide_statistics(rgb, mask)
    reference_lamp, reference_density = (np.asarray(v, np.float32) for v in STAIN_REFERENCE)
    gain = np.clip(reference_density / np.maximum(density, 1e-3), 0.25, 4.0)
    optical = np.maximum(optical_density(rgb, lamp), 0) * gain
    out = (reference_lamp + 1.0) * np.exp(-optical) - 1.0
    out[rgb.max(axis=2) < _BLACK_FILL] = reference_lamp
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def normalise_cell_stain(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Scale each channel's optical density (relative to the image's lamp) around the white
    cell (its mask, widened by a fifth of its diameter and feathered) so that the cell's 90th
    percentile matches ``CELL_STAIN_REFERENCE``: a laboratory's white cells can take up the
    stain more weakly relative to the slide than PBC's, which the slide's gain
    (:func:`normalise_stain`) cannot see. An empty mask leaves the image as it is."""
    if not mask.any():
        return rgb
    lamp, density = lamp_density(rgb, mask)
    cell = np.percentile(density[mask > 0], CELL_PERCENTILE, axis=0)
    gain = np.clip(np.asarray(CELL_STAIN_REFERENCE, np.float32) / np.maximum(cell, 1e-3),
                   1 / _CELL_GAIN_LIMIT, _CELL_GAIN_LIMIT)
    reach = max(1, int(0.2 * cell_diameter(mask)))
    around = cv2.dilate(mask, disk(reach)).astype(np.float32) / 255
    weight = cv2.GaussianBlur(around, (0, 0), sigmaX=reach / 2)[..., None]
    out = (lamp + 1.0) * np.exp(-density * (1 + (gain - 1) * weight)) - 1.0
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
