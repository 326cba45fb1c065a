"""Ingest of every layout, bad files, and the offline failure of a remote source."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from pipeline.io import read_json
from pipeline.sources import ingest as ingest_module
from pipeline.sources.ingest import DataConfig, SourceError, build_raw_dataset, ingest
from pipeline.sources.layout import LayoutError


def _small_class_tree(synthetic_folder: Path, root: Path, per_class: int = 3) -> Path:
    for class_dir in sorted(synthetic_folder.iterdir())[:3]:
        target = root / class_dir.name.upper()
        target.mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(image, target / image.name)
    return root


def test_class_layout_manifest(synthetic_folder, tmp_path):
    manifest = ingest(synthetic_folder, tmp_path / "raw", {"source": "test"})
    assert len(manifest) == 80
    assert list(manifest.columns) == ingest_module.MANIFEST_COLUMNS
    assert manifest.groupby("label").size().eq(10).all()
    row = manifest.iloc[0]
    image = tmp_path / "raw" / "images" / row["path"]
    assert image.stat().st_size == row["bytes"] and (row["width"], row["height"]) == (360, 363)
    info = read_json(tmp_path / "raw" / "source.json")
    assert info["layout"] == "class" and len(info["classes"]) == 8


def test_split_layout_keeps_predefined_split_and_normalises_names(synthetic_folder, tmp_path):
    root = tmp_path / "bccd" / "images"
    _small_class_tree(synthetic_folder, root / "TRAIN")
    _small_class_tree(synthetic_folder, root / "TEST", per_class=1)
    (root / "TEST_SIMPLE").mkdir()
    manifest = ingest(tmp_path / "bccd", tmp_path / "raw", {"source": "test"})
    assert set(manifest["source_split"]) == {"train", "test"}
    assert manifest["label"].str.islower().all()
    assert manifest["path"].str.startswith(("train/", "test/")).all()


def test_zip_source_with_bad_files(synthetic_folder, tmp_path):
    tree = _small_class_tree(synthetic_folder, tmp_path / "tree")
    first_class = sorted(tree.iterdir())[0]
    good = next(first_class.iterdir()).read_bytes()
    (first_class / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (first_class / "notes.txt").write_text("not an image")
    (first_class / "empty.jpg").write_bytes(b"")
    (tree / "EMPTYCLASS").mkdir()
    archive = tmp_path / "cells.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(tree.rglob("*")):
            handle.write(path, Path("dataset") / path.relative_to(tree))
    data = DataConfig(source=str(archive), timeout_s=1, retries=0)
    manifest = build_raw_dataset(data, tmp_path / "raw", tmp_path / "cache")
    assert len(manifest) == 9
    rejected = pd.read_csv(tmp_path / "raw" / "rejected.csv")
    assert sorted(Path(f).name for f in rejected["file"]) == ["empty.jpg", "notes.txt",
                                                             "truncated.jpg"]
    assert "emptyclass" not in set(manifest["label"])


def test_no_layout_is_a_clear_error(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    with pytest.raises(LayoutError, match="no dataset layout"):
        ingest(tmp_path / "flat", tmp_path / "raw", {})
    assert not (tmp_path / "raw").exists()


def test_offline_remote_source_names_url_and_alternatives(tmp_path, monkeypatch):
    monkeypatch.setitem(ingest_module.REMOTE_SOURCES, "pbc", ingest_module.RemoteSource(
        url="http://127.0.0.1:9/pbc.zip", filename="pbc.zip"))
    data = DataConfig(source="pbc", timeout_s=1, retries=0)
    with pytest.raises(SourceError) as error:
        build_raw_dataset(data, tmp_path / "raw", tmp_path / "cache")
    message = str(error.value)
    assert "http://127.0.0.1:9/pbc.zip" in message and "synthetic" in message
    assert "\n" not in message and not (tmp_path / "raw").exists()


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="neither synthetic"):
        build_raw_dataset(DataConfig(source="nowhere/at/all"), tmp_path / "raw", tmp_path / "cache")
