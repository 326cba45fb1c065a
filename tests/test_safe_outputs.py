"""Outputs never destroy anything: every kind of thing an output could land on, built here.

An output replaces only a regular file, or a folder the pipeline made (``.wbc-output``) or that
holds no file; it never is, holds or lies in an input of the run; and ``wbc`` checks it before
any work: one line, exit code 2, every file as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_hostile import cell_image, class_tree, tiny_checkpoint

from pipeline.cli import main as wbc
from pipeline.errors import USER_ERROR_EXIT
from pipeline.io import OUTPUT_MARKER, UnsafeOutputError, atomic_path, check_output
from pipeline.masks import MaskParams, build_masks
from pipeline.sources.ingest import ingest

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, tuple[str, bytes | str]]:
    """Every path below ``root`` (links not followed): its kind and content."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[key] = ("link", os.readlink(path))
        elif path.is_fifo():
            found[key] = ("fifo", "")
        elif path.is_dir():
            found[key] = ("dir", "")
        else:
            found[key] = ("file", path.read_bytes())
    return found


def cli(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The real ``wbc`` command in a fresh process (bounded by a timeout)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


# ---------------------------------------------------------------- atomic_path itself

def make(kind: str, dest: Path) -> None:
    """Put a ``kind`` of thing at ``dest``."""
    target = dest.parent / "target"
    if kind == "file":
        dest.write_text("old")
    elif kind == "marked folder":
        (dest / "sub").mkdir(parents=True)
        (dest / "sub" / "old.txt").write_text("old")
        (dest / OUTPUT_MARKER).touch()
    elif kind == "empty folders":
        (dest / "a" / "b").mkdir(parents=True)
    elif kind == "folder of files":
        (dest / "sub").mkdir(parents=True)
        (dest / "sub" / "precious.jpg").write_text("data")
    elif kind == "folder with a link":
        dest.mkdir()
        (dest / "link").symlink_to(target)
    elif kind == "link to a file":
        target.write_text("data")
        dest.symlink_to(target)
    elif kind == "link to a folder":
        (target / "x").mkdir(parents=True)
        dest.symlink_to(target, target_is_directory=True)
    elif kind == "fifo":
        os.mkfifo(dest)
    elif kind == "below a file":
        dest.parent.mkdir(exist_ok=True)


REPLACEABLE = ["absent", "file", "marked folder", "empty folders"]
REFUSED = ["folder of files", "folder with a link", "link to a file", "link to a folder", "fifo"]


@pytest.mark.parametrize("output", ["file", "folder"])
@pytest.mark.parametrize("kind", REPLACEABLE + REFUSED)
def test_atomic_path_replaces_only_what_loses_nothing(tmp_path, kind, output):
    dest = tmp_path / "out"
    make(kind, dest)
    before = snapshot(tmp_path)
    ran = []

    def write() -> None:
        with atomic_path(dest) as tmp:
            ran.append(True)
            if output == "file":
                tmp.write_text("new")
            else:
                (tmp / "result.txt").parent.mkdir()
                (tmp / "result.txt").write_text("new")

    if kind in REFUSED:
        with pytest.raises(UnsafeOutputError, match=f"refusing to replace {dest}"):
            write()
        assert ran == [] and snapshot(tmp_path) == before  # refused before the work
        return
    write()
    if output == "file":
        assert dest.read_text() == "new"
    else:
        assert sorted(p.name for p in dest.iterdir()) == [OUTPUT_MARKER, "result.txt"]
    assert {p.name for p in tmp_path.iterdir()} <= {"out", "target"}  # no temporary left


def test_an_output_below_a_file_is_refused_before_the_work(tmp_path):
    cell = cell_image(tmp_path / "cell.png")
    with (pytest.raises(UnsafeOutputError, match=f"{cell} is a file, not a folder"),
          atomic_path(cell / "out.csv")):
        pytest.fail("the block must not run")
    with pytest.raises(UnsafeOutputError, match="is a file, not a folder"):
        check_output(cell / "deeper" / "out.csv", [])


@pytest.mark.parametrize("relation", ["is", "lies inside", "holds"])
def test_check_output_refuses_an_output_related_to_an_input(tmp_path, relation):
    inputs = class_tree(tmp_path / "in")
    for folder in (inputs, tmp_path):  # outputs of earlier runs, which may be replaced: not
        (folder / OUTPUT_MARKER).touch()  # while they are this run's input
    dest = {"is": inputs, "lies inside": inputs / "monocyte" / "x.csv",
            "holds": tmp_path}[relation]
    (tmp_path / "alias").symlink_to(inputs, target_is_directory=True)
    with pytest.raises(UnsafeOutputError, match=f"it {relation} the input"):
        check_output(dest, [tmp_path / "alias"], folder=dest.is_dir())


def test_a_hard_link_to_an_input_is_that_input(tmp_path):
    cell = cell_image(tmp_path / "cell.png")
    os.link(cell, tmp_path / "copy.csv")
    with pytest.raises(UnsafeOutputError, match="it is the input"):
        check_output(tmp_path / "copy.csv", [cell])


def test_stage_folders_are_marked_and_rerun_over_themselves(tmp_path, synthetic_folder):
    """What a stage rerun over its previous output (outside DVC, which deletes it first) does."""
    raw, masks = tmp_path / "raw", tmp_path / "masks"
    for _ in range(2):
        manifest = ingest(synthetic_folder, raw, {"source": "test"}, workers=1, per_class=2)
        build_masks(manifest, raw / "images", masks, MaskParams(), gallery_per_class=1,
                    workers=1)
    assert (raw / OUTPUT_MARKER).is_file() and (masks / OUTPUT_MARKER).is_file()
    assert len(list((masks / "eosinophil").iterdir())) == 2


# ---------------------------------------------------------------- wbc, every command

@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    model = tiny_checkpoint(root / "models" / "tiny" / "model.safetensors")
    images = class_tree(root / "images")
    results = root / "results"
    results.mkdir()
    (results / "mine.txt").write_text("a user's file")
    os.mkfifo(root / "device")  # stands in for a device node: not a regular file
    (root / "folder.onnx").mkdir()
    (root / "folder.onnx" / "keep.txt").write_text("keep")
    return {"root": root, "model": model, "images": images, "results": results}


CASES = {
    "predict onto its input folder": (["predict", "{model}", "{images}", "-o", "{images}"],
                                      "refusing to replace"),
    "predict onto a folder of files": (["predict", "{model}", "{images}", "-o", "{results}"],
                                       "a folder the pipeline did not make"),
    "predict onto an input image": (["predict", "{model}", "{images}/monocyte/monocyte_0.png",
                                     "-o", "{images}/monocyte/monocyte_0.png"],
                                    "it is the input"),
    "predict onto the model": (["predict", "{model}", "{images}", "-o", "{model}"],
                               "it is the input"),
    "predict onto a device": (["predict", "{model}", "{images}", "-o", "{root}/device"],
                              "not a regular file"),
    "predict below a file": (["predict", "{model}", "{images}", "-o",
                              "{images}/monocyte/monocyte_0.png/out.csv"],
                             "is a file, not a folder"),
    "adapt onto the image folder": (["adapt", "{model}", "{images}", "-o", "{images}"],
                                    "refusing to replace"),
    "export onto a folder": (["export", "{model}", "-o", "{root}/folder.onnx"],
                             "a folder the pipeline did not make"),
    "explain into its input": (["explain", "{model}", "{images}", "-o", "{images}/x"],
                               "lies inside the input"),
    "evaluate into a folder of files": (["evaluate", "{model}", "{images}", "-o", "{results}"],
                                        "a folder the pipeline did not make"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_wbc_refuses_a_destroying_output_before_any_work(setup, case):
    args, message = CASES[case]
    before = snapshot(setup["root"])
    done = cli([arg.format(**setup) for arg in args])
    assert done.returncode == USER_ERROR_EXIT, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert snapshot(setup["root"]) == before


def test_evaluate_into_the_project_folder_keeps_its_figures(setup, tmp_path):
    project = tmp_path / "project"
    figure = cell_image(project / "figures" / "transfer.png")
    before = snapshot(project)
    done = cli(["evaluate", str(setup["model"]), str(setup["images"]), "-o", "."], cwd=project)
    assert done.returncode == USER_ERROR_EXIT
    assert done.stderr.strip().splitlines() == [
        "error: refusing to replace .: a folder the pipeline did not make (no .wbc-output in "
        "it); choose a new or empty folder"]
    assert snapshot(project) == before and figure.is_file()


def test_wbc_writes_and_rewrites_its_own_outputs(setup, tmp_path):
    model, images = str(setup["model"]), str(setup["images"])
    out, report = tmp_path / "p.csv", tmp_path / "report"
    for _ in range(2):  # the second run replaces the first one's file and writes into its folder
        assert wbc(["predict", model, images, "-o", str(out)]) == 0
        assert wbc(["evaluate", model, images, "-o", str(report)]) == 0
    assert (report / OUTPUT_MARKER).is_file() and (report / "figures" / OUTPUT_MARKER).is_file()
    assert len(out.read_text().splitlines()) == 9
    (tmp_path / "empty").mkdir()
    assert wbc(["explain", model, str(tmp_path / "empty"), "-o", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()  # a failed command leaves no empty output folder
