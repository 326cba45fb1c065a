"""Synthetic blood-smear images of single white blood cells for the eight PBC classes.

Each image imitates a CellaVision DM96 crop from the PBC data set: one white cell (or, for the
``platelet`` class, a clump of platelets) roughly centred on a pale plasma background among red
cells and the odd stray platelet. Stained matter is modelled as optical density (absorbance per
RGB channel), so overlapping objects darken the way they do under a microscope; the exposure then
adds stain and illumination variation, defocus blur and sensor noise.

Everything is drawn from ``np.random.default_rng([seed, class_index, index])``, so an image
depends only on those three numbers, never on the worker count or the generation order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.errors import InputError, process_pool
from pipeline.io import atomic_path, opencv_threads
from pipeline.sources.labels import PBC_CLASSES

DEFAULT_SIZE: tuple[int, int] = (363, 360)  # (height, width) like PBC
_JPEG_QUALITY = 95

# Every length below is in pixels of a 360-pixel-wide PBC image at its usual magnification.
_REFERENCE_SIDE = 360.0
_CELL_REACH = 135.0  # no central object extends further than this from its centre
_SUBPIXEL_BITS = 4  # fractional bits of the coordinates given to OpenCV's drawing functions
_SUBPIXEL = 1 << _SUBPIXEL_BITS
_RED_CELL_OVERLAP = 1.6  # most red-cell density that overlapping cells reach

_LAMP_RGB = np.array([255.0, 248.0, 244.0], np.float32)

# Apparent colours on the slide at unit density of each dye.
_PLASMA_CREAM_RGB = (253, 229, 201)
_PLASMA_GREY_RGB = (234, 226, 234)
_RED_CELL_RIM_RGB = (214, 172, 170)
_NUCLEUS_RGB = (72, 28, 134)
_NEUTROPHIL_CYTOPLASM_RGB = (222, 192, 202)
_NEUTROPHIL_GRANULE_RGB = (150, 96, 160)
_EOSINOPHIL_CYTOPLASM_RGB = (234, 176, 158)
_EOSINOPHIL_GRANULE_RGB = (224, 132, 116)
_BASOPHIL_GRANULE_RGB = (62, 22, 112)
_LYMPHOCYTE_CYTOPLASM_RGB = (186, 194, 232)
_MONOCYTE_CYTOPLASM_RGB = (204, 188, 214)
_IG_CYTOPLASM_RGB = (194, 178, 220)
_AZUROPHILIC_GRANULE_RGB = (118, 44, 140)
_ERYTHROBLAST_BLUE_RGB = (178, 178, 222)
_ERYTHROBLAST_PINK_RGB = (226, 172, 164)
_PLATELET_GRANULE_RGB = (112, 52, 150)
_PLATELET_BODY_RGB = (206, 190, 222)


def _optical_density(rgb: Sequence[float]) -> np.ndarray:
    """Absorbance per channel that turns the lamp's light into ``rgb``."""
    return -np.log(np.asarray(rgb, np.float32) / _LAMP_RGB)


@dataclass(frozen=True)
class Lab:
    """A laboratory's microscope and staining: ``magnification`` scales every length (cells
    span fewer pixels below 1), ``tint`` multiplies every dye's optical density per RGB channel
    and ``stain_strength`` all of them. The default lab is the one the data set imitates."""

    magnification: float = 1.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    stain_strength: float = 1.0


class _Stain:
    """One slide's staining: a tint and a strength applied to every dye colour."""

    def __init__(self, rng: np.random.Generator, lab: Lab = Lab()) -> None:
        self.tint = np.exp(rng.normal(0.0, 0.045, 3)).astype(np.float32)
        self.tint *= np.asarray(lab.tint, np.float32)
        self.strength = rng.uniform(0.88, 1.12) * lab.stain_strength
        self.eosin = rng.uniform(0.85, 1.15)  # extra factor for red cells and eosinophil granules
        greyness = rng.beta(0.5, 4.0)  # most slides have cream plasma, a few a cool grey one
        self.plasma = _optical_density(_mix(_PLASMA_CREAM_RGB, _PLASMA_GREY_RGB, greyness))
        self.plasma *= self.tint
        self.red_cell = self(_RED_CELL_RIM_RGB, eosin=True) - self.plasma

    def __call__(self, rgb: Sequence[float], eosin: bool = False) -> np.ndarray:
        """Optical density of a dye whose unit-density colour is ``rgb``, on this slide."""
        strength = self.strength * (self.eosin if eosin else 1.0)
        return _optical_density(rgb) * self.tint * strength


@dataclass(frozen=True)
class _Canvas:
    """Geometry, random generator and stain shared by every painter of one image."""

    rng: np.random.Generator
    height: int
    width: int
    scale: float  # image pixels per reference pixel
    stain: _Stain

    @classmethod
    def random(cls, rng: np.random.Generator, size: tuple[int, int], lab: Lab = Lab()) -> _Canvas:
        magnification = rng.uniform(0.92, 1.08) * lab.magnification
        return cls(rng, size[0], size[1], magnification * min(size) / _REFERENCE_SIDE,
                   _Stain(rng, lab))

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def empty(self) -> bool:
        return self.height == 0 or self.width == 0

    def px(self, length: float) -> float:
        """A length in reference pixels, in pixels of this image."""
        return length * self.scale

    def zeros(self, channels: int = 0) -> np.ndarray:
        return np.zeros((*self.shape, channels) if channels else self.shape, np.float32)

    def window(self, center: np.ndarray,
               half_extent: float) -> tuple[_Canvas, np.ndarray, tuple[slice, slice]]:
        """The part of this canvas within ``half_extent`` of ``center``: a canvas of its own,
        ``center`` in its coordinates, and the (rows, columns) it covers here."""
        x0 = min(max(int(center[0] - half_extent), 0), self.width)
        y0 = min(max(int(center[1] - half_extent), 0), self.height)
        x1 = min(max(int(center[0] + half_extent) + 1, x0), self.width)
        y1 = min(max(int(center[1] + half_extent) + 1, y0), self.height)
        local = replace(self, height=y1 - y0, width=x1 - x0)
        return local, center - (x0, y0), (slice(y0, y1), slice(x0, x1))

    def polygon(self, points: np.ndarray) -> np.ndarray:
        """Anti-aliased coverage (0..1) of a filled polygon given as float (x, y) points."""
        coverage = np.zeros(self.shape, np.uint8)
        fixed = np.round(points * _SUBPIXEL).astype(np.int32)
        cv2.fillPoly(coverage, [fixed], 255, cv2.LINE_AA, _SUBPIXEL_BITS)
        return coverage.astype(np.float32) / 255.0

    def blob(self, center: np.ndarray, radius: float, aspect: float = 1.0, wobble: float = 0.0,
             angle: float | None = None) -> np.ndarray:
        """Coverage of an ellipse (semi-axes ``radius * aspect`` and ``radius / aspect``) turned by
        ``angle`` (default: random), whose outline wobbles by about ``wobble``."""
        theta = np.linspace(0.0, 2 * np.pi, 96, endpoint=False)
        harmonics = np.arange(2, 7)[:, None]
        amplitudes = self.rng.normal(0.0, wobble, (5, 1)) / harmonics
        phases = self.rng.uniform(0.0, 2 * np.pi, (5, 1))
        radial = radius * (1.0 + (amplitudes * np.cos(harmonics * theta + phases)).sum(axis=0))
        x, y = radial * np.cos(theta) * aspect, radial * np.sin(theta) / aspect
        if angle is None:
            angle = self.rng.uniform(0.0, 2 * np.pi)
        cos, sin = np.cos(angle), np.sin(angle)
        points = np.stack([center[0] + cos * x - sin * y, center[1] + sin * x + cos * y], axis=1)
        return self.polygon(points)

    def tube(self, points: np.ndarray, radii: np.ndarray, strand_px: float) -> np.ndarray:
        """Coverage of discs of ``radii`` along a path, joined by a strand ``strand_px`` thick
        (none when 0)."""
        coverage = np.zeros(self.shape, np.uint8)
        fixed = np.round(points * _SUBPIXEL).astype(np.int32)
        if strand_px > 0:
            cv2.polylines(coverage, [fixed], False, 255, max(1, round(strand_px)), cv2.LINE_AA,
                          _SUBPIXEL_BITS)
        fixed_radii = np.round(radii * _SUBPIXEL).astype(int)
        for (x, y), radius in zip(fixed, fixed_radii, strict=True):
            if radius > strand_px * _SUBPIXEL / 2:
                cv2.circle(coverage, (int(x), int(y)), int(radius), 255, -1, cv2.LINE_AA,
                           _SUBPIXEL_BITS)
        return coverage.astype(np.float32) / 255.0

    def noise(self, feature_px: float) -> np.ndarray:
        """Smooth random field of unit-order amplitude with blobs about ``feature_px`` wide."""
        step = max(feature_px, 1.0)
        coarse = self.rng.standard_normal(
            (int(self.height / step) + 2, int(self.width / step) + 2), np.float32)
        return cv2.resize(coarse, (self.width, self.height), interpolation=cv2.INTER_CUBIC)

    def granules(self, region: np.ndarray, fill: float, radius_px: float) -> np.ndarray:
        """Density of round granules about ``radius_px`` in radius over ``region``, covering a
        ``fill`` fraction of it if none overlapped. Each cell of a grid gets one granule at a
        random spot, so that they spread evenly instead of clumping."""
        if fill <= 0:
            return self.zeros()
        spacing = radius_px * np.sqrt(np.pi / fill)
        rows = np.arange(0.0, self.height, spacing)[:, None]
        columns = np.arange(0.0, self.width, spacing)[None, :]
        grid = (len(rows), columns.shape[1])
        ys = np.minimum(rows + self.rng.uniform(0, spacing, grid), self.height - 1).astype(int)
        xs = np.minimum(columns + self.rng.uniform(0, spacing, grid), self.width - 1).astype(int)
        inside = region[ys, xs] > 0.5
        density = self.zeros()
        np.add.at(density, (ys[inside], xs[inside]), self.rng.uniform(0.6, 1.0, inside.sum()))
        sigma = max(radius_px / 1.4, 0.5)
        density = cv2.GaussianBlur(density, (0, 0), sigma) * (2 * np.pi * sigma * sigma)
        return np.clip(1.5 * density - 0.2, 0.0, 1.5)  # crisp edges, clear gaps between them

def _mix(first: Sequence[float], second: Sequence[float], weight: float) -> np.ndarray:
    return (1 - weight) * np.asarray(first, np.float32) + weight * np.asarray(second, np.float32)


def _unit(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle)])


@dataclass
class _Painted:
    """An object drawn on a canvas: where it hides what lies behind it, and its own density."""

    coverage: np.ndarray  # H x W, 0..1
    density: np.ndarray  # H x W x 3 optical density
    radius: float = 0.0  # red cells keep this far from its centre


# --- the central object of each class ------------------------------------------------------


def _chromatin(canvas: _Canvas, nucleus: np.ndarray, level: float, contrast: float,
               clump_px: float) -> np.ndarray:
    """Nucleus density: ``level`` modulated by chromatin clumps about ``clump_px`` wide."""
    texture = 0.7 * canvas.noise(canvas.px(clump_px)) + 0.3 * canvas.noise(canvas.px(3 * clump_px))
    return nucleus * np.clip(level * (1.0 + contrast * texture), 0.3 * level, 1.6)


def _arc_nucleus(canvas: _Canvas, center: np.ndarray, *, curve_radius: float, span: float,
                 lobe_radius: float, flatness: float, lobes: int = 1, gap: float = 0.0,
                 strand_px: float = 0.0) -> np.ndarray:
    """Nucleus laid along an arc of ``span`` radians: ``lobes`` swellings joined by strands.

    Each swelling has a superellipse profile (``flatness`` 2: lens, larger: sausage); ``gap`` is
    the fraction of the arc between neighbouring lobes (negative: they merge). One flat lobe over
    the whole arc gives a band or a kidney; merged lobes give a lumpy, folded nucleus.
    """
    rng = canvas.rng
    t = np.linspace(0.0, 1.0, 48)
    angles = rng.uniform(0.0, 2 * np.pi) + span * t
    bend = 1.0 + rng.uniform(-0.25, 0.25) * np.sin(2 * np.pi * t + rng.uniform(0, 2 * np.pi))
    points = center + (curve_radius * bend)[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
    centres = (np.arange(lobes) + 0.5 + rng.uniform(-0.12, 0.12, lobes)) / lobes
    half_lengths = (0.5 - gap) / lobes * rng.uniform(0.85, 1.15, lobes)
    sizes = lobe_radius * rng.uniform(0.8, 1.2, lobes)
    offsets = np.abs(t[:, None] - centres) / half_lengths
    profile = np.clip(1.0 - offsets**flatness, 0.0, None) ** (1.0 / flatness)
    irregularity = 1.0 + np.interp(t, np.linspace(0, 1, 7), rng.normal(0, 0.08, 7))
    return canvas.tube(points, (profile * sizes).max(axis=1) * irregularity, strand_px)


def _segmented_nucleus(canvas: _Canvas, center: np.ndarray, *, cell_radius: float, lobes: int,
                       lobe_length: float, lobe_width: float, gap: float,
                       strand_px: float) -> np.ndarray:
    """Separate oval lobes along a curling chain, each joined to the next by a thin strand.

    ``gap`` is the strand's length between neighbouring lobes; a chain too long for the cell is
    pulled together, so that its lobes may touch or overlap as they often do in a smear.
    """
    rng = canvas.rng
    lengths = lobe_length * rng.uniform(0.8, 1.2, lobes)
    heading = rng.uniform(0, 2 * np.pi)
    curl = rng.choice([-1.0, 1.0])
    positions, headings = [np.zeros(2)], [heading]
    for previous, length in zip(lengths[:-1], lengths[1:], strict=True):
        heading += curl * rng.uniform(0.4, 1.3) * (1.0 if rng.random() < 0.8 else -1.0)
        step = previous + length + gap * rng.uniform(0.6, 1.4)
        positions.append(positions[-1] + step * _unit(heading))
        headings.append(heading)
    offsets = np.array(positions) - np.mean(positions, axis=0)
    reach = np.hypot(*offsets.T).max() + lobe_length
    room = 0.75 * cell_radius
    if reach > room:
        offsets *= max(room - lobe_length, 0.0) / (reach - lobe_length)
    points = center + offsets
    nucleus = canvas.tube(points, np.zeros(lobes), strand_px)
    for point, length, direction in zip(points, lengths, headings, strict=True):
        width = lobe_width * rng.uniform(0.85, 1.15)
        lobe = canvas.blob(point, np.sqrt(length * width), np.sqrt(length / width), 0.08,
                           direction + rng.normal(0, 0.3))
        np.maximum(nucleus, lobe, out=nucleus)
    return nucleus


def _cell_body(canvas: _Canvas, center: np.ndarray, radius: float, wobble: float) -> np.ndarray:
    return canvas.blob(center, radius, canvas.rng.uniform(1.0, 1.12), wobble)


def _cell(canvas: _Canvas, radius: float, body: np.ndarray, cytoplasm_rgb: Sequence[float],
          cytoplasm_level: float, chromatin: np.ndarray,
          granules: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> _Painted:
    """A white cell: cytoplasm, the nucleus's chromatin over it, then (density, dye) granules."""
    stain = canvas.stain
    cytoplasm = body * cytoplasm_level * (1.0 + 0.12 * canvas.noise(canvas.px(10)))
    cytoplasm *= 1.0 - 0.7 * np.minimum(chromatin, 1.0)
    density = cytoplasm[..., None] * stain(cytoplasm_rgb)
    density += chromatin[..., None] * stain(_NUCLEUS_RGB)
    for amount, dye in granules:
        density += amount[..., None] * dye
    return _Painted(body, density, radius)


def _neutrophil(canvas: _Canvas, center: np.ndarray) -> _Painted:
    rng = canvas.rng
    radius = canvas.px(rng.uniform(64, 86))
    body = _cell_body(canvas, center, radius, 0.05)
    nucleus_center = center + rng.normal(0, 0.08 * radius, 2)
    if rng.random() < 0.2:  # band form: one long sausage
        nucleus = _arc_nucleus(canvas, nucleus_center, curve_radius=radius * rng.uniform(0.3, 0.45),
                               span=rng.uniform(2.6, 4.4),
                               lobe_radius=radius * rng.uniform(0.17, 0.23),
                               flatness=rng.uniform(3.0, 6.0))
    else:
        lobes = int(rng.choice([2, 3, 3, 4, 4, 5]))
        nucleus = _segmented_nucleus(canvas, nucleus_center, cell_radius=radius, lobes=lobes,
                                     lobe_length=radius * rng.uniform(0.32, 0.4),
                                     lobe_width=radius * rng.uniform(0.25, 0.31),
                                     gap=radius * rng.uniform(0.02, 0.14),
                                     strand_px=canvas.px(rng.uniform(1.5, 3)))
    chromatin = _chromatin(canvas, np.minimum(nucleus, body), rng.uniform(0.9, 1.15), 0.3, 5)
    fine = canvas.granules(body, rng.uniform(0.04, 0.1), canvas.px(1.0)) * rng.uniform(0.3, 0.6)
    return _cell(canvas, radius, body, _NEUTROPHIL_CYTOPLASM_RGB, rng.uniform(0.8, 1.3),
                 chromatin, [(fine, canvas.stain(_NEUTROPHIL_GRANULE_RGB))])


def _eosinophil(canvas: _Canvas, center: np.ndarray) -> _Painted:
    rng = canvas.rng
    radius = canvas.px(rng.uniform(58, 80))
    body = _cell_body(canvas, center, radius, 0.04)
    lobes = int(rng.choice([2, 2, 2, 2, 3]))
    nucleus = _segmented_nucleus(canvas, center + rng.normal(0, 0.1 * radius, 2),
                                 cell_radius=radius, lobes=lobes,
                                 lobe_length=radius * rng.uniform(0.36, 0.44),
                                 lobe_width=radius * rng.uniform(0.28, 0.34),
                                 gap=radius * rng.uniform(0.03, 0.18),
                                 strand_px=canvas.px(rng.uniform(1.5, 3)))
    nucleus = np.minimum(nucleus, body)
    chromatin = _chromatin(canvas, nucleus, rng.uniform(0.75, 1.0), 0.3, 5)
    granule_radius = canvas.px(rng.uniform(2.5, 3.5))
    coarse = canvas.granules(body, rng.uniform(0.9, 1.3), granule_radius) * rng.uniform(0.35, 0.6)
    coarse *= 1.0 - 0.6 * nucleus
    return _cell(canvas, radius, body, _EOSINOPHIL_CYTOPLASM_RGB, rng.uniform(0.7, 1.1),
                 chromatin, [(coarse, canvas.stain(_EOSINOPHIL_GRANULE_RGB, eosin=True))])


def _basophil(canvas: _Canvas, center: np.ndarray) -> _Painted:
    rng = canvas.rng
    radius = canvas.px(rng.uniform(50, 70))
    body = _cell_body(canvas, center, radius, 0.07)
    nucleus = _arc_nucleus(canvas, center + rng.normal(0, 0.08 * radius, 2),
                           curve_radius=radius * rng.uniform(0.15, 0.35),
                           span=rng.uniform(1.0, 3.0), lobe_radius=radius * rng.uniform(0.4, 0.55),
                           flatness=rng.uniform(2.0, 3.0), lobes=int(rng.choice([1, 2])),
                           gap=rng.uniform(0.0, 0.1), strand_px=canvas.px(3))
    nucleus = np.minimum(nucleus, body)
    chromatin = _chromatin(canvas, nucleus, rng.uniform(0.6, 0.85), 0.3, 6)
    obscuring = rng.uniform(0.6, 1.0)  # how thickly the granules hide the nucleus
    granule_radius = canvas.px(rng.uniform(2.5, 4.0))
    dark = canvas.granules(body, obscuring * rng.uniform(0.9, 1.5), granule_radius)
    dark *= rng.uniform(0.6, 0.95)
    dark *= 0.5 + 0.5 * cv2.GaussianBlur(nucleus, (0, 0), canvas.px(8))
    return _cell(canvas, radius, body, _NEUTROPHIL_CYTOPLASM_RGB, rng.uniform(1.0, 1.6),
                 chromatin, [(dark, canvas.stain(_BASOPHIL_GRANULE_RGB))])


def _lymphocyte(canvas: _Canvas, center: np.ndarray) -> _Painted:
    rng = canvas.rng
    large = rng.random() < 0.15  # reactive and large granular lymphocytes: more cytoplasm
    radius = canvas.px(rng.uniform(54, 72) if large else rng.uniform(40, 58))
    body = _cell_body(canvas, center, radius, 0.04)
    fill = rng.uniform(0.6, 0.8) if large else rng.uniform(0.78, 0.95)
    nucleus_center = center + rng.normal(0, (1 - fill) * 0.5 * radius, 2)
    nucleus = canvas.blob(nucleus_center, radius * fill, rng.uniform(1.0, 1.12), 0.05)
    if rng.random() < 0.3:  # shallow indentation
        notch_center = nucleus_center + radius * fill * 1.1 * _unit(rng.uniform(0, 2 * np.pi))
        nucleus *= 1.0 - canvas.blob(notch_center, radius * fill * rng.uniform(0.3, 0.5))
    chromatin = _chromatin(canvas, np.minimum(nucleus, body), rng.uniform(0.85, 1.1), 0.3, 4)
    granules = []
    if large and rng.random() < 0.5:
        azurophilic = canvas.granules(body * (1 - nucleus), 0.015, canvas.px(1.6))
        granules.append((azurophilic * 0.7, canvas.stain(_AZUROPHILIC_GRANULE_RGB)))
    return _cell(canvas, radius, body, _LYMPHOCYTE_CYTOPLASM_RGB, rng.uniform(0.7, 1.3),
                 chromatin, granules)


def _monocyte(canvas: _Canvas, center: np.ndarray) -> _Painted:
    rng = canvas.rng
    radius = canvas.px(rng.uniform(70, 98))
    body = _cell_body(canvas, center, radius, 0.1)
    nucleus = _arc_nucleus(canvas, center + rng.normal(0, 0.12 * radius, 2),
                           curve_radius=radius * rng.uniform(0.18, 0.35),
                           span=rng.uniform(1.2, 3.2), lobe_radius=radius * rng.uniform(0.45, 0.58),
                           flatness=rng.uniform(2.0, 3.5), lobes=int(rng.choice([1, 1, 2, 3])),
                           gap=rng.uniform(-0.15, 0.0))
    chromatin = _chromatin(canvas, np.minimum(nucleus, body), rng.uniform(0.7, 0.95), 0.45, 3)
    fold = center + rng.uniform(-0.5, 0.5, (3, 2)) * radius  # a fold shows as a paler line
    chromatin *= 1.0 - 0.5 * rng.random() * canvas.tube(fold, np.zeros(3), canvas.px(2))
    vacuoles = canvas.zeros()
    for _ in range(int(rng.choice([0, 0, 1, 2, 4]))):
        position = center + _unit(rng.uniform(0, 2 * np.pi)) * radius * rng.uniform(0.2, 0.85)
        vacuoles = np.maximum(vacuoles, canvas.blob(position, canvas.px(rng.uniform(2.5, 6))))
    ground_glass = canvas.granules(body, 0.03, canvas.px(1.0)) * 0.25
    return _cell(canvas, radius, body * (1 - 0.7 * vacuoles), _MONOCYTE_CYTOPLASM_RGB,
                 rng.uniform(0.8, 1.3), chromatin * (1 - 0.5 * vacuoles),
                 [(ground_glass, canvas.stain(_NEUTROPHIL_GRANULE_RGB))])


def _immature_granulocyte(canvas: _Canvas, center: np.ndarray) -> _Painted:
    rng = canvas.rng
    radius = canvas.px(rng.uniform(62, 92))
    body = _cell_body(canvas, center, radius, 0.05)
    nucleus_center = center + rng.normal(0, 0.15 * radius, 2)
    stage = rng.choice(["myelocyte", "metamyelocyte", "band"], p=[0.4, 0.4, 0.2])
    if stage == "myelocyte":  # round to oval, often eccentric
        nucleus = canvas.blob(nucleus_center, radius * rng.uniform(0.62, 0.82),
                              rng.uniform(1.0, 1.3), 0.06)
    elif stage == "metamyelocyte":  # kidney or bean
        nucleus = _arc_nucleus(canvas, nucleus_center, curve_radius=radius * rng.uniform(0.2, 0.35),
                               span=rng.uniform(1.2, 2.4),
                               lobe_radius=radius * rng.uniform(0.42, 0.55),
                               flatness=rng.uniform(2.5, 4.0))
    else:
        nucleus = _arc_nucleus(canvas, nucleus_center, curve_radius=radius * rng.uniform(0.3, 0.42),
                               span=rng.uniform(2.4, 3.8),
                               lobe_radius=radius * rng.uniform(0.22, 0.32),
                               flatness=rng.uniform(3.0, 6.0))
    chromatin = _chromatin(canvas, np.minimum(nucleus, body), rng.uniform(0.7, 0.95), 0.35, 4)
    cytoplasm_rgb = _mix(_IG_CYTOPLASM_RGB, _NEUTROPHIL_CYTOPLASM_RGB, rng.uniform(0.0, 0.7))
    fine = canvas.granules(body, rng.uniform(0.015, 0.05), canvas.px(1.1)) * rng.uniform(0.3, 0.6)
    azurophilic = canvas.granules(body, rng.uniform(0.0, 0.02), canvas.px(1.8)) * 0.6
    return _cell(canvas, radius, body, cytoplasm_rgb, rng.uniform(0.9, 1.5), chromatin,
                 [(fine, canvas.stain(_NEUTROPHIL_GRANULE_RGB)),
                  (azurophilic, canvas.stain(_AZUROPHILIC_GRANULE_RGB))])


def _erythroblast(canvas: _Canvas, center: np.ndarray) -> _Painted:
    rng = canvas.rng
    radius = canvas.px(rng.uniform(40, 60))
    body = _cell_body(canvas, center, radius, 0.03)
    fill = rng.uniform(0.55, 0.9)
    nucleus_center = center + rng.normal(0, (1 - fill) * 0.4 * radius, 2)
    nucleus = canvas.blob(nucleus_center, radius * fill, rng.uniform(1.0, 1.05), 0.01)
    chromatin = _chromatin(canvas, np.minimum(nucleus, body), rng.uniform(0.95, 1.2), 0.35, 5)
    cytoplasm_rgb = _mix(_ERYTHROBLAST_BLUE_RGB, _ERYTHROBLAST_PINK_RGB, rng.uniform(0, 1))
    return _cell(canvas, radius, body, cytoplasm_rgb, rng.uniform(0.8, 1.3), chromatin)


def _platelet(canvas: _Canvas, center: np.ndarray, radius: float) -> _Painted:
    """One platelet: a pale bluish body with a purple granular centre."""
    rng = canvas.rng
    body = canvas.blob(center, radius, rng.uniform(1.0, 1.25), 0.15)
    core = canvas.blob(center + rng.normal(0, 0.1 * radius, 2), radius * rng.uniform(0.7, 0.95),
                       rng.uniform(1.0, 1.2), 0.2)
    core = np.minimum(core, body)
    granules = canvas.granules(core, 0.7, canvas.px(1.3)) * rng.uniform(0.7, 1.0)
    granules = np.maximum(granules, 0.45 * core)
    density = body[..., None] * canvas.stain(_PLATELET_BODY_RGB)
    density += granules[..., None] * canvas.stain(_PLATELET_GRANULE_RGB)
    return _Painted(body, density, radius)


def _paste(target: _Painted, box: tuple[slice, slice], painted: _Painted) -> None:
    """Lay ``painted`` (drawn on a window of ``target``'s canvas at ``box``) over ``target``."""
    np.maximum(target.coverage[box], painted.coverage, out=target.coverage[box])
    target.density[box] += painted.density


def _platelet_clump(canvas: _Canvas, center: np.ndarray) -> _Painted:
    rng = canvas.rng
    count = int(rng.choice([1, 1, 1, 2, 3, 4, 6]))
    clump = _Painted(canvas.zeros(), canvas.zeros(3))
    spread = canvas.px(12) * np.sqrt(count - 1)
    for _ in range(count):
        size = canvas.px(rng.uniform(22, 38) if count == 1 else rng.uniform(12, 24))
        window, local_center, box = canvas.window(center + rng.normal(0, spread, 2), 2 * size)
        _paste(clump, box, _platelet(window, local_center, size))
    ys, xs = np.nonzero(clump.coverage > 0.5)
    clump.radius = np.hypot(xs - center[0], ys - center[1]).max(initial=0.0) + canvas.px(4)
    return clump


_PAINTERS: dict[str, Callable[[_Canvas, np.ndarray], _Painted]] = {
    "basophil": _basophil,
    "eosinophil": _eosinophil,
    "erythroblast": _erythroblast,
    "ig": _immature_granulocyte,
    "lymphocyte": _lymphocyte,
    "monocyte": _monocyte,
    "neutrophil": _neutrophil,
    "platelet": _platelet_clump,
}


# --- the surroundings and the photograph ---------------------------------------------------


def _red_cell_template(canvas: _Canvas, radius: float) -> np.ndarray:
    """Density of one red cell centred in a square patch: a slightly irregular disc, darker
    towards its rim, with a pale centre."""
    rng = canvas.rng
    half = int(np.ceil(1.2 * radius))
    offsets = np.arange(-half, half + 1, dtype=np.float32)
    dx, dy = offsets[None, :], offsets[:, None]
    distance = np.sqrt(dx * dx + dy * dy) + np.float32(1e-3)
    angle = np.arctan2(dy, dx)
    outline = radius * (1.0 + rng.normal(0, 0.02) * np.cos(3 * angle + rng.uniform(0, 2 * np.pi)))
    inside = np.clip(outline - distance + 0.5, 0.0, 1.0)
    relative = distance / outline
    pallor = rng.uniform(0.45, 0.75) * np.exp(-((relative / rng.uniform(0.45, 0.6)) ** 2))
    rim = 0.2 * np.exp(-(((relative - 0.88) / 0.08) ** 2))
    return (inside * (1.0 - pallor + rim)).astype(np.float32)


def _red_cells(canvas: _Canvas, center: np.ndarray, keep_out: float) -> np.ndarray:
    """Density, in units of a red cell's rim, of the red cells around the central object."""
    rng = canvas.rng
    mean_radius = canvas.px(rng.uniform(32, 38))
    crowding = rng.uniform(0.85, 1.05)  # closest allowed centres, as a fraction of radii's sum
    candidates = np.column_stack([
        rng.uniform(-mean_radius, canvas.width + mean_radius, 120),
        rng.uniform(-mean_radius, canvas.height + mean_radius, 120),
    ])
    radii = mean_radius * rng.uniform(0.9, 1.1, 120)
    distances = np.hypot(*(candidates[:, None, :] - candidates[None, :, :]).transpose(2, 0, 1))
    conflicts = distances < crowding * (radii[:, None] + radii[None, :])
    clear_of_cell = np.hypot(*(candidates - center).T) >= keep_out + 0.5 * radii
    blocked = ~clear_of_cell
    placed: list[int] = []
    for index in range(len(candidates)):
        if not blocked[index]:
            placed.append(index)
            blocked |= conflicts[index]
    templates = [_red_cell_template(canvas, mean_radius) for _ in range(4)]
    density = canvas.zeros()
    for index in placed:
        template = templates[rng.integers(len(templates))]
        _add_red_cell(canvas, density, template, candidates[index], radii[index] / mean_radius)
    # Where red cells overlap they are thinner than two whole discs: soften the sum.
    return _RED_CELL_OVERLAP * np.tanh(density / _RED_CELL_OVERLAP)


def _add_red_cell(canvas: _Canvas, density: np.ndarray, template: np.ndarray,
                  position: np.ndarray, scale: float) -> None:
    """Add ``template`` to ``density`` at ``position``: rescaled, made oval and rotated."""
    rng = canvas.rng
    ovality, angle = rng.uniform(0.0, 0.08), rng.uniform(0, np.pi)
    half_extent = 0.5 * len(template) * scale * (1 + ovality) + 1
    window, local_position, box = canvas.window(position, half_extent)
    if window.empty:
        return
    cos, sin = np.cos(angle), np.sin(angle)
    linear = np.array([[cos, -sin], [sin, cos]]) * (scale * np.array([1 + ovality, 1 - ovality]))
    template_center = (len(template) - 1) / 2
    affine = np.hstack([linear, (local_position - linear.sum(axis=1) * template_center)[:, None]])
    density[box] += cv2.warpAffine(template, affine, (window.width, window.height),
                                   flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def _add_stray_platelets(canvas: _Canvas, foreground: _Painted, center: np.ndarray,
                         keep_out: float) -> None:
    """Paint a few single platelets away from the central object onto ``foreground``."""
    rng = canvas.rng
    for _ in range(int(rng.choice([0, 0, 1, 1, 2, 3]))):
        distance = keep_out + canvas.px(rng.uniform(25, 150))
        position = center + distance * _unit(rng.uniform(0, 2 * np.pi))
        size = canvas.px(rng.uniform(4, 8))
        window, local_center, box = canvas.window(position, 2 * size)
        if not window.empty:
            _paste(foreground, box, _platelet(window, local_center, size))


def _expose(canvas: _Canvas, density: np.ndarray) -> np.ndarray:
    """Photograph optical density as 8-bit RGB: uneven light, defocus and sensor noise."""
    rng = canvas.rng
    ys = np.linspace(-0.5, 0.5, canvas.height, dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, canvas.width, dtype=np.float32)[None, :]
    tilt_x, tilt_y = rng.normal(0, 0.03), rng.normal(0, 0.03)
    illumination = 1.0 + tilt_x * xs + tilt_y * ys - rng.uniform(0, 0.06) * (xs * xs + ys * ys)
    lamp = _LAMP_RGB * rng.uniform(0.98, 1.03) * np.exp(rng.normal(0, 0.012, 3)).astype(np.float32)
    image = cv2.exp(-density) * lamp
    image *= illumination[..., None]
    image = cv2.GaussianBlur(image, (0, 0), canvas.px(rng.uniform(0.4, 1.2)))
    sensor_noise = rng.standard_normal(canvas.shape, np.float32) * np.float32(rng.uniform(1, 3.5))
    image += sensor_noise[..., None]
    return cv2.convertScaleAbs(image)  # rounds and saturates to 0..255 (values are >= 0)


def _check_label(label: str) -> None:
    if label not in PBC_CLASSES:
        raise InputError(f"unknown class {label!r}; expected one of: {', '.join(PBC_CLASSES)}")


def render_cell(label: str, rng: np.random.Generator, size: tuple[int, int] = DEFAULT_SIZE,
                lab: Lab = Lab()) -> tuple[np.ndarray, np.ndarray]:
    """Return (RGB uint8 image HxWx3, bool mask HxW of the true white cell — nucleus+cytoplasm —
    or, for platelet, of the platelet clump), as photographed in ``lab``."""
    _check_label(label)
    canvas = _Canvas.random(rng, size, lab)
    center = np.array([canvas.width / 2, canvas.height / 2]) + rng.normal(0, canvas.px(8), 2)
    window, local_center, box = canvas.window(center, canvas.px(_CELL_REACH))
    cell = _PAINTERS[label](window, local_center)
    foreground = _Painted(canvas.zeros(), canvas.zeros(3))
    _paste(foreground, box, cell)
    mask = foreground.coverage > 0.5
    _add_stray_platelets(canvas, foreground, center, cell.radius)
    red_cells = _red_cells(canvas, center, cell.radius)
    stain = canvas.stain
    density = red_cells[..., None] * stain.red_cell
    density += stain.plasma
    density *= (1.0 - foreground.coverage)[..., None]
    density += foreground.density
    return _expose(canvas, density), mask


def render_example(label: str, index: int, seed: int, size: tuple[int, int] = DEFAULT_SIZE,
                   lab: Lab = Lab()) -> tuple[np.ndarray, np.ndarray]:
    """The deterministic image i of a class: seeds the rng with
    [seed, PBC_CLASSES.index(label), index]."""
    _check_label(label)
    rng = np.random.default_rng([seed, PBC_CLASSES.index(label), index])
    return render_cell(label, rng, size, lab)


def _encode_jpeg(rgb: np.ndarray) -> bytes:
    """JPEG bytes of an RGB image at the data set's fixed quality."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return encoded.tobytes()


# --- the data set --------------------------------------------------------------------------


def _relative_path(label: str, index: int) -> Path:
    return Path(label) / f"{label}_{index:05d}.jpg"


def _write_example(job: tuple[Path, str, int, int, tuple[int, int]]) -> None:
    root, label, index, seed, size = job
    rgb, _ = render_example(label, index, seed, size)
    (root / _relative_path(label, index)).write_bytes(_encode_jpeg(rgb))


def generate_dataset(out_dir: Path, images_per_class: int, seed: int = 0,
                     size: tuple[int, int] = DEFAULT_SIZE,
                     classes: Sequence[str] = PBC_CLASSES,
                     workers: int | None = None) -> list[Path]:
    """Write <out_dir>/<class>/<class>_<index:05d>.jpg for every class (the class-per-folder
    layout), atomically (write into a temp folder beside out_dir, then rename into place), and
    return the written paths sorted.

    ``workers`` processes render in parallel (default: one per CPU; 1 renders in this process).
    """
    if not classes:
        raise InputError("classes must name at least one class")
    if len(set(classes)) != len(classes):
        raise InputError(f"classes must not repeat a class, got {list(classes)}")
    for label in classes:
        _check_label(label)
    if images_per_class < 1:
        raise InputError(f"images_per_class must be at least 1, got {images_per_class}")
    out_dir = Path(out_dir)
    workers = workers or os.cpu_count() or 1
    with atomic_path(out_dir, mark_folder=False) as staging:  # a data set, not an output
        for label in classes:
            (staging / label).mkdir(parents=True)
        jobs = [(staging, label, index, seed, size)
                for label in classes for index in range(images_per_class)]
        with tqdm(total=len(jobs), desc="synthetic", unit="img") as progress:
            if workers == 1:
                for job in jobs:
                    _write_example(job)
                    progress.update()
            else:
                # One OpenCV thread per process: the processes already occupy every core.
                with opencv_threads(1), process_pool(workers) as pool:
                    for _ in pool.map(_write_example, jobs, chunksize=8):
                        progress.update()
    return sorted(out_dir / _relative_path(label, index)
                  for label in classes for index in range(images_per_class))
