"""No CSV the pipeline writes holds a cell a spreadsheet would run as a formula, and every CSV
the pipeline reads back gives the names it wrote (class, file and folder names included)."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hostile import cell_image, tiny_checkpoint

from pipeline.io import csv_text, escape_cell, read_csv, read_split, unescape_cell, write_csv
from pipeline.sources.ingest import ingest
from pipeline.sources.labels import normalize_label
from pipeline.sources.layout import labelled_files

REPO = Path(__file__).resolve().parents[1]
TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")
HOSTILE = ["=HYPERLINK(\"http://x\",\"y\")", "+1+2", "-2+3", "@SUM(A1)", "\t=1", "\r=1",
           " =1+1", "'=quoted", "'", "\uff1d1+1", "plain", "", "-", "a=b"]


def cells(text: str) -> list[str]:
    """Every cell of a CSV, as a spreadsheet reads them."""
    return [cell for row in csv.reader(io.StringIO(text)) for cell in row]


def is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def assert_inert(text: str) -> None:
    """No cell but a number (``-3`` is one, and stays one) starts like a formula."""
    for cell in cells(text):
        assert is_number(cell) or not cell.lstrip(" ").startswith(TRIGGERS), cell


@given(st.text())
def test_escaping_makes_any_text_inert_and_comes_back(text):
    escaped = escape_cell(text)
    assert unescape_cell(escaped) == text
    assert not escaped.lstrip(" ").startswith(TRIGGERS)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=8)),
                          st.integers(-5, 5), st.floats(-1, 1)), min_size=1, max_size=5),
       st.sampled_from(HOSTILE))
def test_write_csv_round_trips_and_writes_no_formula(tmp_path_factory, rows, header):
    path = tmp_path_factory.mktemp("csv") / "table.csv"
    frame = pd.DataFrame(rows, columns=["name", "count", header or "x"])
    write_csv(path, frame)
    text = path.read_text(encoding="utf-8")
    assert_inert(text)
    back = read_csv(path, dtype={"name": str})
    assert list(back.columns) == list(frame.columns)
    assert back["name"].tolist() == frame["name"].tolist()
    assert back["count"].tolist() == frame["count"].tolist()  # -3 stays a number


def test_hostile_class_and_file_names_are_inert_and_read_back(tmp_path):
    root = tmp_path / "data"
    names = {"=cmd|' -C calc'!A0": "-2+3.png", "@SUM(1)": "+evil.png", "lymphocyte": "=x.png"}
    for index, (label, file) in enumerate(names.items()):
        cell_image(root / label / file, seed=index)
        cell_image(root / label / f"ok{index}.png", seed=10 + index)
    manifest = ingest(root, tmp_path / "raw", {"source": "test"}, workers=1)
    text = (tmp_path / "raw" / "manifest.csv").read_text()
    assert_inert(text)
    assert set(manifest["label"]) == {normalize_label(label) for label in names}
    assert "\n'=cmd|'_c_calc'!a0/-2+3.png," in text and "\n'@sum(1)/+evil.png," in text
    again = labelled_files(tmp_path / "raw" / "manifest.csv")
    assert sorted(c.label for c in again) == sorted(manifest["label"])
    assert all(c.source.is_file() for c in again)  # the paths came back unescaped
    split = tmp_path / "split"
    write_csv(split / "train.csv", manifest)
    assert read_split(split, "train")["path"].tolist() == manifest["path"].tolist()


def test_wbc_predict_output_is_inert_on_stdout_and_in_files(tmp_path):
    classes = ["=1+2", "@cmd", "-neg", "+pos"]
    model = tiny_checkpoint(tmp_path / "m" / "model.safetensors", classes)
    images = Path("=images")  # relative: the path cells start with it
    cell_image(tmp_path / images / "-a.png")
    cell_image(tmp_path / images / "@b.png", seed=1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for extra in ([], ["-o", str(tmp_path / "out.csv")]):
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", str(model),
                               str(images), "-k", "4", *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        text = done.stdout if not extra else (tmp_path / "out.csv").read_text()
        assert_inert(text)
        table = pd.read_csv(io.StringIO(text), keep_default_na=False, dtype=str)
        assert table["path"].tolist() == ["'=images/-a.png", "'=images/@b.png"]
        assert set(table["top1"].map(unescape_cell)) <= set(classes)
    assert read_csv(tmp_path / "out.csv")["top2"].isin(classes).all()


def test_csv_text_escapes_the_header_too():
    assert csv_text(pd.DataFrame({"=bad": ["ok"]})).splitlines()[0] == "'=bad"
