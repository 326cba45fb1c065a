"""Safe extraction of downloaded zip and tar archives.

Every entry is checked before anything is written: one that would land outside the target folder
(absolute path, ``..`` component, drive letter) aborts the whole extraction. Links and special
files are never created, macOS metadata (``__MACOSX/``, ``._*``, ``.DS_Store``) is dropped, and
archives nested inside the archive are unpacked in place.
"""

from __future__ import annotations

import gzip
import logging
import lzma
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipeline.io import atomic_path

logger = logging.getLogger(__name__)

NESTED_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
MAX_NESTING = 3
_CORRUPT_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    gzip.BadGzipFile,
    lzma.LZMAError,
    zlib.error,
    EOFError,
    NotImplementedError,  # an unsupported zip compression method
)
_DRIVE = re.compile(r"^[A-Za-z]:")


class ArchiveError(ValueError):
    """A file is not a readable zip or tar archive; ``str(error)`` is one line."""


class UnsafeArchiveError(ArchiveError):
    """An archive entry would be written outside the extraction folder."""


@dataclass(frozen=True)
class _Entry:
    """One archive member, independent of the archive format."""

    name: str
    kind: str  # "file", "dir" or "other" (links and special files, never extracted)
    open: Callable[[], IO[bytes]]


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a .zip (or .tar/.tar.gz/.tgz) into dest and return dest.

    The archive is unpacked into a temporary folder beside ``dest`` that replaces ``dest`` only
    on success; on any error ``dest`` is left as it was and the temporary folder is removed.
    """
    archive, dest = Path(archive), Path(dest)
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        _extract(archive, tmp, depth=0)
    return dest


def _extract(archive: Path, root: Path, depth: int) -> None:
    """Extract ``archive`` into the existing folder ``root``, then any archives nested in it."""
    try:
        if tarfile.is_tarfile(archive):  # first: a tar ending in a zip member also looks like a zip
            with tarfile.open(archive) as tar:
                _write_entries(archive, list(_tar_entries(tar)), root)
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _write_entries(archive, list(_zip_entries(archive, zf)), root)
        else:
            raise ArchiveError(f"not a zip or tar archive: {archive}")
    except _CORRUPT_ERRORS as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise ArchiveError(f"corrupt archive {archive}: {reason}") from error
    _extract_nested(root, depth)


def _zip_entries(archive: Path, zf: zipfile.ZipFile) -> Iterator[_Entry]:
    for info in zf.infolist():
        if info.flag_bits & 0x1:
            raise ArchiveError(f"encrypted entry {info.filename!r} in {archive}")
        if stat.S_ISLNK(info.external_attr >> 16):
            kind = "other"
        else:
            kind = "dir" if info.is_dir() else "file"
        yield _Entry(info.filename, kind, lambda info=info: zf.open(info))


def _tar_entries(tar: tarfile.TarFile) -> Iterator[_Entry]:
    for member in tar.getmembers():
        if member.isdir():
            kind = "dir"
        elif member.isreg():
            kind = "file"
        else:
            kind = "other"
        yield _Entry(member.name, kind, lambda member=member: tar.extractfile(member))


def _write_entries(archive: Path, entries: list[_Entry], root: Path) -> None:
    """Check every entry, then write the files and folders below ``root``."""
    parts_of = {entry.name: _safe_parts(archive, entry.name) for entry in entries}
    junk = others = 0
    for entry in entries:
        parts = parts_of[entry.name]
        if _is_macos_metadata(parts):
            junk += 1
        elif entry.kind == "other":
            others += 1
        elif parts and entry.kind == "dir":
            root.joinpath(*parts).mkdir(parents=True, exist_ok=True)
        elif parts:
            target = root.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with entry.open() as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    if junk:
        logger.warning("skipped %d macOS metadata entries (__MACOSX/, ._*, .DS_Store) in %s",
                       junk, archive)
    if others:
        logger.warning("skipped %d symlinks, hard links or special files in %s", others, archive)


def _safe_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The path components of an entry name; UnsafeArchiveError if it would escape the folder."""
    parts = tuple(part for part in re.split(r"[/\\]", name) if part not in ("", "."))
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or ".." in parts:
        raise UnsafeArchiveError(f"unsafe entry {name!r} in {archive}: it escapes the folder")
    return parts


def _is_macos_metadata(parts: tuple[str, ...]) -> bool:
    return bool(parts) and (
        "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] == ".DS_Store"
    )


def _extract_nested(root: Path, depth: int) -> None:
    """Replace every archive below ``root`` by a folder of its contents, named without suffix."""
    nested = sorted(path for path in root.rglob("*") if path.is_file() and _nested_stem(path))
    for inner in nested:
        if depth >= MAX_NESTING:
            logger.warning("not extracting %s: archives nested deeper than %d levels",
                           inner, MAX_NESTING)
            continue
        target = inner.with_name(_nested_stem(inner))
        target.mkdir(exist_ok=True)
        _extract(inner, target, depth + 1)
        inner.unlink()


def _nested_stem(path: Path) -> str:
    """The name of ``path`` without its archive suffix, or "" if it is not an archive name."""
    lower = path.name.lower()
    for suffix in NESTED_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return ""
