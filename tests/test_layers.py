"""The package's layers hold (issue 41): import-linter checks .importlinter's layers contract, so
that a new import circle fails the tests; and figures are drawn without global matplotlib state,
with names from the data printed as they are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import abstain, plots
from pipeline.explain import explain_png

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"


def _lint(config: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` (import-linter's command) with ``config``, run in the project."""
    command = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(command), "--config", str(config), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_layers_contract_is_kept():
    done = _lint(CONFIG)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_the_checker_fails_a_broken_contract(tmp_path):
    """The same contract with its layers upside down is broken: the check can fail."""
    text = CONFIG.read_text()
    head, layers = text.split("layers =\n")
    reversed_config = tmp_path / "reversed.ini"
    reversed_config.write_text(head + "layers =\n" + "\n".join(
        reversed(layers.strip("\n").splitlines())) + "\n")
    done = _lint(reversed_config)
    assert done.returncode != 0 and "0 kept, 1 broken" in done.stdout, done.stdout[-3000:]
    assert "pipeline.cli is not allowed to import pipeline.errors" in done.stdout


def test_the_library_leaves_matplotlib_alone(tmp_path):
    """Importing the library and drawing a figure choose no backend, set no rcParam and leave no
    pyplot figure (which a third-party import, pytorch_grad_cam, may load): in a fresh
    interpreter."""
    probe = ("import sys, matplotlib, numpy as np\n"
             "before = dict.copy(matplotlib.rcParams)\n"
             "import pipeline.plots, pipeline.explain, pipeline.abstain, pipeline.evaluate\n"
             "assert dict.copy(matplotlib.rcParams) == before, 'import'\n"
             "pipeline.plots.confusion_matrix_png(np.array([0, 1]), np.array([1, 1]), ['a', 'b'],"
             f" 't', __import__('pathlib').Path({str(tmp_path / 'cm.png')!r}))\n"
             "assert dict.copy(matplotlib.rcParams) == before, 'draw'\n"
             "plt = sys.modules.get('matplotlib.pyplot')\n"
             "assert plt is None or plt.get_fignums() == [], 'pyplot figure'\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "cm.png").stat().st_size > 1000


def test_names_with_dollars_are_drawn_as_text(tmp_path):
    """A class folder named ``a$^^$`` was parsed as mathtext and broke every figure."""
    classes = ["a$^^$", "b$", "$x_{"]
    labels, predicted = np.array([0, 1, 2, 0]), np.array([0, 2, 2, 1])
    plots.confusion_matrix_png(labels, predicted, classes, "model $^$", tmp_path / "cm.png")
    roc = pd.DataFrame({"class": classes[0], "fpr": [0, 1], "tpr": [0, 1]})
    pr = pd.DataFrame({"class": classes[0], "recall": [1, 0], "precision": [0.5, 1]})
    plots.curves_png(roc, pr, classes, "t$", tmp_path / "curves.png")
    plots.image_grid_png([np.zeros((8, 8, 3), np.uint8)], ["true a$^^$"], "$^", tmp_path / "g.png")
    plots.bar_chart_png(["a$^^$"], {"acc$": [0.5]}, "$", tmp_path / "bars.png")
    curve = pd.DataFrame({"threshold": [0.9], "coverage": [1.0], "accuracy": [1.0]})
    abstain.risk_coverage_png({"test": curve}, {"target_accuracy": 0.9, "threshold": None},
                              "a$^^$", tmp_path / "rc.png")
    images = np.zeros((1, 16, 16, 3), np.uint8)
    maps = np.ones((1, 4, 4))
    explain_png(images, np.ones((1, 16, 16), bool), maps, np.ones((1, 16, 16)), ["pred a$^^$"],
                [False], "a$^^$", tmp_path / "explain.png")
    for name in ("cm", "curves", "g", "bars", "rc", "explain"):
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.size[0] > 100
