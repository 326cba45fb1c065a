"""Atomic file output, parameter loading and validated image decoding shared by every stage."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import yaml
from PIL import Image

from pipeline.errors import PipelineError, one_line

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
MAX_IMAGE_PIXELS = 50_000_000  # params data.max_image_pixels; PBC images are 360x363
MIN_IMAGE_SIDE = 32            # params data.min_image_side (checked at ingest)
# decode_image checks its own limit (a param) before decoding; Pillow's fixed one would preempt it
Image.MAX_IMAGE_PIXELS = None
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


class ImageDecodeError(PipelineError, ValueError):
    """An image file is corrupt, truncated or not an image at all."""


class UnsafePathError(PipelineError):
    """A path to be written would land outside its output folder."""


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a regular file, read in chunks; OSError for a pipe, socket or device,
    which would block or never end."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"{path}: not a regular file (a pipe, socket or device)")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read the pipeline's parameter file."""
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` only if the block succeeds.

    Works for files and folders: readers never see a half-written output, and a failure leaves
    whatever was at ``dest`` before untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    target = tmp / dest.name
    try:
        yield target
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_inside(path: Path, root: Path) -> Path:
    """``path`` itself if it resolves inside ``root``; raise UnsafePathError otherwise."""
    if not Path(path).resolve().is_relative_to(Path(root).resolve()):
        raise UnsafePathError(f"refusing to write {path}: it resolves outside {root}")
    return path


def write_json(path: str | Path, data: Any) -> None:
    """Write pretty JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    """Write a CSV atomically, without the index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def decode_image(source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS,
                 min_side: int = 0) -> np.ndarray:
    """Decode a whole image to RGB uint8 (H, W, 3); raise ImageDecodeError on any defect.

    The size is checked against ``max_pixels`` before any pixel is decoded (decompression
    bombs) and against ``min_side`` (too small to hold a cell). The full decode (not just the
    header) is what catches truncated files. 16-bit and float images are scaled to 8 bits by
    their real range; transparent images are composited on white.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else read_regular_file(Path(source))
        with Image.open(BytesIO(data)) as image:
            _check_size(image.size, max_pixels, min_side)
            image.load()
            pixels = _to_rgb8(image, data)
    except ImageDecodeError as error:
        raise ImageDecodeError(f"cannot decode {name}: {error}") from None
    except (IsADirectoryError, FileNotFoundError, PermissionError) as error:
        raise ImageDecodeError(f"cannot read {name}: {type(error).__name__}") from error
    except Exception as error:  # noqa: BLE001 - any decoder failure is a defect of the file
        reason = _OBJECT_REPR.sub("", one_line(error))  # no memory addresses: stable reasons
        raise ImageDecodeError(f"cannot decode {name}: {reason}") from error
    if (pixels == pixels[0, 0]).all():
        raise ImageDecodeError(f"cannot decode {name}: blank image, every pixel is "
                               f"{tuple(int(v) for v in pixels[0, 0])}")
    return pixels


def read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file; a FIFO or device (which would block or never end) is a
    defect of the input, not something to read."""
    if not stat.S_ISREG(path.stat().st_mode) and not path.is_dir():
        raise ImageDecodeError("not a regular file (a pipe, socket or device)")
    return path.read_bytes()


def _check_size(size: tuple[int, int], max_pixels: int, min_side: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(f"{width}x{height} pixels exceeds the limit of {max_pixels} "
                               "(data.max_image_pixels)")
    if min(width, height) < min_side:
        raise ImageDecodeError(f"image too small to hold a cell: {width}x{height}, under "
                               f"{min_side} px a side (data.min_image_side)")


def _to_rgb8(image: Image.Image, data: bytes) -> np.ndarray:
    """RGB uint8 pixels of a loaded image, whatever its mode and bit depth."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return np.repeat(_stretch(np.asarray(image))[..., None], 3, axis=2)
    if image.format in ("PNG", "TIFF") and _is_16_bit_colour(image, data):
        deep = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if deep is not None and deep.dtype != np.uint8 and deep.ndim == 3:
            return np.ascontiguousarray(_stretch(deep[..., 2::-1]))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _is_16_bit_colour(image: Image.Image, data: bytes) -> bool:
    if image.format == "PNG":
        return len(data) > 24 and data[24] == 16  # IHDR bit depth
    bits = image.tag_v2.get(258, (8,))
    return max(bits if isinstance(bits, tuple) else (bits,)) > 8


def _stretch(array: np.ndarray) -> np.ndarray:
    """Scale to uint8 by the image's own range (a 12-bit image in 16 bits is not all dark)."""
    values = array.astype(np.float64)
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if high <= low:
        return np.zeros(array.shape, np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


@contextmanager
def opencv_threads(count: int) -> Iterator[None]:
    """Limit OpenCV to ``count`` threads within the block; processes forked in it inherit that.

    (Calling ``cv2.setNumThreads`` in a forked child instead hangs once the parent has started
    OpenCV's thread pool.)
    """
    previous = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)
