"""Ensembles: the (validation-weighted) average of members' temperature-calibrated probabilities.

An ensemble is described by ``ensemble.json`` (members' checkpoints and weights), which
``wbc predict`` accepts like a ``model.pt``. Evaluating it reuses the members' test
probabilities from their evaluation folders, so no member is run twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluate import EvalSet
from pipeline.io import read_json, write_json

WEIGHTINGS = ("mean", "val_f1")


def member_weights(members: list[str], weighting: str, val_f1: dict[str, float]
                   ) -> dict[str, float]:
    """Normalised weights: equal, or proportional to each member's validation macro-F1."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"ensemble.weighting must be one of {', '.join(WEIGHTINGS)}, "
                         f"not {weighting!r}")
    if not members:
        raise ValueError("ensemble.members is empty")
    raw = {m: (val_f1[m] if weighting == "val_f1" else 1.0) for m in members}
    total = sum(raw.values())
    return {m: w / total for m, w in raw.items()}


def write_spec(path: Path, members: dict[str, Path], weights: dict[str, float]) -> None:
    """Record the ensemble for ``wbc predict``: member checkpoints (relative paths) and weights."""
    write_json(path, {
        "kind": "ensemble",
        "members": [{"name": name, "checkpoint": str(checkpoint), "weight": weights[name]}
                    for name, checkpoint in members.items()],
    })


def read_spec(path: Path) -> list[dict[str, Any]]:
    """Members of an ensemble file, checkpoints resolved relative to the working directory."""
    spec = read_json(path)
    if spec.get("kind") != "ensemble":
        raise ValueError(f"{path} is not an ensemble description")
    return spec["members"]


def combine_evaluations(eval_dirs: dict[str, Path], weights: dict[str, float], data: EvalSet
                        ) -> dict[str, Any]:
    """Average members' saved probabilities on ``data`` into one scored result.

    Every member must have been evaluated on exactly these images with the same classes.
    """
    loaded = {name: np.load(folder / "probabilities.npz") for name, folder in eval_dirs.items()}
    summaries = {name: read_json(folder / "summary.json") for name, folder in eval_dirs.items()}
    classes = list(next(iter(loaded.values()))["classes"])
    for name, arrays in loaded.items():
        if list(arrays["classes"]) != classes or list(arrays["names"]) != data.names:
            raise ValueError(f"member {name} was evaluated on other images or classes; "
                             "rerun its evaluate stage")
    average = {key: sum(weights[name] * loaded[name][key] for name in loaded)
               for key in ("calibrated", "uncalibrated")}
    seconds_per_image = sum(1.0 / s["metrics"]["inference_images_per_second"]
                            for s in summaries.values())
    return {
        "name": "ensemble", "classes": classes, "data": data,
        "probabilities": average["calibrated"], "uncalibrated": average["uncalibrated"],
        "temperature": None, "images_per_second": 1.0 / seconds_per_image,
        "device": next(iter(summaries.values()))["metrics"]["device"],
        "training": {
            "members": weights,
            "parameters": sum(s["training"]["parameters"] for s in summaries.values()),
            "train_seconds": sum(s["training"]["train_seconds"] for s in summaries.values()),
        },
    }
