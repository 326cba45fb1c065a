"""Atomic file output, parameter loading and validated image decoding shared by every stage."""

from __future__ import annotations

import json
import os
import shutil
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
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})


class ImageDecodeError(ValueError):
    """An image file is corrupt, truncated or not an image at all."""


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


def decode_image(source: str | Path | bytes) -> np.ndarray:
    """Decode a whole image to RGB uint8 (H, W, 3); raise ImageDecodeError on any defect.

    The full decode (not just the header) is what catches truncated JPEGs.
    """
    handle = BytesIO(source) if isinstance(source, bytes) else source
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(handle) as image:
            image.load()
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ImageDecodeError(f"cannot decode {name}: {reason}") from error


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
