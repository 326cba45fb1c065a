"""Safe atomic output, CSV and JSON files, parameter loading and validated image decoding.

Outputs never destroy anything: :func:`atomic_path` replaces only a regular file, or a folder the
pipeline made itself (it holds the :data:`OUTPUT_MARKER` file) or that holds no file, and
:func:`check_output` refuses, before any work, an output that is, holds or lies in an input.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from pipeline.errors import PipelineError, one_line
from pipeline.params_schema import read_params

OUTPUT_MARKER = ".wbc-output"  # in every folder atomic_path writes: the pipeline's to replace
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
MAX_IMAGE_PIXELS = 50_000_000  # params data.max_image_pixels; PBC images are 360x363
MIN_IMAGE_SIDE = 32            # params data.min_image_side (checked at ingest)
MAX_FILE_BYTES = 64 << 20      # params data.max_file_bytes: an image file is read whole
MIN_PIXEL_SPREAD = 8           # of 255 levels: less over the middle 98% of pixels is blank
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


class ImageDecodeError(PipelineError, ValueError):
    """An image file is corrupt, truncated or not an image at all."""


class UnsafePathError(PipelineError):
    """A path to be written would land outside its output folder."""


class UnsafeOutputError(PipelineError):
    """An output would replace or write into something that is not the pipeline's to replace."""


class InvalidJsonError(PipelineError, ValueError):
    """Data to be written as JSON holds NaN or Infinity, which JSON cannot represent."""


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
    """Read the pipeline's parameter file, every key checked for type and range
    (:mod:`pipeline.params_schema`): a bad one is a one-line ``ParamsError``."""
    return read_params(path)


def _holds_files(folder: Path) -> bool:
    """Whether anything but folders lies below ``folder`` (a link counts; none is followed)."""
    return any(files or any(os.path.islink(os.path.join(top, name)) for name in folders)
               for top, folders, files in os.walk(folder))


def _first_existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if os.path.lexists(parent):
            return parent
    return Path(".")


def check_replaceable(dest: Path) -> None:
    """Raise UnsafeOutputError unless writing ``dest`` loses nothing: it does not exist, or is a
    regular file, or a folder the pipeline made (it holds ``.wbc-output``) or holding no file."""
    dest = Path(dest)
    ancestor = _first_existing_ancestor(dest)
    if not ancestor.is_dir():
        raise UnsafeOutputError(f"cannot write {dest}: {ancestor} is a file, not a folder")
    try:
        mode = os.lstat(dest).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise UnsafeOutputError(f"refusing to replace {dest}: it is a symbolic link")
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        if (dest / OUTPUT_MARKER).is_file() or not _holds_files(dest):
            return
        raise UnsafeOutputError(f"refusing to replace {dest}: a folder the pipeline did not "
                                f"make (no {OUTPUT_MARKER} in it); choose a new or empty folder")
    raise UnsafeOutputError(f"refusing to replace {dest}: not a regular file (a device, pipe "
                            "or socket)")


def check_output(dest: str | Path, inputs: Iterable[str | Path], folder: bool = False) -> Path:
    """``dest`` if it is safe to write as this run's output (a file, or a ``folder``); raise
    UnsafeOutputError, before any work, if writing it could destroy anything: it is, holds or
    lies in one of ``inputs``, or is something :func:`atomic_path` never replaces."""
    dest = Path(dest)
    check_replaceable(dest)
    if folder and dest.exists() and not dest.is_dir():
        raise UnsafeOutputError(f"cannot write into {dest}: it is a file, not a folder")
    if not folder and dest.is_dir():
        raise UnsafeOutputError(f"refusing to replace the folder {dest} by a file: name a file")
    resolved = dest.resolve()
    for source in map(Path, inputs):
        if not os.path.lexists(source):
            continue
        found = source.resolve()
        if resolved == found or (dest.exists() and os.path.samefile(dest, found)):
            relation = "is"
        elif resolved.is_relative_to(found):
            relation = "lies inside"
        elif found.is_relative_to(resolved):
            relation = "holds"
        else:
            continue
        raise UnsafeOutputError(f"refusing to write {dest}: it {relation} the input {source}")
    return dest


@contextmanager
def atomic_path(dest: str | Path, mark_folder: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` only if the block succeeds.

    Works for files and folders: readers never see a half-written output, and a failure leaves
    whatever was at ``dest`` before untouched. What ``dest`` holds is checked before the block
    runs and again before it is replaced (:func:`check_replaceable`): nothing but a regular
    file, or a folder the pipeline made or holding no file, is ever replaced. A folder written
    here gets the ``.wbc-output`` marker (``mark_folder``; off for data sets, which are inputs).
    """
    dest = Path(dest)
    check_replaceable(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    target, old = tmp / dest.name, tmp / ".replaced"
    try:
        yield target
        if mark_folder and target.is_dir() and not target.is_symlink():
            (target / OUTPUT_MARKER).touch()
        check_replaceable(dest)
        if dest.is_dir() or (dest.exists() and target.is_dir()):
            os.replace(dest, old)
        try:
            os.replace(target, dest)
        except OSError:
            if os.path.lexists(old):
                os.replace(old, dest)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_inside(path: Path, root: Path) -> Path:
    """``path`` itself if it resolves inside ``root``; raise UnsafePathError otherwise."""
    if not Path(path).resolve().is_relative_to(Path(root).resolve()):
        raise UnsafePathError(f"refusing to write {path}: it resolves outside {root}")
    return path


def _non_finite_key(data: Any, where: str = "") -> str | None:
    """Where (``a.b[2]``) ``data`` holds the first NaN or infinite number, or None."""
    if isinstance(data, float | np.floating):
        return None if np.isfinite(data) else where or "the value"
    if isinstance(data, dict):
        items = ((f"{where}.{key}" if where else str(key), value) for key, value in data.items())
    elif isinstance(data, list | tuple):
        items = ((f"{where}[{index}]", value) for index, value in enumerate(data))
    else:
        return None
    return next((found for key, value in items if (found := _non_finite_key(value, key))), None)


def write_json(path: str | Path, data: Any) -> None:
    """Write pretty, valid JSON atomically; NaN and Infinity are refused (InvalidJsonError
    naming the key) rather than written as the invalid ``NaN``."""
    if (key := _non_finite_key(data)) is not None:
        raise InvalidJsonError(f"cannot write {path}: {key} is not a finite number (NaN or "
                               "Infinity, which JSON cannot hold)")
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# A cell starting with one of these runs as a formula in a spreadsheet (also after spaces; the
# full-width forms too); a quote, prefixed to such a cell and to any cell starting with a quote,
# makes it text, and reading our CSVs back takes exactly one leading quote off again.
_FORMULA_STARTS = tuple("=+-@\t\r\n\uff1d\uff0b\uff0d\uff20")
_ESCAPE = "'"


def escape_cell(value: Any) -> Any:
    """A string cell made safe to open in a spreadsheet; anything else unchanged."""
    if isinstance(value, str) and (value.startswith(_ESCAPE)
                                   or value.lstrip(" ").startswith(_FORMULA_STARTS)):
        return _ESCAPE + value
    return value


def unescape_cell(value: Any) -> Any:
    """The cell :func:`escape_cell` was given."""
    return value[1:] if isinstance(value, str) and value.startswith(_ESCAPE) else value


def _text_columns(frame: pd.DataFrame) -> list[int]:
    return [index for index, dtype in enumerate(frame.dtypes)
            if pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)]


def _map_strings(frame: pd.DataFrame, convert: Callable[[Any], Any]) -> pd.DataFrame:
    """``frame`` with ``convert`` applied to its column names and the cells of its text columns."""
    frame = frame.rename(columns=convert)
    converted = frame.copy()
    for index in _text_columns(frame):
        converted.isetitem(index, frame.iloc[:, index].map(convert))
    return converted


def csv_text(frame: pd.DataFrame) -> str:
    """``frame`` as CSV text, without the index, every string cell escaped (see escape_cell).

    A carriage return, which pandas leaves unquoted (spreadsheets and pandas itself would start
    a new row there), makes every cell quoted."""
    escaped = _map_strings(frame, escape_cell)
    cells = [*map(str, escaped.columns), *(cell for index in _text_columns(escaped)
                                           for cell in escaped.iloc[:, index])]
    returns = any(isinstance(cell, str) and "\r" in cell for cell in cells)
    return escaped.to_csv(index=False, quoting=csv.QUOTE_ALL if returns else csv.QUOTE_MINIMAL)


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    """Write a CSV atomically, without the index, string cells escaped against formulas: every
    CSV the pipeline writes goes through here, and :func:`read_csv` reads it back."""
    text = csv_text(frame)
    with atomic_path(path) as tmp:  # (bytes of a file name that are no UTF-8: escaped)
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")


def read_csv(path: str | Path, **options: Any) -> pd.DataFrame:
    """A CSV that :func:`write_csv` wrote, its cells as they were before escaping (``options``
    go to ``pandas.read_csv``; ``keep_default_na=False`` unless given)."""
    frame = pd.read_csv(path, **{"keep_default_na": False, **options})
    return _map_strings(frame, unescape_cell)


def read_split(split_dir: Path, part: str) -> pd.DataFrame:
    """One part (train/val/test) of the split, as manifest rows."""
    return read_csv(split_dir / f"{part}.csv", dtype={"sha256": str, "phash": str})


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def decode_image(source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS,
                 min_side: int = 0, max_bytes: int = MAX_FILE_BYTES) -> np.ndarray:
    """Decode a whole image to RGB uint8 (H, W, 3); raise ImageDecodeError on any defect.

    A file over ``max_bytes`` is refused unread. The size is checked against ``max_pixels``
    before any pixel is decoded (decompression bombs) and against ``min_side`` (too small to
    hold a cell); an animated or multi-page file is refused (which frame holds the cell?). The
    full decode (not just the header) is what catches truncated files. 16-bit and float images
    are scaled to 8 bits by their real range; transparent images are composited on white. A
    blank or nearly blank image (:func:`check_not_blank`) is refused.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else read_regular_file(Path(source), max_bytes)
        with _opened(data) as image:
            _check_size(image.size, max_pixels, min_side)
            _check_single_frame(image)
            image.load()
            pixels = _to_rgb8(image, data)
        check_not_blank(pixels)
    except ImageDecodeError as error:
        raise ImageDecodeError(f"cannot decode {name}: {error}") from None
    except (IsADirectoryError, FileNotFoundError, PermissionError) as error:
        raise ImageDecodeError(f"cannot read {name}: {type(error).__name__}") from error
    except Exception as error:  # noqa: BLE001 - any decoder failure is a defect of the file
        reason = _OBJECT_REPR.sub("", one_line(error))  # no memory addresses: stable reasons
        raise ImageDecodeError(f"cannot decode {name}: {reason}") from error
    return pixels


@contextmanager
def _opened(data: bytes) -> Iterator[Image.Image]:
    """The image in ``data``, opened with Pillow's own pixel limit off for the call:
    decode_image checks its own (a param) before decoding (no process-wide setting changes)."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        image = Image.open(BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    with image:
        yield image


def check_not_blank(pixels: np.ndarray, min_spread: int = MIN_PIXEL_SPREAD) -> None:
    """ImageDecodeError for an image with nothing to see: every pixel equal, or the middle 98%
    of its pixels (a sample of at most ~1M) within ``min_spread`` levels in every channel (one
    odd pixel on a flat frame, a nearly black or white picture)."""
    if (pixels == pixels[0, 0]).all():
        raise ImageDecodeError(f"blank image, every pixel is "
                               f"{tuple(int(v) for v in pixels[0, 0])}")
    step = max(1, int(np.sqrt(pixels.shape[0] * pixels.shape[1] / 1_000_000)))
    sample = pixels[::step, ::step].reshape(-1, pixels.shape[-1])
    low, high = np.percentile(sample, [1, 99], axis=0)
    spread = int(np.max(high - low))
    if spread < min_spread:
        raise ImageDecodeError(f"nearly blank image: 98% of its pixels lie within {spread} of "
                               f"255 levels in every channel (under {min_spread})")


def _check_single_frame(image: Image.Image) -> None:
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise ImageDecodeError(f"{frames} frames (an animation or a multi-page file): save the "
                               "cell as a single still image")


def read_regular_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; a FIFO or device (which would
    block or never end) or a larger file (read whole, in every worker) is a defect of the input,
    refused before it is read."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode) and not path.is_dir():
        raise ImageDecodeError("not a regular file (a pipe, socket or device)")
    if info.st_size > max_bytes:
        raise ImageDecodeError(f"file of {info.st_size} bytes exceeds the limit of {max_bytes} "
                               "(data.max_file_bytes)")
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
