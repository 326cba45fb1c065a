"""Every error is one line: a user's with exit code 2, anything unexpected as ``internal error``
with exit code 3; CLI numbers and devices are checked where they come in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from test_hostile import cell_image, tiny_checkpoint

from pipeline.data import Preprocess, prepare_all
from pipeline.errors import INTERNAL_ERROR_EXIT, USER_ERROR_EXIT, PipelineError, run_entry_point
from pipeline.masks import MaskParams, build_masks
from pipeline.sources.ingest import ingest

REPO = Path(__file__).resolve().parents[1]


def cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=240)


def recurse(depth: int = 0) -> int:
    return recurse(depth + 1) + 1


def onnx_failure() -> None:
    import onnxruntime

    onnxruntime.InferenceSession(b"not a model")


RAISERS = {
    "OSError": (lambda: Path("/nonexistent/x").read_bytes(), USER_ERROR_EXIT),
    "disk full": (lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")),
                  USER_ERROR_EXIT),
    "YAMLError": (lambda: yaml.safe_load("a: [b"), USER_ERROR_EXIT),
    "PipelineError with odd bytes": (lambda: (_ for _ in ()).throw(
        PipelineError("bad name caf\udce9.png\nsecond line")), USER_ERROR_EXIT),
    "cv2.error": (lambda: cv2.resize(np.zeros((0, 0), np.uint8), (0, 0)), INTERNAL_ERROR_EXIT),
    "onnxruntime": (onnx_failure, INTERNAL_ERROR_EXIT),
    "UnicodeEncodeError": (lambda: "\udce9".encode(), INTERNAL_ERROR_EXIT),
    "RecursionError": (recurse, INTERNAL_ERROR_EXIT),
    "KeyError": (lambda: {}["classes"], INTERNAL_ERROR_EXIT),
    "TypeError": (lambda: None + 1, INTERNAL_ERROR_EXIT),
}


@pytest.mark.parametrize("case", sorted(RAISERS))
def test_every_exception_is_one_line_with_its_exit_code(case, capsys, monkeypatch):
    monkeypatch.delenv("WBC_DEBUG", raising=False)
    raiser, code = RAISERS[case]
    assert run_entry_point(raiser) == code
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    prefix = "error: " if code == USER_ERROR_EXIT else "internal error: "
    assert lines[0].startswith(prefix) and "Traceback" not in lines[0]
    if code == INTERNAL_ERROR_EXIT:
        assert lines[0].endswith("(a bug: run with --debug or WBC_DEBUG=1 for the traceback, "
                                 "and report it)")
    assert run_entry_point(raiser, debug=True) == code
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["-k", "-1"], "argument -k/--top-k: -1 is out of range (1 to 1000)"),
    (["-k", "0"], "argument -k/--top-k: 0 is out of range (1 to 1000)"),
    (["-k", "three"], "argument -k/--top-k: 'three' is not a whole number"),
    (["--batch-size", "0"], "argument --batch-size: 0 is out of range (1 to 65536)"),
    (["--batch-size", "1e9"], "argument --batch-size: '1e9' is not a whole number"),
    (["--device", "bogus"], "argument --device: 'bogus' is not a device: auto, cpu, cuda, "
                            "cuda:N or mps"),
    (["--device", "cuda:99"], "argument --device: cuda:99 is not available on this machine"),
])
def test_cli_numbers_and_devices_are_checked_at_the_boundary(args, message):
    done = cli(["predict", *args, "model", "image.png"])
    assert done.returncode == USER_ERROR_EXIT
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: wbc predict: {message}"), lines


def test_file_names_print_on_a_terminal_that_cannot_show_them(tmp_path):
    model = tiny_checkpoint(tmp_path / "m" / "model.safetensors")
    cell_image(tmp_path / "caf\u00e9.png")
    done = cli(["predict", str(model), str(tmp_path / "caf\u00e9.png")],
               PYTHONIOENCODING="ascii")
    assert done.returncode == 0, done.stderr
    assert "caf\\xe9.png" in done.stdout


def test_a_setting_opencv_rejects_is_a_reason_per_image_not_an_abort(tmp_path):
    images = [cell_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    broken = Preprocess(0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # resize to 0x0: cv2.error
    reasons = prepare_all(images, broken, workers=1)
    assert len(reasons) == 3
    assert all(isinstance(r, str) and "OpenCV" in r and "\n" not in r for r in reasons)


def test_class_names_are_never_mathtext_in_the_masks_gallery(tmp_path, synthetic_folder):
    import matplotlib
    import matplotlib.pyplot as plt

    root = tmp_path / "cells"
    for name, source in (("a$^^$", "monocyte"), ("$x_{1$", "neutrophil")):
        (root / name).mkdir(parents=True)
        for image in sorted((synthetic_folder / source).iterdir())[:2]:
            (root / name / image.name).write_bytes(image.read_bytes())
    manifest = ingest(root, tmp_path / "raw", {"source": "test"}, workers=1)
    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    stats = build_masks(manifest, tmp_path / "raw" / "images", tmp_path / "masks",
                        MaskParams(), gallery_per_class=2, workers=1)
    assert set(stats["label"]) == {"a$^^$", "$x_{1$"}
    gallery = tmp_path / "masks" / "gallery.png"
    assert cv2.imread(str(gallery)).shape[0] > 100
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures
    assert isinstance(pd.read_csv(tmp_path / "masks" / "stats.csv"), pd.DataFrame)
