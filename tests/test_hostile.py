"""Hostile and odd inputs, each built on the fly: no code runs, nothing escapes, no tracebacks.

Model files, data folders, archives and images as an attacker or a careless user would make them;
every test asserts the exact outcome (error line, skip reason, files on disk, exit code).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.cli import main as wbc
from pipeline.data import Preprocess
from pipeline.errors import SIGTERM_EXIT, USER_ERROR_EXIT, run_entry_point
from pipeline.io import ImageDecodeError, decode_image, sha256_file
from pipeline.masks import MaskParams
from pipeline.metrics import classification_metrics
from pipeline.model_files import write_spec
from pipeline.models import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    ModelConfig,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.sources.archive import ArchiveError, ArchiveLimits, UnsafeArchiveError, safe_extract
from pipeline.sources.ingest import DataConfig, ImageLimits, build_raw_dataset, ingest
from pipeline.sources.labels import UnsafeNameError, safe_name

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
TINY = ModelConfig("mobilenetv2_100", image_size=48, embed_dim=32, heads=2)


# ---------------------------------------------------------------- builders

def cell_image(path: Path, seed: int = 0, size: tuple[int, int] = (64, 64)) -> Path:
    """A small, valid, non-blank RGB image."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def class_tree(root: Path, per_class: int = 2) -> Path:
    for c, label in enumerate(CLASSES):
        for i in range(per_class):
            cell_image(root / label / f"{label}_{i}.png", seed=10 * c + i)
    return root


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG whose header declares width x height greyscale pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


class WritesMarker:
    """A pickle payload that, when unpickled, creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def tiny_checkpoint(path: Path, classes: list[str] = CLASSES) -> Path:
    """An untrained but complete checkpoint of the current format."""
    torch.manual_seed(0)
    model, _ = build_model(TINY, len(classes), load_weights=False)
    prep = Preprocess(TINY.image_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({
        "format": CHECKPOINT_FORMAT, "name": path.parent.name, "state_dict": model.state_dict(),
        "classes": classes, "model_config": asdict(TINY), "preprocess": prep.to_dict(),
        "mask_params": asdict(MaskParams()), "temperature": 1.0, "summary": {}, "history": [],
    }, path)
    return path


def outside_files(tmp_path: Path, inside: Path) -> set[str]:
    return {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
            if not p.is_relative_to(inside)}


def run_wbc(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = wbc(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- 1. model files never run code

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny" / "model.safetensors")


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_pickle_payload_never_runs(tmp_path, name, capsys):
    marker = tmp_path / "marker"
    model = tmp_path / "evil" / name
    model.parent.mkdir()
    torch.save({"format": 1, "state_dict": WritesMarker(marker)}, model)
    with pytest.raises(CheckpointError, match="old pickle format"):
        load_checkpoint(model)
    cell_image(tmp_path / "cell.png")
    code, _, err = run_wbc(["predict", str(model.parent), str(tmp_path / "cell.png")], capsys)
    assert code == USER_ERROR_EXIT
    assert err.strip().splitlines() == [
        f"error: {model}: old pickle format (model.pt), which is never loaded since it can run "
        "code; retrain or convert it to model.safetensors"]
    assert not marker.exists()


def test_safetensors_whose_header_length_starts_like_a_pickle_loads(tmp_path, checkpoint):
    """A safetensors file begins with its header's length: a low byte of 0x80 is no pickle."""
    _, stored = load_checkpoint(checkpoint)
    for padding in range(256):
        model = tmp_path / f"{padding}" / "model.safetensors"
        model.parent.mkdir()
        save_checkpoint({**stored, "history": [{"note": "x" * padding}]}, model)
        if model.read_bytes()[0] == 0x80:
            break
    assert model.read_bytes()[0] == 0x80
    assert load_checkpoint(model)[1]["history"] == [{"note": "x" * padding}]


def test_plain_pickle_is_refused_too(tmp_path):
    marker = tmp_path / "marker"
    model = tmp_path / "model.safetensors"
    model.write_bytes(pickle.dumps([WritesMarker(marker)], protocol=2))
    with pytest.raises(CheckpointError, match="old pickle format"):
        load_checkpoint(model)
    assert not marker.exists()


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "not a safetensors model file of this pipeline"),
    (random.Random(0).randbytes(4096), "not a safetensors model file of this pipeline"),
    (b"\x80\x07" + bytes(64), "not a safetensors model file of this pipeline"),  # no pickle
    (b"\xff" * 8 + b"{}", "not a safetensors model file of this pipeline"),
])
def test_garbage_model_files_are_one_line_errors(tmp_path, content, reason, capsys):
    model = tmp_path / "model.safetensors"
    model.write_bytes(content)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(model)
    assert str(raised.value).startswith(f"{model}: {reason}")
    assert "\n" not in str(raised.value)
    cell_image(tmp_path / "cell.png")
    code, _, err = run_wbc(["predict", str(model), str(tmp_path / "cell.png")], capsys)
    assert code == USER_ERROR_EXIT and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {model}: ")


def test_safetensors_with_missing_keys_or_wrong_weights(tmp_path, checkpoint):
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare), metadata={"wbc_checkpoint": '{"format": 2}'})
    with pytest.raises(CheckpointError, match="missing classes, mask_params, model_config, name"):
        load_checkpoint(bare)
    wrong = tmp_path / "wrong.safetensors"
    from safetensors import safe_open
    with safe_open(str(checkpoint), framework="pt") as handle:
        metadata = handle.metadata()
    save_file({"w": torch.zeros(2)}, str(wrong), metadata=metadata)
    with pytest.raises(CheckpointError, match="weights do not fit its model config"):
        load_checkpoint(wrong)
    assert len(load_file(str(checkpoint))) > 10


def test_checkpoint_round_trip(checkpoint):
    model, loaded = load_checkpoint(checkpoint)
    assert loaded["classes"] == CLASSES and loaded["format"] == CHECKPOINT_FORMAT
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 4)


# ---------------------------------------------------------------- 2. nothing escapes ingest

@pytest.mark.parametrize("name", ["", " ", " .. ", "..", ".", "a/b", "a\\b", "a\uff0fb",
                                  "\uff0e\uff0e", "c:x", "tab\there"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(UnsafeNameError, match="unsafe name"):
        safe_name(name)


def test_safe_names_are_normalised():
    assert safe_name("  Neutrophil  ") == "Neutrophil"
    assert safe_name("caf\u0065\u0301.png") == safe_name("caf\u00e9.png") == "caf\u00e9.png"


def test_hostile_class_folders_and_files_stay_inside(tmp_path, caplog):
    root = class_tree(tmp_path / "data")
    for hostile in (" ", " .. ", "\uff0e\uff0e", "a\uff0fb", "..."):
        cell_image(root / hostile / "x.png")
    cell_image(root / "monocyte" / "back\\slash.png")
    cell_image(root / "monocyte" / "..\\..\\escape.png")
    cell_image(tmp_path / "secret" / "private.png")
    (root / "lymphocyte" / "link.png").symlink_to(tmp_path / "secret" / "private.png")
    (root / "linked_class").symlink_to(tmp_path / "secret", target_is_directory=True)
    out = tmp_path / "out" / "raw"
    before = outside_files(tmp_path, tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        manifest = ingest(root, out, {}, workers=1)
    assert outside_files(tmp_path, tmp_path / "out") == before  # nothing written elsewhere
    assert set(manifest["label"]) == set(CLASSES)  # "..." is hidden, like ".git"
    assert len(manifest) == 8
    written = [p for p in (out / "images").rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to(out.resolve()) for p in written)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "out" / "x.png").exists()
    assert "private.png" not in {p.name for p in written}
    assert "skipping class folder" in caplog.text and "it is '..' once normalised" in caplog.text
    assert f"skipping {root / 'linked_class'}: a symbolic link pointing outside" in caplog.text
    assert f"skipping {root / 'lymphocyte' / 'link.png'}: a symbolic link pointing outside" in \
        caplog.text
    assert "holds a path separator" in caplog.text


def test_names_equal_once_normalised_do_not_overwrite(tmp_path):
    root = class_tree(tmp_path / "data")
    cell_image(root / "Monocyte" / "caf\u00e9.png", seed=98)
    cell_image(root / "monocyte" / "cafe\u0301.png", seed=99)
    manifest = ingest(root, tmp_path / "raw", {}, workers=1)
    cafes = sorted(p for p in manifest["path"] if p.startswith("monocyte/caf"))
    assert cafes == ["monocyte/caf\u00e9.png", "monocyte/caf\u00e9__1.png"]
    assert manifest["sha256"].nunique() == len(manifest) == 10


@pytest.mark.parametrize("evil", ["..\\..\\evil.png", "C:\\evil.png", "c:evil.png",
                                  "ok/\uff0e\uff0e/evil.png", "ok/a\uff0fb.png", " /evil.png"])
def test_hostile_archive_entries_abort(tmp_path, evil):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("fine.txt", b"ok")
        handle.writestr(evil, b"pwned")
    with pytest.raises(UnsafeArchiveError, match="unsafe entry"):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["evil.zip"]


# ---------------------------------------------------------------- 3. decoders

def test_decompression_bomb_is_a_skip_with_the_limit(tmp_path):
    root = class_tree(tmp_path / "data")
    (root / "neutrophil" / "bomb.png").write_bytes(bomb_png())
    manifest = ingest(root, tmp_path / "raw", {}, workers=1)
    assert len(manifest) == 8
    rejected = pd.read_csv(tmp_path / "raw" / "rejected.csv")
    assert rejected.to_dict("records") == [{
        "file": "neutrophil/bomb.png",
        "reason": "20000x20000 pixels exceeds the limit of 50000000 (data.max_image_pixels)"}]


def test_pixel_limit_and_min_side_are_params(tmp_path):
    root = class_tree(tmp_path / "data")
    cell_image(root / "monocyte" / "tiny.png", size=(8, 8))
    cell_image(root / "monocyte" / "large.png", size=(100, 100))
    data = DataConfig(source=str(root), max_image_pixels=5000, min_image_side=16)
    build_raw_dataset(data, tmp_path / "raw", tmp_path / "cache")
    rejected = pd.read_csv(tmp_path / "raw" / "rejected.csv")
    assert set(rejected["reason"]) == {
        "100x100 pixels exceeds the limit of 5000 (data.max_image_pixels)",
        "image too small to hold a cell: 8x8, under 16 px a side (data.min_image_side)"}
    assert DataConfig().image_limits == ImageLimits()


def test_sixteen_bit_greyscale_is_scaled_by_its_range(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    for name, values in (("full.png", ramp), ("twelve_bit.png", ramp >> 4)):
        cv2.imwrite(str(tmp_path / name), values)
        pixels = decode_image(tmp_path / name)
        assert pixels.dtype == np.uint8 and pixels.shape == (64, 64, 3)
        assert pixels.min() == 0 and pixels.max() == 255
        assert len(np.unique(pixels)) > 50  # a ramp, not clipped to white


def test_sixteen_bit_colour_keeps_its_colours(tmp_path):
    image = np.zeros((64, 64, 3), np.uint16)
    image[:, :32, 2] = 4000  # red on the left (OpenCV writes BGR), 12 bits used
    image[:, 32:, 0] = 4000  # blue on the right
    for name in ("rgb16.png", "rgb16.tif"):
        cv2.imwrite(str(tmp_path / name), image)
        pixels = decode_image(tmp_path / name)
        assert tuple(pixels[0, 0]) == (255, 0, 0) and tuple(pixels[0, 63]) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["CMYK", "P", "1", "L", "LA", "I;16"])
def test_odd_modes_decode_to_rgb(tmp_path, mode):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8))
    image = base.convert("L").convert(mode) if mode in ("LA", "I;16", "1") else base.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    pixels = decode_image(path)
    assert pixels.shape == (40, 40, 3) and pixels.dtype == np.uint8


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:20, :, :3] = 90
    rgba[:20, :, 3] = 255  # top half opaque grey, bottom half fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pixels = decode_image(tmp_path / "a.png")
    assert tuple(pixels[0, 0]) == (90, 90, 90) and tuple(pixels[39, 0]) == (255, 255, 255)


def test_odd_files_in_a_dataset_are_skipped_with_reasons(tmp_path):
    root = class_tree(tmp_path / "data")
    good = (root / "monocyte" / "monocyte_0.png")
    cell_image(root / "monocyte" / "photo.jpg").write_bytes(
        cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 256, (64, 64, 3),
                                                               np.uint8))[1].tobytes()[:400])
    (root / "monocyte" / "zero.png").write_bytes(b"")
    (root / "monocyte" / "dir.png").mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(root / "monocyte" / "blank.png")
    (root / "monocyte" / "text.png").write_bytes(good.read_bytes()[:0] + b"hello")
    ingest(root, tmp_path / "raw", {}, workers=1)
    rejected = pd.read_csv(tmp_path / "raw" / "rejected.csv").set_index("file")["reason"]
    assert sorted(rejected.index) == ["monocyte/blank.png", "monocyte/photo.jpg",
                                      "monocyte/text.png", "monocyte/zero.png"]
    assert rejected["monocyte/blank.png"] == "blank image, every pixel is (200, 10, 10)"
    assert rejected["monocyte/photo.jpg"] == "Truncated File Read"
    assert rejected["monocyte/zero.png"] == "cannot identify image file"
    assert "0x" not in "".join(rejected)


def test_rejected_csv_is_byte_identical_across_runs(tmp_path):
    tree = class_tree(tmp_path / "tree")
    (tree / "monocyte" / "junk.png").write_bytes(b"not an image")
    (tree / "monocyte" / "bomb.png").write_bytes(bomb_png())
    archive = tmp_path / "cells.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(tree.rglob("*")):
            handle.write(path, path.relative_to(tree))
    data = DataConfig(source=str(archive))
    first = build_raw_dataset(data, tmp_path / "a", tmp_path / "cache")
    second = build_raw_dataset(data, tmp_path / "b", tmp_path / "cache")
    assert first.equals(second)
    assert ((tmp_path / "a" / "rejected.csv").read_bytes()
            == (tmp_path / "b" / "rejected.csv").read_bytes())
    assert "monocyte/junk.png" in (tmp_path / "a" / "rejected.csv").read_text()


# ---------------------------------------------------------------- 4. archives

def test_zip_bomb_entry_is_never_written_in_full(tmp_path, caplog):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("cells/big.png", b"\0" * (8 << 20))
        handle.writestr("cells/ok.png", b"ok")
    assert archive.stat().st_size < 100_000
    limits = ArchiveLimits(max_total_bytes=1 << 30, max_entries=100, max_entry_bytes=1 << 20)
    with caplog.at_level(logging.WARNING):
        safe_extract(archive, tmp_path / "out", limits)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["cells", "ok.png"]
    assert "declares 8388608 bytes, over the limit of 1048576" in caplog.text


def test_archive_over_total_or_count_limit_is_refused_before_writing(tmp_path):
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for i in range(20):
            handle.writestr(f"c/{i}.png", b"\0" * 1000)
    with pytest.raises(ArchiveError, match=r"inflates to 20000 bytes, over the limit of 10000 "
                                           r"\(data.archive_max_total_bytes\)"):
        safe_extract(archive, tmp_path / "out", ArchiveLimits(10_000, 100, 5000))
    with pytest.raises(ArchiveError, match=r"holds 20 entries, over the limit of 5"):
        safe_extract(archive, tmp_path / "out", ArchiveLimits(10**9, 5, 5000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.zip"]


def test_nested_archives_share_the_budget(tmp_path):
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("x.bin", b"\0" * 6000)
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as handle:
        handle.write(inner, "inner.zip")
        handle.writestr("y.bin", b"\0" * 3000)
    with pytest.raises(ArchiveError, match="over the limit of 8000"):
        safe_extract(outer, tmp_path / "out", ArchiveLimits(8000, 100, 10_000))
    assert not (tmp_path / "out").exists()


def test_duplicate_and_clashing_entries_are_skipped_not_overwritten(tmp_path, caplog):
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as handle, pytest.warns(UserWarning, match="Duplicate"):
        handle.writestr("c/a.png", b"first")
        handle.writestr("c/a.png", b"second")
        handle.writestr("c/A.PNG", b"third")
        handle.writestr("c/clash", b"a file")
        handle.writestr("c/clash/inner.png", b"under a file")
    with caplog.at_level(logging.WARNING):
        safe_extract(archive, tmp_path / "out")
    files = {p.relative_to(tmp_path / "out").as_posix(): p.read_bytes()
             for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert files == {"c/a.png": b"first", "c/clash": b"a file"}
    assert "a second entry with the same name" in caplog.text
    assert "a file and a folder of the same name" in caplog.text


# ---------------------------------------------------------------- 5. layouts, labels, metrics

def test_stray_folders_and_files_do_not_hide_a_dataset(tmp_path, caplog):
    root = class_tree(tmp_path / "data")
    (root / "docs").mkdir()
    (root / "docs" / "README.md").write_text("notes")
    cell_image(root / "extra" / "sub" / "x.png")
    (root / "README.txt").write_text("hi")
    with caplog.at_level(logging.WARNING):
        manifest = ingest(root, tmp_path / "raw", {}, workers=1)
    assert set(manifest["label"]) == set(CLASSES)
    assert "ignoring README.txt, docs, extra in" in caplog.text


def test_class_name_typos_are_flagged(tmp_path, caplog):
    root = class_tree(tmp_path / "data")
    (root / "neutrophil").rename(root / "neutrophills")
    with caplog.at_level(logging.WARNING):
        ingest(root, tmp_path / "raw", {}, workers=1)
    assert "class 'neutrophills'" in caplog.text and "looks like a typo of 'neutrophil'" in \
        caplog.text


def test_macro_averages_over_present_classes():
    classes = [f"c{i}" for i in range(8)]
    labels = np.repeat(np.arange(4), 5)
    headline, per_class = classification_metrics(labels, np.eye(8)[labels], classes)
    assert headline["macro_f1"] == headline["macro_recall"] == 1.0
    assert headline["absent_classes"] == "c4, c5, c6, c7" and headline["classes_scored"] == 4
    assert len(per_class) == 8 and per_class[7]["support"] == 0


# ---------------------------------------------------------------- 7. CLI and interrupts

def test_predict_skips_non_images_and_keeps_its_header(tmp_path, checkpoint, capsys, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "zero.jpg").write_bytes(b"")
    out = tmp_path / "p.csv"
    with caplog.at_level(logging.WARNING):
        code, _, err = run_wbc(["predict", str(checkpoint), str(folder), "-o", str(out),
                                "-k", "2"], capsys)
    assert code == 1  # every file failed
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["path", "error", "top1", "p1", "top2", "p2"]
    assert list(table["path"]) == [str(folder / "bomb.png"), str(folder / "zero.jpg")]
    assert "20000x20000 pixels exceeds the limit" in table["error"][0]
    assert "skipped 1 files without an image extension" in caplog.text
    cell_image(folder / "cell.png")
    code, _, _ = run_wbc(["predict", str(checkpoint), str(folder), "-o", str(out)], capsys)
    assert code == 0 and pd.read_csv(out)["top1"].notna().sum() == 1


def test_cli_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = run_wbc(["predict", str(tmp_path / "nope"), str(tmp_path)], capsys)
    assert code == USER_ERROR_EXIT
    assert err.strip().splitlines() == [
        f"error: no model at {tmp_path / 'nope'}: give a model.safetensors, an ensemble.json or "
        "the name of a folder in data/models"]
    code, _, err = run_wbc(["predict", "--debug", str(tmp_path / "nope"), str(tmp_path)], capsys)
    assert code == USER_ERROR_EXIT and "Traceback" in err


@pytest.mark.parametrize("case", ["abstain without evaluation", "unreadable onnx",
                                  "export not to onnx", "explain nothing"])
def test_every_cli_command_reports_user_errors_in_one_line(case, tmp_path, checkpoint, capsys,
                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/eval here
    cell = cell_image(tmp_path / "cell.png")
    (tmp_path / "garbage.onnx").write_bytes(b"not a graph")
    (tmp_path / "empty").mkdir()
    args, message = {
        "abstain without evaluation": (["predict", "--abstain", str(checkpoint), str(cell)],
                                       "error: no evaluation of "),
        "unreadable onnx": (["predict", str(tmp_path / "garbage.onnx"), str(cell)],
                            f"error: {tmp_path / 'garbage.onnx'} is not a readable ONNX model"),
        "export not to onnx": (["export", str(checkpoint), "-o", str(tmp_path / "m.txt")],
                               "error: the export goes to a .onnx file, not "),
        "explain nothing": (["explain", str(checkpoint), str(tmp_path / "empty"), "-o",
                             str(tmp_path / "out")], "error: no input files"),
    }[case]
    code, _, err = run_wbc(args, capsys)
    last = err.strip().splitlines()[-1]  # after any progress bar or log line
    assert code == USER_ERROR_EXIT and last.startswith(message), err
    assert "Traceback" not in err


def test_ensemble_members_are_relative_to_its_file(tmp_path, checkpoint, capsys, monkeypatch):
    spec = tmp_path / "models" / "ensemble" / "ensemble.json"
    write_spec(spec, {"a": checkpoint, "b": checkpoint}, {"a": 0.5, "b": 0.5})
    assert not Path(__import__("json").loads(spec.read_text())["members"][0]["checkpoint"]
                    ).is_absolute()
    cell_image(tmp_path / "cell.png")
    monkeypatch.chdir(tmp_path / "models")
    code, out, _ = run_wbc(["predict", str(spec), str(tmp_path / "cell.png")], capsys)
    assert code == 0 and ("eosinophil" in out or "lymphocyte" in out)


@pytest.mark.parametrize("case", ["contains itself", "negative weight", "NaN temperature",
                                  "missing member"])
def test_broken_ensemble_descriptions_are_refused_in_one_line(case, tmp_path, checkpoint, capsys):
    spec, inner = tmp_path / "ensemble.json", tmp_path / "inner.json"
    write_spec(inner, {"a": checkpoint, "outer": spec}, {"a": 0.5, "outer": 0.5})
    members, weights, temperature, message = {
        "contains itself": ({"inner": inner}, {"inner": 1.0}, 1.0,
                            f"error: {spec}: an ensemble that contains itself"),
        "negative weight": ({"a": checkpoint, "b": checkpoint}, {"a": 1.5, "b": -0.5}, 1.0,
                            f"error: {spec}: the weight of b must be a positive number, not -0.5"),
        "NaN temperature": ({"a": checkpoint}, {"a": 1.0}, float("nan"),
                            f"error: {spec}: the temperature must be a positive number, not nan"),
        "missing member": ({"a": tmp_path / "gone.safetensors"}, {"a": 1.0}, 1.0,
                           f"error: {spec}: member a has no file at "
                           f"{tmp_path / 'gone.safetensors'}"),
    }[case]
    if temperature == temperature:
        write_spec(spec, members, weights, temperature)
    else:  # the pipeline never writes NaN (invalid JSON): a hand-made file
        write_spec(spec, members, weights, 1.5)
        spec.write_text(spec.read_text().replace('"temperature": 1.5', '"temperature": NaN'))
    code, _, err = run_wbc(["predict", str(spec), str(cell_image(tmp_path / "cell.png"))],
                           capsys)
    assert code == USER_ERROR_EXIT and err.strip().splitlines() == [message], err


def test_evaluate_skips_and_counts_unreadable_images(tmp_path, checkpoint, capsys):
    data = class_tree(tmp_path / "data")
    (data / "monocyte" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    code, out, _ = run_wbc(["evaluate", str(checkpoint.parent), str(data), "-o",
                            str(tmp_path / "report")], capsys)
    assert code == 0 and "(8 images)" in out
    metrics = __import__("json").loads((tmp_path / "report" / "eval_record.json").read_text())
    assert metrics["skipped_unreadable"] == 1 and metrics["images"] == 8
    code, _, err = run_wbc(["evaluate", "--strict", str(checkpoint), str(data), "-o",
                            str(tmp_path / "strict")], capsys)
    last = err.splitlines()[-1]  # (after the progress bar's carriage returns)
    assert code == USER_ERROR_EXIT and last.startswith("error: cannot decode ")
    assert last.endswith("broken.png: cannot identify image file (evaluate.strict_images / "
                         "--strict)")


def test_entry_point_exit_codes(capsys, monkeypatch):
    from pipeline.errors import PipelineError

    def fails() -> None:
        raise PipelineError("bad input\nsecond line")

    assert run_entry_point(fails) == USER_ERROR_EXIT
    assert capsys.readouterr().err == "error: bad input\n"
    monkeypatch.setenv("WBC_DEBUG", "1")
    assert run_entry_point(fails) == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("error: bad input\n")


SLOW_INGEST = """
import sys, time
from pathlib import Path
import pipeline.sources.ingest as sources
from pipeline.errors import run_entry_point

original = sources._ingest_one

def slow(job):
    time.sleep(0.5)
    return original(job)

sources._ingest_one = slow
root, out = Path(sys.argv[1]), Path(sys.argv[2])
sys.exit(run_entry_point(sources.ingest, root, out, {}, 2))
"""


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to list worker processes")
def test_sigterm_cleans_temp_folders_and_stops_workers(tmp_path):
    root = class_tree(tmp_path / "data", per_class=20)
    script = tmp_path / "slow_ingest.py"
    script.write_text(SLOW_INGEST)
    out = tmp_path / "out" / "raw"
    process = subprocess.Popen([sys.executable, str(script), str(root), str(out)], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)},
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (list((tmp_path / "out").glob(".raw.*")) and len(_children(process.pid)) >= 2):
        assert time.monotonic() < deadline and process.poll() is None, "ingest never started"
        time.sleep(0.1)
    workers = _children(process.pid)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == SIGTERM_EXIT
    assert "error: terminated (SIGTERM)" in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []
    time.sleep(0.5)
    assert [pid for pid in workers if _alive(pid)] == []


def test_hidden_image_files_are_ingested_but_resource_forks_are_not(tmp_path, synthetic_folder):
    """PBC publishes ``neutrophil/.DS_169665.jpg``, a real image; ``._x.jpg`` is macOS metadata."""
    source = tmp_path / "cells"
    for label in ("lymphocyte", "monocyte"):
        shutil.copytree(synthetic_folder / label, source / label)
    real = next((synthetic_folder / "lymphocyte").iterdir())
    shutil.copy(real, source / "lymphocyte" / ".DS_169665.jpg")
    (source / "lymphocyte" / "._fork.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    manifest = ingest(source, tmp_path / "raw", {"source": "test"}, workers=1)
    assert "lymphocyte/.DS_169665.jpg" in set(manifest["path"])
    assert not any("_fork" in p for p in manifest["path"])
    assert len(manifest) == 21


def test_a_named_pipe_is_an_error_row_not_a_hang(tmp_path):
    """Reading a FIFO given as an image would block forever."""
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        decode_image(pipe)
    with pytest.raises(OSError, match="not a regular file"):  # hashing it would block too
        sha256_file(pipe)
