"""Matplotlib without global state: figures drawn on their own Agg canvas, never through pyplot.

No backend is chosen and no rcParam is set, so importing the library changes nothing in the
host's matplotlib; text that comes from data (class and model names) is escaped so that a ``$``
in it is printed, not parsed as mathtext.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(size: tuple[float, float]) -> Figure:
    """An empty figure of ``size`` inches, with its own Agg canvas (no pyplot, no backend)."""
    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure


def plain_text(text: str) -> str:
    """``text`` shown as it is: every ``$`` escaped, so none starts mathtext."""
    return str(text).replace("$", r"\$")


def model_title(name: str, training: Mapping[str, Any]) -> str:
    """A model's name as figure titles show it: marked when its training record (``weight_source``)
    says it was trained from random weights, so that no figure of it passes for a pretrained
    model's."""
    random_init = str(training.get("weight_source", "")).startswith("random-init")
    return f"{name} (random init)" if random_init else name


def save_figure(figure: Figure, path: Path, dpi: int = 110, tight: bool = True) -> None:
    """Write ``figure`` as PNG to ``path`` (its folder created), laid out tightly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        figure.tight_layout()
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
