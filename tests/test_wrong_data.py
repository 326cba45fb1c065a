"""Wrong data is never silently accepted: layouts, sources, near-blank and animated images and
files swapped behind the fingerprint's back, each built here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_hostile import CLASSES, cell_image, tiny_checkpoint

from pipeline.cli import main as wbc
from pipeline.errors import USER_ERROR_EXIT
from pipeline.fingerprint import source_fingerprint
from pipeline.io import ImageDecodeError, decode_image
from pipeline.sources.ingest import DataConfig, SourceError, build_raw_dataset, ingest
from pipeline.sources.labels import PBC_CLASSES
from pipeline.sources.layout import LayoutError, scan_layout
from pipeline.sources.synthetic import render_example


def patient_tree(root: Path, patients: dict[str, int]) -> Path:
    """``<class>/<patient>/<image>``: ``patients[class]`` patients of two images each."""
    for c, label in enumerate(CLASSES):
        for p in range(patients.get(label, 2)):
            for i in range(2):
                cell_image(root / label / f"patient{p}" / f"{i}.png", seed=100 * c + 10 * p + i)
    return root


@pytest.mark.parametrize("patients", [{}, {"monocyte": 1, "lymphocyte": 3}])
def test_class_patient_image_folders_are_read_by_class(tmp_path, patients):
    root = patient_tree(tmp_path / "data", patients)
    manifest = ingest(root, tmp_path / "raw", {}, workers=1)
    expected = {label: 4 * patients.get(label, 2) // 2 for label in CLASSES}
    assert manifest.groupby("label").size().to_dict() == expected
    assert not manifest["label"].str.startswith("patient").any()
    assert scan_layout(root)[1] == "nested"


def test_a_flat_layout_with_subfolders_is_still_flat(tmp_path):
    root = tmp_path / "data"
    for c, label in enumerate(CLASSES):
        cell_image(root / label / "a.png", seed=c)
    cell_image(root / "monocyte" / "extra" / "b.png", seed=9)
    candidates, layout = scan_layout(root)
    assert layout == "class" and sorted({c.label for c in candidates}) == CLASSES


def test_two_unnamed_levels_of_folders_are_refused(tmp_path):
    root = tmp_path / "data"
    for group, inner in (("groupA", "x"), ("groupA", "y"), ("groupB", "z")):
        cell_image(root / group / inner / "a.png")
    with pytest.raises(LayoutError, match=r"ambiguous layout under .*data: groupA, groupB each "
                                          "hold folders of images"):
        ingest(root, tmp_path / "raw", {}, workers=1)
    assert not (tmp_path / "raw").exists()


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A working folder that looks like the project: images in data/, figures/ and reports/."""
    for index, folder in enumerate(("data", "figures", "reports")):
        for i in range(3):
            cell_image(tmp_path / folder / f"{i}.png", seed=10 * index + i)
    monkeypatch.chdir(tmp_path / "data")
    return tmp_path


@pytest.mark.parametrize("source", ["", "  ", "\t", ".", "..", "./", "{project}"])
def test_an_empty_source_or_the_project_itself_is_refused(project, source):
    config = DataConfig(source=source.format(project=project))
    for run in (lambda: build_raw_dataset(config, project / "raw", project / "cache"),
                lambda: source_fingerprint(config, project / "cache")):
        with pytest.raises(SourceError, match="data.source"):
            run()
    assert not (project / "raw").exists()


# ---------------------------------------------------------------- images with nothing to see

def save(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def flat_with_one_pixel(size: int = 64) -> np.ndarray:
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[..., 0] = 200
    pixels[5, 7] = (0, 0, 255)
    return pixels


def test_near_blank_images_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    near_black = rng.integers(0, 4, (64, 64, 3), dtype=np.uint8)
    nearly_white = 250 + rng.integers(0, 3, (64, 64, 3), dtype=np.uint8)
    for name, pixels in (("one_pixel.png", flat_with_one_pixel()),
                         ("near_black.png", near_black), ("nearly_white.bmp", nearly_white)):
        with pytest.raises(ImageDecodeError, match="nearly blank image"):
            decode_image(save(tmp_path / name, pixels))


def test_animated_and_multi_page_images_are_refused(tmp_path):
    first = Image.fromarray(flat_with_one_pixel())
    second = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8))
    for name in ("anim.png", "anim.gif", "pages.tif"):
        first.save(tmp_path / name, save_all=True, append_images=[second])
        with pytest.raises(ImageDecodeError, match="2 frames"):
            decode_image(tmp_path / name)


def test_every_generated_cell_passes_the_blank_check():
    for label in PBC_CLASSES:
        for index in range(3):
            rgb, _ = render_example(label, index, seed=5)
            assert decode_image(_png_bytes(Image.fromarray(rgb))).shape == rgb.shape


def _png_bytes(image: Image.Image) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_ingest_lists_near_blank_files_as_rejected(tmp_path):
    root = tmp_path / "data"
    for c, label in enumerate(CLASSES):
        cell_image(root / label / "ok.png", seed=c)
    save(root / "monocyte" / "flat.png", flat_with_one_pixel())
    ingest(root, tmp_path / "raw", {}, workers=1)
    rejected = pd.read_csv(tmp_path / "raw" / "rejected.csv")
    assert rejected["file"].tolist() == ["monocyte/flat.png"]
    assert rejected["reason"][0].startswith("nearly blank image")


def test_adapt_on_near_black_images_is_refused(tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "m" / "model.safetensors")
    rng = np.random.default_rng(0)
    dark = _mkdir(tmp_path / "dark")
    for i in range(40):
        save(dark / f"{i}.png", rng.integers(0, 4, (64, 64, 3), dtype=np.uint8))
    code = wbc(["adapt", str(model), str(dark), "-o", str(tmp_path / "a.safetensors")])
    assert code == USER_ERROR_EXIT
    assert "readable images" in capsys.readouterr().err
    assert not (tmp_path / "a.safetensors").exists()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------- the fingerprint

def test_a_swapped_file_with_its_old_mtime_changes_the_fingerprint(tmp_path):
    root = tmp_path / "data"
    for c, label in enumerate(CLASSES):
        save(_mkdir(root / label) / "a.bmp",
             np.random.default_rng(c).integers(0, 256, (64, 64, 3), np.uint8))
    config = DataConfig(source=str(root))
    first = source_fingerprint(config, tmp_path / "cache")
    victim = root / "monocyte" / "a.bmp"
    stamp = victim.stat()
    replacement = tmp_path / "other.bmp"
    save(replacement, np.random.default_rng(99).integers(0, 256, (64, 64, 3), np.uint8))
    assert replacement.stat().st_size == stamp.st_size
    victim.write_bytes(replacement.read_bytes())
    os.utime(victim, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert victim.stat().st_mtime_ns == stamp.st_mtime_ns
    second = source_fingerprint(config, tmp_path / "cache")
    assert second["sha256"] != first["sha256"]
    assert source_fingerprint(config, tmp_path / "cache") == second  # stable while unchanged
    for damaged in ("{not json", '{"x": 1}', "[]"):  # a damaged cache is rebuilt, not a crash
        (tmp_path / "cache" / "fingerprints.json").write_text(damaged)
        assert source_fingerprint(config, tmp_path / "cache") == second
