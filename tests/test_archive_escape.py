"""Nothing an archive holds lands outside its extraction folder, however its entries are named.

The invariant, on archives generated here (and by hypothesis): after ``safe_extract``, nothing
outside the destination is new or changed, and what is inside is plain files and folders.
"""

from __future__ import annotations

import io
import logging
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile import class_tree
from test_safe_outputs import snapshot

from pipeline.sources.archive import ArchiveError, ArchiveLimits, UnsafeArchiveError, safe_extract
from pipeline.sources.ingest import DataConfig, SourceError, build_raw_dataset


def zip_bytes(entries: list[tuple[str, str, bytes]]) -> bytes:
    """A zip of ``(name, kind, data)`` entries; kind ``file``, ``dir`` or ``link``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, kind, data in entries:
            info = zipfile.ZipInfo(name + ("/" if kind == "dir" else ""))
            if kind == "link":
                info.external_attr = 0o120777 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def tar_bytes(entries: list[tuple[str, str, bytes]]) -> bytes:
    """A tar of ``(name, kind, data)`` entries; kind ``file``, ``dir``, ``link`` or ``hard``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE,
                         "link": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE}[kind]
            if kind in ("link", "hard"):
                info.linkname = data.decode("latin-1") or "../../outside"
                data = b""
            info.size = len(data) if kind == "file" else 0
            archive.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return buffer.getvalue()


def escape_chain(levels: int, payload: bytes) -> bytes:
    """The attack as reported: ``...zip`` in ``...zip`` in ..., a planted archive at the end."""
    data = zip_bytes([("planted/eosinophil/x.png", "file", payload)])
    for _ in range(levels):
        data = zip_bytes([("...zip", "file", data), ("..zip", "file", data)])
    return data


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_nested_archives_named_dots_cannot_climb_out(tmp_path, levels):
    archive = tmp_path / "cells.zip"
    archive.write_bytes(escape_chain(levels, b"planted"))
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeArchiveError, match=r"unsafe nested archive '\.\.\.?zip'"):
        safe_extract(archive, tmp_path / "out")
    assert snapshot(tmp_path) == before


def test_an_offline_run_ingests_nothing_planted(tmp_path, monkeypatch):
    """The reported chain: a local zip planting a 'bccd' archive in the download cache."""
    cache = tmp_path / ".cache" / "downloads"
    cache.mkdir(parents=True)
    tree = class_tree(tmp_path / "tree")
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as handle:
        for path in sorted(tree.rglob("*.png")):
            handle.write(path, path.relative_to(tree).as_posix())
    data = zip_bytes([("wbc-classification-master.zip", "file", inner.getvalue()),
                      ("wbc-classification-master.zip.sha256", "file", b"0" * 64)])
    for _ in range(3):
        data = zip_bytes([("...zip", "file", data)])
    (tmp_path / "local.zip").write_bytes(data)
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeArchiveError):
        build_raw_dataset(DataConfig(source=str(tmp_path / "local.zip")), tmp_path / "raw", cache)
    assert snapshot(tmp_path) == before and list(cache.iterdir()) == []
    monkeypatch.setattr("pipeline.sources.ingest.download", _no_network)
    with pytest.raises(SourceError, match="cannot download the bccd dataset"):
        build_raw_dataset(DataConfig(source="bccd"), tmp_path / "raw", cache)


def _no_network(url: str, *args, **kwargs):
    from pipeline.sources.download import DownloadError

    raise DownloadError(f"cannot download {url}: offline")


# ---------------------------------------------------------------- property: nothing escapes

COMPONENTS = st.one_of(
    st.sampled_from(["..", ".", "...", "...zip", "..zip", ".zip", "a", "b.png", "x.tar",
                     "C:", "c:x", "\\", "a\\..\\..", "\uff0e\uff0e", "a\uff0fb", " .. ",
                     "nul\x00x", "tab\tx", "__MACOSX", "._x", "x" * 300]),
    st.text(min_size=1, max_size=12),
)
NAMES = st.builds(lambda lead, parts: lead + "/".join(parts), st.sampled_from(["", "/", "\\"]),
                  st.lists(COMPONENTS, min_size=1, max_size=4))
KINDS = st.sampled_from(["file", "file", "dir", "link", "hard"])


def archives(depth: int = 2) -> st.SearchStrategy[tuple[str, bytes]]:
    """(format, bytes) of a random zip or tar, possibly holding random archives itself."""
    leaf = st.tuples(NAMES, KINDS, st.binary(max_size=64))
    entries = st.lists(leaf, max_size=6)
    if depth:
        nested_names = st.one_of(st.sampled_from(["..", ".", "a/.."]), NAMES)  # ...zip climbed
        nested = st.tuples(nested_names.map(lambda n: n + ".zip"), st.just("file"),
                           archives(depth - 1).map(lambda a: a[1]))
        entries = st.lists(st.one_of(leaf, nested), max_size=6)
    return st.one_of(
        entries.map(lambda e: ("zip", zip_bytes([x for x in e if x[1] != "hard"]))),
        entries.map(lambda e: ("tar", tar_bytes(e))),
    )


@pytest.mark.filterwarnings("ignore:Duplicate name")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(archives())
def test_nothing_outside_the_destination_is_new(archive):
    kind, data = archive
    logging.disable(logging.WARNING)
    root = Path(tempfile.mkdtemp())
    try:
        source = root / f"input.{kind}"
        source.write_bytes(data)
        dest = root / "out"
        before = snapshot(root)
        try:
            safe_extract(source, dest, ArchiveLimits(1 << 20, 1000, 1 << 16))
        except ArchiveError:
            assert snapshot(root) == before
            return
        after = snapshot(root)
        assert {k: v for k, v in after.items() if k.split("/")[0] != "out"} == before
        for path in dest.rglob("*"):
            assert not path.is_symlink() and (path.is_file() or path.is_dir())
            assert path.resolve().is_relative_to(dest.resolve())
    finally:
        logging.disable(logging.NOTSET)
        shutil.rmtree(root)
