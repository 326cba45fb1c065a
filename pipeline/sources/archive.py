"""Safe extraction of downloaded zip and tar archives.

Every entry is checked before anything is written: one that would land outside the target folder
(absolute path, ``..`` component, drive letter, a name unsafe once normalised) aborts the whole
extraction, and so does an archive over the entry-count or total-size limits. Entries over the
per-entry size, duplicate names and file/folder clashes are skipped with a warning. Links and
special files are never created, macOS metadata (``__MACOSX/``, ``._*``, ``.DS_Store``) is
dropped, and archives nested inside the archive are unpacked in place.
"""

from __future__ import annotations

import errno
import gzip
import logging
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipeline.errors import PipelineError
from pipeline.io import UnsafePathError, atomic_path, ensure_inside
from pipeline.sources.labels import UnsafeNameError, safe_name

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


class ArchiveError(PipelineError, ValueError):
    """A file is not a readable zip or tar archive; ``str(error)`` is one line."""


class UnsafeArchiveError(ArchiveError):
    """An archive entry would be written outside the extraction folder."""


@dataclass(frozen=True)
class _Entry:
    """One archive member, independent of the archive format."""

    name: str
    kind: str  # "file", "dir" or "other" (links and special files, never extracted)
    size: int  # as declared by the archive; enforced while writing
    open: Callable[[], IO[bytes]]


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what one extraction may write (``params.yaml: data.archive_*``)."""

    max_total_bytes: int = 16 << 30
    max_entries: int = 500_000
    max_entry_bytes: int = 256 << 20


@dataclass
class _Budget:
    """What is left of the limits, shared by an archive and the archives nested in it."""

    limits: ArchiveLimits
    bytes_left: int
    entries_left: int


def safe_extract(archive: Path, dest: Path, limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Extract a .zip (or .tar/.tar.gz/.tgz) into dest and return dest.

    The archive is unpacked into a temporary folder beside ``dest`` that replaces ``dest`` only
    on success; on any error ``dest`` is left as it was and the temporary folder is removed.
    ``limits`` bound the entry count and bytes written (declared sizes are checked first, real
    sizes while writing).
    """
    archive, dest = Path(archive), Path(dest)
    budget = _Budget(limits, limits.max_total_bytes, limits.max_entries)
    with atomic_path(dest, mark_folder=False) as tmp:  # a data set, not an output
        tmp.mkdir()
        _extract(archive, tmp, 0, budget, tmp)
    return dest


def _extract(archive: Path, root: Path, depth: int, budget: _Budget, top: Path) -> None:
    """Extract ``archive`` into the existing folder ``root`` (inside ``top``, the extraction's
    folder), then any archives nested in it."""
    try:
        if tarfile.is_tarfile(archive):  # first: a tar ending in a zip member also looks like a zip
            with tarfile.open(archive) as tar:
                _write_entries(archive, list(_tar_entries(tar)), root, budget, top)
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _write_entries(archive, list(_zip_entries(archive, zf)), root, budget, top)
        else:
            raise ArchiveError(f"not a zip or tar archive: {archive}")
    except _CORRUPT_ERRORS as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise ArchiveError(f"corrupt archive {archive}: {reason}") from error
    _extract_nested(root, depth, budget, top)


def _zip_entries(archive: Path, zf: zipfile.ZipFile) -> Iterator[_Entry]:
    for info in zf.infolist():
        if info.flag_bits & 0x1:
            raise ArchiveError(f"encrypted entry {info.filename!r} in {archive}")
        if stat.S_ISLNK(info.external_attr >> 16):
            kind = "other"
        else:
            kind = "dir" if info.is_dir() else "file"
        yield _Entry(info.filename, kind, info.file_size, lambda info=info: zf.open(info))


def _tar_entries(tar: tarfile.TarFile) -> Iterator[_Entry]:
    for member in tar.getmembers():
        if member.isdir():
            kind = "dir"
        elif member.isreg():
            kind = "file"
        else:
            kind = "other"
        yield _Entry(member.name, kind, member.size,
                     lambda member=member: tar.extractfile(member))


def _check_declared(archive: Path, entries: list[_Entry], budget: _Budget) -> None:
    """Refuse an archive whose entry count or declared total size is over the limits."""
    files = [entry for entry in entries if entry.kind == "file"]
    if len(entries) > budget.entries_left:
        raise ArchiveError(f"{archive} holds {len(entries)} entries, over the limit of "
                           f"{budget.limits.max_entries} (data.archive_max_entries)")
    declared = sum(min(entry.size, budget.limits.max_entry_bytes) for entry in files)
    if declared > budget.bytes_left:
        raise ArchiveError(f"{archive} inflates to {declared} bytes, over the limit of "
                           f"{budget.limits.max_total_bytes} (data.archive_max_total_bytes)")
    budget.entries_left -= len(entries)


def _write_entries(archive: Path, entries: list[_Entry], root: Path, budget: _Budget,
                   top: Path) -> None:
    """Check every entry, then write the files and folders below ``root`` (inside ``top``)."""
    parts_of = {entry.name: _safe_parts(archive, entry.name) for entry in entries}
    _check_declared(archive, entries, budget)
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    for entry in entries:
        parts = parts_of[entry.name]
        key = "/".join(parts).casefold()
        if _is_macos_metadata(parts):
            skipped["macOS metadata entries (__MACOSX/, ._*, .DS_Store)"] += 1
        elif entry.kind == "other":
            skipped["symlinks, hard links or special files"] += 1
        elif not parts:
            continue
        elif entry.kind == "file" and key in seen:
            logger.warning("skipped %r in %s: a second entry with the same name", entry.name,
                           archive)
            skipped["duplicate names (the first was kept)"] += 1
        else:
            seen.add(key)
            reason = _write_entry(archive, entry, _inside(root.joinpath(*parts), top), budget)
            if reason:
                logger.warning("skipped %r in %s: %s", entry.name, archive, reason)
                skipped[reason.split(" (")[0]] += 1
    for what, count in sorted(skipped.items()):
        logger.warning("skipped %d %s in %s", count, what, archive)


def _write_entry(archive: Path, entry: _Entry, target: Path, budget: _Budget) -> str:
    """Write one file or folder; the reason it was skipped, or "" when written."""
    limit = budget.limits.max_entry_bytes
    if entry.kind == "file" and entry.size > limit:
        return (f"declares {entry.size} bytes, over the limit of {limit} "
                "(data.archive_max_entry_bytes)")
    try:
        if entry.kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
            return ""
        target.parent.mkdir(parents=True, exist_ok=True)
        with entry.open() as source, open(target, "xb") as out:
            written = 0
            while chunk := source.read(1 << 20):
                written += len(chunk)
                if written > limit:
                    break
                budget.bytes_left -= len(chunk)
                if budget.bytes_left < 0:
                    raise ArchiveError(f"{archive} inflates to more than "
                                       f"{budget.limits.max_total_bytes} bytes "
                                       "(data.archive_max_total_bytes)")
                out.write(chunk)
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        return "a file and a folder of the same name (conflicting entries)"
    except OSError as error:
        if error.errno not in (errno.ENAMETOOLONG, errno.EILSEQ):
            raise
        return "a name the file system cannot hold (too long or badly encoded)"
    if written > limit:
        target.unlink()
        return f"inflates past the limit of {limit} bytes (data.archive_max_entry_bytes)"
    return ""


def _safe_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The path components of an entry name; UnsafeArchiveError if it would escape the folder
    or a component cannot be made a safe name."""
    parts = tuple(part for part in re.split(r"[/\\]", name) if part not in ("", "."))
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or ".." in parts:
        raise UnsafeArchiveError(f"unsafe entry {name!r} in {archive}: it escapes the folder")
    try:
        return tuple(safe_name(part) for part in parts)
    except UnsafeNameError as error:
        raise UnsafeArchiveError(f"unsafe entry {name!r} in {archive}: {error}") from error


def _is_macos_metadata(parts: tuple[str, ...]) -> bool:
    return bool(parts) and (
        "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] == ".DS_Store"
    )


def _inside(path: Path, top: Path) -> Path:
    """``path`` if it lies inside ``top`` (the whole extraction's folder, never a nested one)."""
    try:
        return ensure_inside(path, top)
    except UnsafePathError as error:
        raise UnsafeArchiveError(str(error)) from None


def _extract_nested(root: Path, depth: int, budget: _Budget, top: Path) -> None:
    """Replace every archive below ``root`` by a folder of its contents, named without suffix
    (a name made safe like every entry's: ``...zip`` or ``..zip`` aborts the extraction)."""
    nested = sorted(path for path in root.rglob("*")
                    if path.is_file() and not path.is_symlink() and _nested_stem(path))
    for inner in nested:
        if depth >= MAX_NESTING:
            logger.warning("not extracting %s: archives nested deeper than %d levels",
                           inner, MAX_NESTING)
            continue
        try:
            target = _inside(inner.with_name(safe_name(_nested_stem(inner))), top)
        except UnsafeNameError as error:
            raise UnsafeArchiveError(f"unsafe nested archive {inner.name!r}: {error}") from error
        if target.exists() and not target.is_dir():
            logger.warning("not extracting %s: a file named %s is beside it", inner, target.name)
            continue
        target.mkdir(exist_ok=True)
        _extract(inner, target, depth + 1, budget, top)
        inner.unlink()


def _nested_stem(path: Path) -> str:
    """The name of ``path`` without its archive suffix, or "" if it is not an archive name."""
    lower = path.name.lower()
    for suffix in NESTED_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return ""
