"""safe_extract(): normal, hostile, nested and corrupt archives built on the fly."""

from __future__ import annotations

import io
import logging
import random
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline.io import OUTPUT_MARKER
from pipeline.sources.archive import ArchiveError, UnsafeArchiveError, safe_extract


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def make_tar_gz(path: Path, entries: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tree(root: Path) -> dict[str, bytes]:
    """Every file below root, by POSIX relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_extracts_files_and_folders(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "data.zip", {
        "data/": b"",
        "data/eosinophil/a.jpg": b"A",
        "data/lymphocyte/b.jpg": b"B",
        "./readme.txt": b"hi",
    })
    dest = tmp_path / "out"
    assert safe_extract(archive, dest) == dest
    assert tree(dest) == {
        "data/eosinophil/a.jpg": b"A",
        "data/lymphocyte/b.jpg": b"B",
        "readme.txt": b"hi",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.zip", "out"]


def test_replaces_an_existing_folder(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    (dest / "old").mkdir(parents=True)
    safe_extract(make_zip(tmp_path / "a.zip", {"new.txt": b"n"}), dest)
    assert tree(dest) == {"new.txt": b"n"}


@pytest.mark.parametrize("evil", ["../evil.txt", "/abs.txt", "ok/../../evil.txt",
                                  "C:/windows.txt", "..\\evil.txt"])
def test_escaping_entries_abort_the_extraction(tmp_path: Path, evil: str) -> None:
    archive = make_zip(tmp_path / "evil.zip", {"fine.txt": b"ok", evil: b"pwned"})
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="unsafe entry") as raised:
        safe_extract(archive, dest)
    assert repr(evil) in str(raised.value)
    assert "\n" not in str(raised.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["evil.zip"]


def test_failure_keeps_the_previous_folder(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    (dest / OUTPUT_MARKER).touch()  # the pipeline's own: it may be replaced, but not on failure
    with pytest.raises(UnsafeArchiveError):
        safe_extract(make_zip(tmp_path / "evil.zip", {"../evil.txt": b"x"}), dest)
    assert tree(dest) == {"old.txt": b"old", OUTPUT_MARKER: b""}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip", "out"]


def test_symlink_entries_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("link")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("real.txt", b"r")
    dest = safe_extract(archive, tmp_path / "out")
    assert tree(dest) == {"real.txt": b"r"}
    assert not (dest / "link").is_symlink()
    assert "skipped 1 symlinks" in caplog.text


def test_macos_metadata_is_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive = make_zip(tmp_path / "mac.zip", {
        "cells/a.jpg": b"A",
        "__MACOSX/cells/._a.jpg": b"meta",
        "__MACOSX/._cells": b"meta",
        "cells/._a.jpg": b"meta",
        "cells/.DS_Store": b"meta",
    })
    with caplog.at_level(logging.WARNING, logger="pipeline.sources.archive"):
        dest = safe_extract(archive, tmp_path / "out")
    assert tree(dest) == {"cells/a.jpg": b"A"}
    assert len(caplog.records) == 1
    assert "skipped 4 macOS metadata entries" in caplog.text


def test_nested_zip_is_extracted_in_place(tmp_path: Path) -> None:
    inner = make_zip(tmp_path / "inner.zip", {"basophil/c.jpg": b"C"}).read_bytes()
    middle = make_zip(tmp_path / "middle.zip", {"x.txt": b"x", "deep.zip": inner}).read_bytes()
    outer = make_zip(tmp_path / "outer.zip", {"top.txt": b"t", "parts/middle.zip": middle})
    dest = safe_extract(outer, tmp_path / "out")
    assert tree(dest) == {
        "top.txt": b"t",
        "parts/middle/x.txt": b"x",
        "parts/middle/deep/basophil/c.jpg": b"C",
    }


def test_unsafe_nested_zip_aborts_everything(tmp_path: Path) -> None:
    inner = make_zip(tmp_path / "inner.zip", {"../../escape.txt": b"x"})
    outer = make_zip(tmp_path / "outer.zip", {"ok.txt": b"ok", "inner.zip": inner.read_bytes()})
    with pytest.raises(UnsafeArchiveError, match="escape.txt"):
        safe_extract(outer, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inner.zip", "outer.zip"]


def test_nesting_is_depth_limited(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = make_zip(tmp_path / "core.zip", {"core.txt": b"c"}).read_bytes()
    for level in range(5):
        data = make_zip(tmp_path / f"l{level}.zip", {f"l{level}.zip": data}).read_bytes()
    dest = safe_extract(tmp_path / "l4.zip", tmp_path / "out")
    assert list(tree(dest)) == ["l4/l3/l2/l1.zip"]
    assert "nested deeper than 3 levels" in caplog.text


@pytest.mark.parametrize("content", [b"", b"this is not an archive\n" * 10])
def test_non_archive_raises_one_line(tmp_path: Path, content: bytes) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(content)
    with pytest.raises(ArchiveError) as raised:
        safe_extract(junk, tmp_path / "out")
    assert str(raised.value) == f"not a zip or tar archive: {junk}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.zip"]


def test_corrupt_zip_raises(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "bad.zip", {"a.txt": random.Random(0).randbytes(5000)})
    data = bytearray(archive.read_bytes())
    data[100:200] = bytes(100)  # wreck the compressed data, keep the central directory
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="corrupt archive"):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_tar_gz_is_extracted(tmp_path: Path) -> None:
    archive = make_tar_gz(tmp_path / "data.tgz", {"cells/a.jpg": b"A", "cells/b.jpg": b"B"})
    dest = safe_extract(archive, tmp_path / "out")
    assert tree(dest) == {"cells/a.jpg": b"A", "cells/b.jpg": b"B"}


def test_tar_gz_with_parent_entry_raises(tmp_path: Path) -> None:
    archive = make_tar_gz(tmp_path / "evil.tar.gz", {"ok.txt": b"ok", "../evil.txt": b"x"})
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./evil\.txt'"):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz"]


def test_tar_links_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tar:
        for name, kind in [("sym", tarfile.SYMTYPE), ("hard", tarfile.LNKTYPE),
                           ("fifo", tarfile.FIFOTYPE)]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tar.addfile(info)
        real = tarfile.TarInfo("real.txt")
        real.size = 1
        tar.addfile(real, io.BytesIO(b"r"))
    dest = safe_extract(archive, tmp_path / "out")
    assert [p.name for p in dest.iterdir()] == ["real.txt"]
    assert "skipped 3 symlinks" in caplog.text


def test_tar_ending_in_a_zip_is_read_as_tar(tmp_path: Path) -> None:
    inner = make_zip(tmp_path / "inner.zip", {"i.txt": b"i"}).read_bytes()
    archive = tmp_path / "mixed.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in [("t.txt", b"t"), ("last.zip", inner)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = safe_extract(archive, tmp_path / "out")
    assert tree(dest) == {"t.txt": b"t", "last/i.txt": b"i"}
