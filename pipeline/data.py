"""Images as the models see them: mask modes, resizing, caching and augmentation.

Every image is decoded, masked (``mask_mode``) and resized once per run into a uint8 tensor held
in memory (memory-mapped past a size: ``load_prepared``); augmentation (torchvision transforms
v2) then runs on those small tensors, which keeps the data loader far ahead of CPU training.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from pipeline.errors import PipelineError, one_line, process_pool
from pipeline.io import decode_image, opencv_threads
from pipeline.masks import MaskParams, compute_mask, read_mask
from pipeline.transfer import (
    HedJitter,
    crop_to_cell_scale,
    crop_to_red_cell_scale,
    normalise_cell_stain,
    normalise_stain,
)

MASK_MODES = ("none", "crop", "suppress")


@dataclass(frozen=True)
class Preprocess:
    """Everything needed to turn a raw image into model input; saved inside every checkpoint."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mask_mode: str = "none"
    mask_margin: float = 0.25
    suppress_strength: float = 0.7
    cell_fraction: float | None = None  # crop only: the cell's diameter as this share of the side
    stain_normalise: bool = False  # slide's colour to pipeline.transfer's reference
    stain_jitter: float = 0.0  # training only: HED jitter of this strength (Tellez et al.)
    blur_sigma: float = 0.0  # training only: half the images blurred with sigma up to this
    red_cell_crop: float | None = None  # crop only: the side in red-cell diameters (scale)
    cell_stain_normalise: bool = False  # the white cell's stain to pipeline.transfer's reference

    def __post_init__(self) -> None:
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {', '.join(MASK_MODES)}, "
                             f"not {self.mask_mode!r}")
        if self.cell_fraction is not None and not 0 < self.cell_fraction <= 1:
            raise ValueError(f"cell_fraction must be in (0, 1] (or null), "
                             f"not {self.cell_fraction!r}")
        if self.red_cell_crop is not None and not 0 < self.red_cell_crop < math.inf:
            raise ValueError(f"red_cell_crop must be a number > 0 (or null), "
                             f"not {self.red_cell_crop!r}")
        if self.cell_fraction is not None and self.red_cell_crop is not None:
            raise ValueError("cell_fraction and red_cell_crop both set the crop's scale: "
                             "set one of them")
        if not 0 <= self.stain_jitter < 1:
            raise ValueError(f"stain_jitter must be in [0, 1), not {self.stain_jitter!r}")
        if not 0 <= self.blur_sigma < math.inf:
            raise ValueError(f"blur_sigma must be a number >= 0, not {self.blur_sigma!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _square_pad(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return cv2.copyMakeBorder(image, top, side - height - top, left, side - width - left,
                              cv2.BORDER_REFLECT_101)


def _crop_to_mask(image: np.ndarray, mask: np.ndarray, margin: float) -> np.ndarray:
    """Square crop around the mask's bounding box, grown by ``margin`` of its side."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return image
    centre_y, centre_x = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    side = max(np.ptp(ys), np.ptp(xs), 1) * (1 + 2 * margin)
    half = int(np.ceil(side / 2))
    padded = cv2.copyMakeBorder(image, half, half, half, half, cv2.BORDER_REFLECT_101)
    top, left = int(round(centre_y)), int(round(centre_x))
    return padded[top:top + 2 * half, left:left + 2 * half]


def _suppress_background(image: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
    """Fade everything outside the (softened) mask toward the background's mean colour."""
    if not mask.any() or mask.all():
        return image
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), sigmaX=3)[..., None]
    background = image[mask == 0].mean(axis=0)
    faded = image * (1 - strength) + background * strength
    return np.clip(image * soft + faded * (1 - soft), 0, 255).astype(np.uint8)


def _crop(image: np.ndarray, mask: np.ndarray, prep: Preprocess,
          reference: np.ndarray | None) -> np.ndarray:
    """``crop`` mode: at the red cells' scale (``red_cell_crop``, measured on ``reference``, the
    RGB image as read), at the white cell's (``cell_fraction``) or around the mask's box."""
    if prep.red_cell_crop is not None:
        if reference is None:
            raise ValueError("red_cell_crop measures the red cells: crop a mask with its image")
        return crop_to_red_cell_scale(image, mask, prep.red_cell_crop, reference)
    if prep.cell_fraction is not None:
        return crop_to_cell_scale(image, mask, prep.cell_fraction)
    return _crop_to_mask(image, mask, prep.mask_margin)


def prepare_image(image: np.ndarray, mask: np.ndarray | None, prep: Preprocess) -> np.ndarray:
    """Normalise the stain (if asked), apply the mask mode and resize to a square
    ``image_size`` uint8 RGB array. The red cells that set the crop's scale are measured on
    the image as read, before any stain change."""
    as_read = image
    if prep.stain_normalise:
        image = normalise_stain(image, mask)
    if prep.cell_stain_normalise and mask is not None:
        image = normalise_cell_stain(image, mask)
    if prep.mask_mode != "none":
        if mask is None:
            raise ValueError(f"mask_mode {prep.mask_mode!r} needs a mask")
        if prep.mask_mode == "crop":
            image = _crop(image, mask, prep, as_read)
        else:
            image = _suppress_background(image, mask, prep.suppress_strength)
    return _resize(image, prep)


def _resize(image: np.ndarray, prep: Preprocess) -> np.ndarray:
    return cv2.resize(_square_pad(image), (prep.image_size, prep.image_size),
                      interpolation=cv2.INTER_AREA)


def prepare_file(job: tuple[Path, Path | None, Preprocess, MaskParams]) -> np.ndarray:
    """Decode one image, mask it (stored mask, or computed when none is given) and resize."""
    image_path, mask_file, prep, mask_params = job
    image = decode_image(image_path)
    mask = None
    if mask_file is not None:
        mask = read_mask(mask_file)
    elif prep.mask_mode != "none":
        mask, _ = compute_mask(image, mask_params)
    return prepare_image(image, mask, prep)


def prepare_or_reason(job: tuple[Path, Path | None, Preprocess, MaskParams]
                      ) -> np.ndarray | str:
    """The model input for one file, or the one-line reason it cannot be read (OpenCV's errors
    included: an image that one setting cannot process is skipped, the run goes on)."""
    try:
        return prepare_file(job)
    except (PipelineError, OSError, ValueError, MemoryError, cv2.error) as error:
        return one_line(error)


def prepare_each(paths: list[Path], prep: Preprocess, mask_files: list[Path] | None = None,
                 mask_params: MaskParams | None = None, desc: str = "load",
                 workers: int | None = None) -> Iterator[np.ndarray | str]:
    """Decode, mask and resize every file in parallel, yielding in order each one's
    ``image_size`` uint8 RGB array or the one-line reason it cannot be read.

    Masks come from ``mask_files`` (the mask stage's output) or, without them, are computed on
    the fly with ``mask_params`` (images from outside the pipeline).
    """
    files = mask_files if prep.mask_mode != "none" and mask_files else [None] * len(paths)
    jobs = [(path, mask, prep, mask_params or MaskParams())
            for path, mask in zip(paths, files, strict=True)]
    with opencv_threads(1), process_pool(workers) as pool:
        yield from tqdm(pool.map(prepare_or_reason, jobs, chunksize=16), total=len(jobs),
                        desc=desc, unit="img", leave=False)


def prepare_all(paths: list[Path], prep: Preprocess, mask_files: list[Path] | None = None,
                mask_params: MaskParams | None = None, desc: str = "load",
                workers: int | None = None) -> list[np.ndarray | str]:
    """Every result of :func:`prepare_each`, as a list."""
    return list(prepare_each(paths, prep, mask_files, mask_params, desc, workers))


def stack_images(arrays: list[np.ndarray]) -> torch.Tensor:
    """Prepared (S, S, 3) arrays as one uint8 tensor (N, 3, S, S)."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def image_store(count: int, side: int, in_memory_max_mb: float) -> np.ndarray:
    """An empty uint8 array (count, 3, side, side): in memory up to ``in_memory_max_mb``, else
    mapped onto a temporary file (in ``TMPDIR``) that the system deletes once it is released."""
    shape = (count, 3, side, side)
    if math.prod(shape) <= in_memory_max_mb * 2**20:
        return np.empty(shape, np.uint8)
    with tempfile.NamedTemporaryFile(prefix="wbc-images-", suffix=".u8") as backing:
        # the mapping outlives the name: nothing is left on disk, whatever ends the process
        return np.memmap(backing, np.uint8, "w+", shape=shape)


def load_prepared(paths: list[Path], prep: Preprocess, mask_files: list[Path] | None = None,
                  mask_params: MaskParams | None = None, workers: int | None = None,
                  desc: str = "load", in_memory_max_mb: float = math.inf) -> torch.Tensor:
    """Every one of ``paths`` prepared (see ``prepare_each``), as one uint8 tensor (N, 3, S, S)
    filled as the images arrive (memory-mapped past ``in_memory_max_mb``); an unreadable file is
    an error naming it."""
    store = image_store(len(paths), prep.image_size, in_memory_max_mb)
    reasons = []
    for index, item in enumerate(prepare_each(paths, prep, mask_files, mask_params, desc,
                                              workers)):
        if isinstance(item, str):
            reasons.append(item)
        else:
            store[index] = item.transpose(2, 0, 1)
    if reasons:
        raise PipelineError(f"{reasons[0]} ({len(reasons)} of {len(paths)} images unreadable)")
    return torch.from_numpy(store)


def prepare_mask(mask: np.ndarray, prep: Preprocess, image: np.ndarray | None = None
                 ) -> np.ndarray:
    """The boolean cell mask on the model's input: the crop, padding and resize of
    ``prepare_image`` (geometry only; ``red_cell_crop`` needs the RGB ``image`` for its scale)."""
    if prep.mask_mode == "crop":
        mask = _crop(mask, mask, prep, image)
    return _resize(mask, prep) >= 128


def load_masks(paths: list[Path], mask_files: list[Path] | None, prep: Preprocess,
               mask_params: MaskParams) -> np.ndarray:
    """Input-sized boolean masks (N, S, S): stored mask files, or GrabCut computed here."""
    masks = []
    needs_image = mask_files is None or prep.red_cell_crop is not None  # GrabCut, red cells
    for index, path in enumerate(tqdm(paths, desc="masks", unit="img", leave=False)):
        image = decode_image(path) if needs_image else None
        if mask_files is not None:
            mask = read_mask(mask_files[index])
            if mask is None:
                raise PipelineError(f"{mask_files[index]}: unreadable mask (rerun the masks stage)")
        else:
            mask, _ = compute_mask(image, mask_params)
        masks.append(prepare_mask(mask, prep, image))
    return np.stack(masks)


def train_transform(prep: Preprocess) -> v2.Compose:
    """Augmentation for smear images: orientation is arbitrary, stain and focus vary."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomChoice([v2.RandomRotation((angle, angle)) for angle in (0, 90, 180, 270)]),
        v2.RandomAffine(degrees=10, translate=(0.04, 0.04), scale=(0.92, 1.08)),
        *([HedJitter(prep.stain_jitter)] if prep.stain_jitter else []),
        *([v2.RandomApply([v2.GaussianBlur(9, (0.1, prep.blur_sigma))])] if prep.blur_sigma
          else []),
        v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.03),
        *eval_transform(prep).transforms,
    ])


def eval_transform(prep: Preprocess) -> v2.Compose:
    """uint8 tensor to normalised float tensor."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)])


class CellDataset(Dataset):
    """Prepared uint8 images with integer labels and a transform applied on access.

    With ``masks`` (N, 1, S, S), each item also holds its cell mask, moved by the same
    geometric augmentation as the image (colour changes leave it alone).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Compose,
                 masks: torch.Tensor | None = None) -> None:
        self.images, self.labels, self.transform, self.masks = images, labels, transform, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        if self.masks is None:
            return self.transform(self.images[index]), self.labels[index]
        image, mask = self.transform(tv_tensors.Image(self.images[index]),
                                     tv_tensors.Mask(self.masks[index]))
        return image.as_subclass(torch.Tensor), self.labels[index], mask.as_subclass(torch.Tensor)
