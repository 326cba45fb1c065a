"""The README as a newcomer reads it: its 'Your own images' section followed as written, on
generated images in every layout it lists, in a fresh copy of the project; its links resolve."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from pipeline.sources import generate_dataset

sys.path.insert(0, str(Path(__file__).parent))
from project_copy import ROOT, fresh_clone  # noqa: E402

README = ROOT / "README.md"
# Added after the README's own values (later -S values win): the same stages at a size that
# trains in seconds. Nothing else differs from what a user types.
TINY = ["-S", "train.epochs=1", "-S", "train.batch_size=16", "-S", "evaluate.tta=false",
        "-S", "models.efficientnet_lite0_attention.image_size=64",
        "-S", "models.efficientnet_lite0_attention.embed_dim=32",
        "-S", "models.efficientnet_lite0_attention.heads=2",
        "-S", "evaluate.mistakes=2", "-S", "masks.gallery_per_class=2"]
MODEL = "efficientnet_lite0_attention"


def section(title: str) -> str:
    """The README's text under ``## <title>``, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def own_images_commands() -> list[list[str]]:
    """The commands of 'Your own images', one argument list per line."""
    blocks = code_blocks(section("Your own images"), "bash")
    assert len(blocks) == 1, "the section has one block of commands"
    return [shlex.split(line) for line in blocks[0].splitlines() if line.strip()]


def test_own_images_section_is_train_then_predict():
    train, predict = own_images_commands()
    assert train[:3] == ["python", "-m", "recipes"] and "data.source=/path/to/my_cells" in train
    assert predict[:2] == ["wbc", "predict"] and "/path/to/new_images" in predict


def test_own_images_section_lists_every_layout():
    layouts = code_blocks(section("Your own images"), "text")[0]
    for layout in ("my_cells/<class>/<image>", "my_cells/TRAIN/<class>/<image>",
                   "my_cells/TEST/<class>/<image>", "my_cells.zip"):
        assert layout in layouts


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    links = {link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", text)
             if not link.startswith("http")}
    assert links, "the README links its deeper topics"
    assert [link for link in sorted(links) if not (ROOT / link).exists()] == []


def test_readme_names_no_private_folder():
    assert "../shared" not in README.read_text(encoding="utf-8")


def _layouts(root: Path) -> dict[str, Path]:
    """The same kind of cells in each layout the section lists."""
    flat = root / "class" / "my_cells"
    generate_dataset(flat, images_per_class=10, seed=11, workers=1)
    split = root / "split" / "my_cells"
    generate_dataset(split / "TRAIN", images_per_class=8, seed=12, workers=1)
    generate_dataset(split / "TEST", images_per_class=3, seed=13, workers=1)
    archive = root / "zip" / "my_cells.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as zipped:
        for image in sorted(flat.rglob("*.*")):
            zipped.write(image, image.relative_to(flat.parent))
    return {"class": flat, "zip": archive, "split": split}  # the zip reuses the run cache


def _as_written(command: list[str], cells: Path, new_images: Path) -> list[str]:
    """A README line with its placeholder paths filled in, run by this interpreter."""
    filled = [part.replace("/path/to/my_cells", str(cells))
              .replace("/path/to/new_images", str(new_images)) for part in command]
    if filled[0] == "python":
        return [sys.executable, *filled[1:], *TINY]
    return [str(Path(sys.executable).with_name(filled[0])), *filled[1:]]


@pytest.mark.slow
def test_own_images_section_as_written(tmp_path):
    repo = fresh_clone(tmp_path / "clone")
    layouts = _layouts(tmp_path / "cells")
    new_images = tmp_path / "new"
    generate_dataset(new_images, images_per_class=1, seed=14, workers=1)
    train, predict = own_images_commands()
    for layout, cells in layouts.items():
        for command in (train, predict):
            run = subprocess.run(_as_written(command, cells, new_images), cwd=repo,
                                 capture_output=True, text=True)
            assert run.returncode == 0, f"{layout}: {shlex.join(command)}\n{run.stderr[-3000:]}"
        manifest = pd.read_csv(repo / "data" / "raw" / "manifest.csv")
        assert manifest["label"].nunique() == 8, layout
        if layout == "split":  # the user's own test split is kept
            assert (pd.read_csv(repo / "data" / "split" / "test.csv")["path"]
                    .str.startswith("test/").all())
        assert (repo / "data" / "eval" / MODEL / "MODEL_CARD.md").is_file(), layout
        predictions = pd.read_csv(repo / "predictions.csv")
        assert len(predictions) == 8 and predictions["error"].isna().all(), layout
        assert set(predictions["top1"]) <= set(manifest["label"])
        (repo / "predictions.csv").unlink()
