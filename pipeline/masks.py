"""Binary white-cell masks: a stained-nucleus colour prior seeds OpenCV GrabCut, then morphology.

The work is done on a downscaled copy (``work_size`` on the long side) for speed, and the mask is
upscaled back to the image's size. GrabCut's k-means initialisation draws from OpenCV's RNG, which
is re-seeded for every image so the masks are identical bit for bit between runs.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.errors import process_pool
from pipeline.io import (
    ImageDecodeError,
    atomic_path,
    decode_image,
    opencv_threads,
    read_regular_file,
    write_csv,
)

logger = logging.getLogger(__name__)

STATUSES = ("ok", "fallback", "whole-image", "empty")
CHECKS = ("area", "solidity", "border", "red-cell", "nucleus-only")  # what stats.csv flags
FLAGGED_ROW = "flagged / any class"  # the gallery's row of failing masks (no folder's name)


@dataclass(frozen=True)
class MaskParams:
    """Every knob of the mask stage (``params.yaml: masks``)."""

    # the masks stage's gallery reads it, not the mask computation (nor any checkpoint)
    READ_ELSEWHERE: ClassVar[frozenset[str]] = frozenset({"gallery_per_class"})

    work_size: int = 128
    saturation_min: int = 75
    green_max: int = 140
    prior_open_px: int = 2
    cytoplasm_px: int = 14
    border_px: int = 4
    grabcut_iterations: int = 3
    open_px: int = 2
    close_px: int = 4
    min_area_fraction: float = 0.002
    max_area_fraction: float = 0.85
    seed: int = 0


@dataclass(frozen=True)
class MaskChecks:
    """Bounds of the quality checks a mask is flagged by (``CHECKS``); a flagged mask is kept as
    it is (training reads it unchanged), named in ``stats.csv`` and drawn red in the gallery."""

    min_area: float = 0.01            # of the image: less is not even a platelet clump
    max_area: float = 0.6             # more: the mask holds much beside the cell
    min_solidity: float = 0.85        # mask / convex hull area: ragged, or grown into a neighbour
    max_red_cell_share: float = 0.05  # of the mask, red cells' colour beyond the cytoplasm's reach
    max_nucleus_share: float = 0.9    # of the mask, nucleus prior: no cytoplasm around it


@dataclass(frozen=True)
class MaskInfo:
    """What happened to one image's mask and how it fares in the checks, as in ``stats.csv``."""

    status: str
    area_fraction: float
    centroid_offset: float
    components: int
    solidity: float = float("nan")
    touches_border: bool = False
    red_cell_share: float = 0.0
    nucleus_share: float = float("nan")
    failed_checks: str = ""   # the ``CHECKS`` it fails, joined by ";" ("" when none)


def disk(radius: int) -> np.ndarray:
    size = 2 * max(radius, 0) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def nucleus_prior(rgb: np.ndarray, params: MaskParams) -> np.ndarray:
    """Stained nuclei (and platelets): saturated purple pixels with a low green channel."""
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    prior = (saturation >= params.saturation_min) & (rgb[..., 1] <= params.green_max)
    prior = cv2.morphologyEx(prior.astype(np.uint8), cv2.MORPH_OPEN, disk(params.prior_open_px))
    return prior.astype(bool)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed background: flood the border-connected background, keep the rest."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return mask | holes


def _central_component(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Keep the connected component containing, or else nearest to, the image centre."""
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return mask.astype(bool), 0
    height, width = mask.shape
    ys, xs = np.nonzero(labels)
    distance = (ys - (height - 1) / 2) ** 2 + (xs - (width - 1) / 2) ** 2
    nearest = labels[ys[np.argmin(distance)], xs[np.argmin(distance)]]
    return labels == nearest, count - 1


def _clean(mask: np.ndarray, params: MaskParams) -> tuple[np.ndarray, int]:
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, disk(params.open_px))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, disk(params.close_px))
    central, components = _central_component(mask)
    return fill_holes(central), components


def _grabcut(rgb: np.ndarray, prior: np.ndarray, params: MaskParams) -> np.ndarray:
    """Run GrabCut seeded by the prior; raises cv2.error when it cannot model both classes."""
    trimap = np.full(prior.shape, cv2.GC_PR_BGD, np.uint8)
    near_nucleus = cv2.dilate(prior.astype(np.uint8), disk(params.cytoplasm_px)).astype(bool)
    trimap[near_nucleus] = cv2.GC_PR_FGD
    trimap[prior] = cv2.GC_FGD
    border = params.border_px
    trimap[:border, :] = trimap[-border:, :] = cv2.GC_BGD
    trimap[:, :border] = trimap[:, -border:] = cv2.GC_BGD
    cv2.setRNGSeed(params.seed)
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), trimap, None, background, foreground,
                params.grabcut_iterations, cv2.GC_INIT_WITH_MASK)
    return (trimap == cv2.GC_FGD) | (trimap == cv2.GC_PR_FGD)


def _status(mask: np.ndarray, params: MaskParams) -> str:
    area = mask.mean()
    if area < params.min_area_fraction:
        return "empty"
    if area > params.max_area_fraction:
        return "whole-image"
    return "ok"


def _solidity(mask: np.ndarray) -> float:
    """The mask's pixels over its convex hull's (NaN when empty)."""
    points = cv2.findNonZero(mask.astype(np.uint8))
    if points is None:
        return float("nan")
    hull = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
    return float(min(1.0, mask.sum() / max(int(hull.sum()), 1)))


def _touches_border(mask: np.ndarray, border_px: int) -> bool:
    """Whether the mask reaches the band GrabCut keeps as background (or the edge itself)."""
    band = max(border_px, 0) + 1
    return bool(mask[:band].any() or mask[-band:].any() or mask[:, :band].any()
                or mask[:, -band:].any())


def red_cell_share(rgb: np.ndarray, mask: np.ndarray, prior: np.ndarray, reach_px: int
                   ) -> float:
    """Share of the mask farther than ``reach_px`` from the nucleus prior (beyond the
    cytoplasm GrabCut was seeded with) in the red cells' colour, learnt from the image itself:
    outside the (dilated) mask, the pixels more saturated than Otsu's split of that region are
    red cells (the rest is the pale background); a mask pixel within two standard deviations of
    their mean Lab colour, on every channel, counts. 0 without red cells around. (Pale pink
    cytoplasm has red cells' colour too: only its distance from the nucleus tells them apart.)
    """
    outside = ~cv2.dilate(mask.astype(np.uint8), disk(3)).astype(bool) & ~prior
    if not mask.any() or outside.sum() < 50:
        return 0.0
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    split, _ = cv2.threshold(saturation[outside].reshape(-1, 1), 0, 255,
                             cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    red_cells = outside & (saturation > split)
    far = cv2.distanceTransform((~prior).astype(np.uint8), cv2.DIST_L2, 3) > reach_px
    body = mask & far
    if red_cells.sum() < 0.02 * outside.sum() or not body.any():
        return 0.0
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    reference, spread = lab[red_cells].mean(0), np.maximum(lab[red_cells].std(0), 4.0)
    alike = (np.abs(lab[body] - reference) / spread).max(1) < 2.0
    return float(alike.sum() / mask.sum())


def check_mask(rgb: np.ndarray, mask: np.ndarray, prior: np.ndarray, params: MaskParams,
               checks: MaskChecks = MaskChecks()) -> dict[str, Any]:
    """The measures behind ``CHECKS`` for a boolean ``mask`` of ``rgb`` at the size it was
    computed (``prior``: its nucleus prior), and the checks it fails (``failed_checks``, joined
    by ";")."""
    area = float(mask.mean())
    measures = {"solidity": _solidity(mask),
                "touches_border": _touches_border(mask, params.border_px),
                "red_cell_share": red_cell_share(rgb, mask, prior, params.cytoplasm_px),
                "nucleus_share": (float((prior & mask).sum() / mask.sum()) if mask.any()
                                  else float("nan"))}
    failed = {"area": not checks.min_area <= area <= checks.max_area,
              "solidity": measures["solidity"] < checks.min_solidity,
              "border": measures["touches_border"],
              "red-cell": measures["red_cell_share"] > checks.max_red_cell_share,
              "nucleus-only": measures["nucleus_share"] > checks.max_nucleus_share}
    return measures | {"failed_checks": ";".join(name for name in CHECKS if failed[name])}


def compute_mask(rgb: np.ndarray, params: MaskParams) -> tuple[np.ndarray, MaskInfo]:
    """Return the uint8 0/255 mask of the central white cell (same size as ``rgb``) and its info.

    When GrabCut fails or leaks over the whole image, the cleaned colour prior is used instead
    (status ``fallback``); when even that finds nothing, the mask is empty and says so.
    """
    height, width = rgb.shape[:2]
    scale = params.work_size / max(height, width)
    small = cv2.resize(rgb, (round(width * scale), round(height * scale)),
                       interpolation=cv2.INTER_AREA)
    prior = nucleus_prior(small, params)
    prior_mask, prior_components = _clean(prior, params)
    status = _status(prior_mask, params)
    mask, components = prior_mask, prior_components
    if status == "ok":
        try:
            cut_mask, components = _clean(_grabcut(small, prior, params), params)
            status = _status(cut_mask, params)
        except cv2.error:
            status = "failed"
        if status == "ok":
            mask = cut_mask
        else:
            mask, components, status = prior_mask, prior_components, "fallback"
    full = cv2.resize(mask.astype(np.uint8) * 255, (width, height),
                      interpolation=cv2.INTER_LINEAR)
    full = np.where(full >= 128, 255, 0).astype(np.uint8)
    checked = check_mask(small, mask.astype(bool), prior, params)
    return full, _describe(full, status, components, checked)


def _describe(mask: np.ndarray, status: str, components: int, checked: dict[str, Any]
              ) -> MaskInfo:
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return MaskInfo(status, 0.0, float("nan"), components, **checked)
    offset = np.hypot(xs.mean() - (width - 1) / 2, ys.mean() - (height - 1) / 2)
    return MaskInfo(status, float(len(xs) / mask.size), float(offset / np.hypot(width, height)),
                    components, **checked)


def mask_path(masks_dir: Path, image_relative: str) -> Path:
    """Where the mask of an image (by its manifest path) lives."""
    return masks_dir / f"{image_relative}.png"


def read_mask(path: Path) -> np.ndarray | None:
    """A stored mask (grayscale uint8), or None where the file is missing or not an image;
    quietly, where ``cv2.imread`` would print a warning for every missing file of a folder."""
    try:
        data = read_regular_file(path)
    except (OSError, ImageDecodeError):
        return None
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) if data else None


def _mask_one(job: tuple[str, Path, Path, MaskParams]) -> dict[str, Any]:
    relative, images_dir, masks_dir, params = job
    mask, info = compute_mask(decode_image(images_dir / relative), params)
    target = mask_path(masks_dir, relative)
    target.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(target), mask)
    return {"path": relative, **info.__dict__}


def build_masks(manifest: pd.DataFrame, images_dir: Path, out_dir: Path, params: MaskParams,
                gallery_per_class: int = 6, workers: int | None = None,
                gallery: Path | None = None) -> pd.DataFrame:
    """Write a mask per manifest row and ``stats.csv`` into ``out_dir``, atomically, and the
    gallery to ``gallery`` (default: ``out_dir/gallery.png``)."""
    with atomic_path(out_dir) as tmp:
        jobs = [(rel, images_dir, tmp, params) for rel in manifest["path"]]
        with opencv_threads(1), process_pool(workers) as pool:
            rows = list(tqdm(pool.map(_mask_one, jobs, chunksize=16), total=len(jobs),
                             desc="masks", unit="img"))
        stats = pd.DataFrame(rows).merge(manifest[["path", "label"]], on="path")
        stats["failed_checks"] = stats["failed_checks"].fillna("")
        write_csv(tmp / "stats.csv", stats)
        picture = nullcontext(tmp / "gallery.png") if gallery is None else atomic_path(gallery)
        with picture as picture_path:
            draw_gallery(stats, images_dir, tmp, picture_path, gallery_per_class, params.seed)
    counts = stats["status"].value_counts().reindex(STATUSES, fill_value=0)
    logger.info("masks: %s", ", ".join(f"{n} {s}" for s, n in counts.items()))
    if counts["empty"]:
        logger.warning("%d images have an empty mask (listed in stats.csv)", counts["empty"])
    log_flagged(stats)
    return stats


def log_flagged(stats: pd.DataFrame) -> None:
    """Log the share of masks failing a check (``stats.csv``'s ``failed_checks``), and by check."""
    failed = stats["failed_checks"].fillna("").astype(str)
    by_check = {name: int(failed.str.split(";").map(lambda names, n=name: n in names).sum())
                for name in CHECKS}
    logger.info("mask checks: %d of %d masks flagged (%.1f%%): %s", (failed != "").sum(),
                len(stats), 100 * (failed != "").mean() if len(stats) else 0.0,
                ", ".join(f"{n} {name}" for name, n in by_check.items()))


def gallery_sample(stats: pd.DataFrame, per_class: int, seed: int) -> dict[str, pd.DataFrame]:
    """A seeded random sample of up to ``per_class`` rows of each class, in path order, and
    (as ``FLAGGED_ROW``) of the masks failing a check, when any does."""
    samples = {label: rows.sample(min(per_class, len(rows)), random_state=seed)
               .sort_values("path") for label, rows in stats.groupby("label", sort=True)}
    if "failed_checks" in stats:
        flagged = stats[stats["failed_checks"].fillna("").astype(str) != ""]
        if len(flagged):
            samples[FLAGGED_ROW] = flagged.sample(min(per_class, len(flagged)),
                                                random_state=seed).sort_values("path")
    return samples


def tile_label(row: Any) -> tuple[str, bool]:
    """A gallery tile's caption (the mask's status, or the checks it fails) and whether it shows
    a failure (drawn red)."""
    failed = str(getattr(row, "failed_checks", "") or "")
    failed = "" if failed == "nan" else failed
    words = ([] if row.status == "ok" and failed else [row.status]) + (
        [f"flagged: {failed.replace(';', ', ')}"] if failed else [])
    return "\n".join(words), bool(failed) or row.status != "ok"


def draw_gallery(stats: pd.DataFrame, images_dir: Path, masks_dir: Path, out_path: Path,
                 per_class: int = 6, seed: int = 0) -> None:
    """Save a grid: one row per class (a seeded random sample) and one of masks failing a
    check, each mask outlined in green and captioned with its status and failed checks (red).

    Drawn on its own figure and canvas (no pyplot state, no backend switch); class names are
    plain text, never mathtext (a class folder named ``a$^^$`` is a name, not a formula).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    samples = gallery_sample(stats, per_class, seed)
    fig = Figure(figsize=(1.9 * per_class, 2.0 * len(samples)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(samples), per_class, squeeze=False)
    for row, (label, picks) in zip(axes, samples.items(), strict=True):
        for ax, pick in zip(row, list(picks.itertuples()) + [None] * per_class, strict=False):
            ax.axis("off")
            if pick is None:
                continue
            image = decode_image(images_dir / pick.path).copy()
            mask = read_mask(mask_path(masks_dir, pick.path))
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(image, contours, -1, (0, 220, 0), max(2, image.shape[0] // 120))
            ax.imshow(image)
            caption, failing = tile_label(pick)
            if label == FLAGGED_ROW:
                caption = f"{pick.label}: {caption}"
            ax.set_title(caption, fontsize=7, color="red" if failing else "black",
                         parse_math=False)
        row[0].text(-0.08, 0.5, label, transform=row[0].transAxes, rotation=90, ha="right",
                    va="center", fontsize=11, fontweight="bold", parse_math=False)
    fig.suptitle(f"Cell masks (green outline) by class: {per_class} drawn at random (seed {seed});"
                 f"\nred: fails a check ({', '.join(CHECKS)}); the masks failing one in the "
                 f"row '{FLAGGED_ROW}'",
                 fontsize=12)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90, format="png")
