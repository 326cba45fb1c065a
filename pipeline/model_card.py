"""``MODEL_CARD.md``: what a model is for, what it was trained on, how well it does and its limits.

Rendered only from an evaluation's ``summary.json`` (the same JSON the comparison table and
``reports/summary.md`` are built from), never written by hand; ``card_facts`` gathers the extra
facts evaluate stores there (data provenance, recipe, intervals, confusions, commit).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.io import atomic_path, read_json
from pipeline.metrics_ci import bootstrap_intervals
from pipeline.model_file import training_record

PROJECT_DIR = Path(__file__).resolve().parents[1]
SAFE_GIT = ("-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null", "--no-pager",
            "--no-optional-locks")
SYNTHETIC_WARNING = ("trained on **synthetic cells** (generated images, not blood smears): its "
                     "scores say nothing about real cells")
LIMITATIONS = (
    "Trained and tested on images with **one centred white cell per image**; whole smears or "
    "fields with several cells must be segmented into such crops first.",
    "All training images share the **staining protocol and scanner** of the training data; "
    "other stains, microscopes or cameras shift colour and scale, and accuracy there is "
    "unknown until measured (see the external metrics, when present).",
    "Only the classes listed above exist for the model: any other cell (e.g. blasts, smudge "
    "cells, artefacts) is forced into one of them. Abstention lowers but does not remove this.",
    "Metrics come from a few hundred test images: read them with their 95% intervals.",
)


def git_commit(project: Path = PROJECT_DIR) -> str:
    """The project's checked-out commit (``-dirty`` with uncommitted changes), or ``unknown``.

    Git runs only in the project's own folder (that of the ``pipeline`` package), never in the
    user's working folder, whose configuration could name commands for git to run
    (``core.fsmonitor``, hooks); and even there with those, the system config and the pager off.
    """
    if not (project / ".git").exists():
        return "unknown"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | {
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}

    def git(*args: str) -> str:
        return subprocess.run(["git", *SAFE_GIT, "-C", str(project), *args], env=environment,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              check=True, timeout=60).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def top_confusions(labels: np.ndarray, predicted: np.ndarray, classes: list[str], count: int = 5
                   ) -> list[dict[str, Any]]:
    """The most frequent (true, predicted) pairs among the mistakes."""
    wrong = pd.DataFrame({"true": np.asarray(classes)[labels[labels != predicted]],
                          "predicted": np.asarray(classes)[predicted[labels != predicted]]})
    pairs = wrong.value_counts().head(count)
    return [{"true": t, "predicted": p, "images": int(n)} for (t, p), n in pairs.items()]


def _yaml(value: Any) -> str:
    """A parameter value as ``dvc exp run -S`` reads it (YAML: true, null, 0.001, text)."""
    return value if isinstance(value, str) else json.dumps(value)


def reproduce_command(name: str, recipe: dict[str, Any], source: str | None,
                      members: list[str] | None = None) -> str:
    """``dvc exp run`` setting every key of the model's recipe explicitly; for an ensemble, its
    stage with its members (whose recipes are on their own cards)."""
    sets = [f"data.source={source}"] if source else []
    if members:
        sets.append(f"ensemble.members={_yaml(members)}")
    sets += [f"models.{name}.{k}={_yaml(v)}" for k, v in recipe.get("model", {}).items()]
    sets += [f"train.{k}={_yaml(v)}" for k, v in recipe.get("train", {}).items()]
    flags = " ".join(f"-S '{s}'" for s in sets)
    return f"dvc exp run {'ensemble' if members else f'evaluate@{name}'} {flags}".strip()


def _recipe_lines(training: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    """The card's "Weights and recipe" lines: a model's, or an ensemble's members."""
    parameters = f"{training.get('parameters', 0) / 1e6:.2f} M parameters"
    if members := training.get("members"):
        return ["- ensemble of " + ", ".join(f"`{m}` (weight {w:.2f})" for m, w in
                                              members.items())
                + ": their calibrated probabilities averaged, then rescaled by a temperature of "
                "its own fitted on the validation split; each member's recipe is on its own card "
                "(`data/eval/<member>/MODEL_CARD.md`)",
                f"- {parameters} in all"]
    epochs = (f"- best epoch {training.get('best_epoch', 'n/a')} of "
              f"{training.get('epochs_run', 'n/a')}, {training.get('train_images', 'n/a')} "
              f"training images, {parameters}")
    if training.get("refit_on_val"):
        epochs += (f"; then trained again from the same start on the training and validation "
                   f"images together for those {training.get('best_epoch', 'n/a')} epochs "
                   f"(`train.refit`): these weights; the validation scores and the temperature "
                   f"are the first run's")
    return [f"- backbone `{training.get('backbone', 'n/a')}`, "
            f"{training.get('image_size', 'n/a')} px, pretrained weights: "
            f"{training.get('weight_source', 'n/a')}",
            epochs,
            f"- preprocessing: `{recipe.get('preprocess', {})}`",
            f"- training settings: `{recipe.get('train', {})}`"]


def card_facts(classes: list[str], labels: np.ndarray, predicted: np.ndarray,
               per_class: list[dict[str, Any]], recipe: dict[str, Any],
               raw_dir: Path | None, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the card needs beyond the headline metrics, to be stored in ``summary.json``: the
    training data as ingested (``raw_dir``), else as the model file records it (``recorded``)."""
    has_data = raw_dir is not None and (raw_dir / "manifest.csv").is_file()
    data = training_record(raw_dir).model_dump() if has_data else recorded or {}
    return {"classes": classes, "data": data,
            "recipe": recipe, "intervals": bootstrap_intervals(labels, predicted),
            "per_class": per_class, "confusions": top_confusions(labels, predicted, classes),
            "commit": git_commit()}


def _interval(value: float | None, bounds: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" (95% CI {bounds[0]:.3f}-{bounds[1]:.3f})" if bounds else "")


def _metrics_rows(title: str, summary: dict[str, Any]) -> list[str]:
    metrics, intervals = summary["metrics"], summary.get("card", {}).get("intervals", {})
    return [f"| {title} | {metrics['images']} | "
            + " | ".join(_interval(metrics.get(k), intervals.get(k))
                         for k in ("accuracy", "balanced_accuracy", "macro_f1"))
            + f" | {metrics.get('ece_uncalibrated', float('nan')):.3f} -> "
              f"{metrics['ece']:.3f} (T = {metrics['temperature']:.2f}) |"]


def _abstention_lines(abstention: dict[str, Any] | None) -> list[str]:
    if not abstention:
        return ["Not computed for this evaluation."]
    if abstention["threshold"] is None:
        return [f"No confidence threshold reached {abstention['target_accuracy']:.3f} accuracy "
                "on the validation split: `wbc predict --abstain` is unavailable."]
    test = abstention["test"]
    return [f"Threshold **p >= {abstention['threshold']:.4f}** (calibrated top-1 probability), "
            f"the lowest reaching {abstention['target_accuracy']:.3f} accuracy on the "
            f"validation split. On test it keeps **{test['coverage']:.1%}** of the images "
            f"({test['kept']}) at accuracy **{_accuracy(test['accuracy'])}** and refers "
            f"{test['referred']} to a person. `wbc predict --abstain` marks those `review`, "
            "wherever it runs: it finds this evaluation by the model's path, and ONNX exports "
            "and ensemble files carry the threshold. Curve: `figures/risk_coverage.png`."]


LOCALISATION_KEYS = ("attention_in_cell", "gradcam_in_cell", "cell_area")


def _adaptation_lines(adapted_on: dict[str, Any] | None) -> list[str]:
    if not adapted_on:
        return []
    return [f"- batch-norm statistics adapted (`wbc adapt`, no labels) on {adapted_on['images']} "
            f"images of `{adapted_on['folder']}`: scores are for that laboratory's images"]


def _unseen_line(title: str, summary: dict[str, Any]) -> list[str]:
    """Whether a scored set was checked against the images the model (an ensemble: each member)
    has seen; nothing for a summary written before the check existed."""
    if "unseen_check" not in summary:
        return []
    check = summary["unseen_check"]
    if check is None:
        return [f"- {title}: not checked against the images the model trained on (it, or a "
                f"member, records none)"]
    near = check.get("near_duplicates")
    if "members" in check:
        seen = (f"any of its {check['members']} members trained or validated on (up to "
                f"{check['images_seen']} each)")
        near_text = "" if near is None else f"; near-duplicates of a member's, at most: {near}"
    else:
        seen = f"the {check['images_seen']} the model trained or validated on"
        near_text = "" if near is None else f"; near-duplicates of them: {near}"
    bits = "" if near is None else f" (pHash within {check['near_duplicate_bits']} bits)"
    return [f"- {title}: none of its files is among {seen}{near_text}{bits}"]


def _unseen_lines(summary: dict[str, Any]) -> list[str]:
    """The checks of the test set and of every external set, then a blank line."""
    lines = _unseen_line(summary.get("data_name", "test"), summary) + [
        line for set_name, external in summary.get("external", {}).items()
        for line in _unseen_line(f"external: {set_name}", external)]
    return [*lines, ""] if lines else []


def render_card(summary: dict[str, Any]) -> str:
    """The model card's Markdown, from ``summary.json`` (its external sets' rows included)."""
    card, training, name = summary.get("card", {}), summary["training"], summary["model"]
    data, scored_on = card.get("data", {}), summary.get("data_name", "test")
    recipe = card.get("recipe", {})
    lines = [f"# Model card: {name}", "",
             "## Intended use",
             "Research on automated white-blood-cell classification of peripheral-blood smear "
             "crops. **Not a diagnostic device**: not validated for clinical use; every result "
             "must be reviewed by a qualified person.", "",
             "## Classes", ", ".join(f"`{c}`" for c in card.get("classes", [])), "",
             "## Training data",
             *([f"- **Warning**: {SYNTHETIC_WARNING}"] if data.get("synthetic") else []),
             f"- source: `{data.get('source', 'unknown')}` ({data.get('images', '?')} images)",
             "- images per class: " + ", ".join(f"{k} {v}" for k, v in
                                                data.get("per_class", {}).items()),
             f"- fingerprint (sha256 of the manifest): `{data.get('fingerprint', 'unknown')}`", "",
             "## Weights and recipe", *_recipe_lines(training, recipe),
             *_adaptation_lines(summary.get("adapted_on")), "",
             "## Performance",
             "| data | images | accuracy | balanced accuracy | macro-F1 | ECE before -> after "
             "calibration |", "|---|---|---|---|---|---|",
             *_metrics_rows(scored_on, summary),
             *[row for set_name, external in summary.get("external", {}).items()
               for row in _metrics_rows(f"external: {set_name}", external)], "",
             *_unseen_lines(summary),
             f"Per-class recall ({scored_on}): " + ", ".join(
                 f"{r['class']} {r['recall']:.3f}" for r in card.get("per_class", [])), "",
             f"Most common confusions ({scored_on}): " + (", ".join(
                 f"{c['true']} -> {c['predicted']} ({c['images']})"
                 for c in card.get("confusions", [])) or "none"), ""]
    localisation = {k: summary["metrics"][k] for k in LOCALISATION_KEYS
                    if summary["metrics"].get(k) is not None}
    if localisation:
        lines += ["## Localisation (share of the map inside the cell mask; cell_area is chance)",
                  *[f"- {k}: {v:.3f}" for k, v in localisation.items()], ""]
    lines += ["## Abstention", *_abstention_lines(summary.get("abstention")), "",
              "## Known limitations", *[f"- {item}" for item in LIMITATIONS], "",
              "## How to reproduce", f"At commit `{card.get('commit', 'unknown')}`:", "",
              "```", reproduce_command(name, recipe, data.get("source"),
                                       list(training.get("members", {})) or None),
              "```", "",
              "_Generated by `pipeline/model_card.py` from `summary.json`; do not edit._", ""]
    return "\n".join(lines)


def write_model_card(summary_path: Path, dest: Path) -> None:
    """Render ``MODEL_CARD.md`` from a ``summary.json``."""
    with atomic_path(dest) as tmp:
        tmp.write_text(render_card(read_json(summary_path)), encoding="utf-8")


def _accuracy(value: float | None) -> str:
    """An accuracy to four places; "undefined" where no image was kept."""
    return "undefined (no image kept)" if value is None else f"{value:.4f}"
