"""The comparison of every evaluated model (and the original work's figures) in one table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import plots
from pipeline.io import atomic_path, read_json, write_json

COLUMNS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced acc.",
    "macro_f1": "macro-F1",
    "weighted_f1": "weighted-F1",
    "cohen_kappa": "kappa",
    "roc_auc_ovr": "ROC-AUC",
    "ece": "ECE",
    "ece_uncalibrated": "ECE (uncal.)",
    "attention_in_cell": "attention in cell",
    "gradcam_in_cell": "Grad-CAM (HiResCAM) in cell",
    "cell_area": "cell area (chance)",
}
CHARTED = ("accuracy", "balanced_accuracy", "macro_f1")  # in summary.png, with their intervals


@dataclass(frozen=True)
class CompareConfig:
    """The comparison's settings (``params.yaml: compare``): the original work's accuracies,
    drawn as reference rows when the run's data is PBC."""

    references: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        references = dict(self.references or {})
        for name, value in references.items():
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"compare.references: {name!r} must be an accuracy in [0, 1], "
                                 f"not {value!r}")
        object.__setattr__(self, "references", references)


def collect(eval_dir: Path) -> pd.DataFrame:
    """One row per evaluation folder holding a ``summary.json``, best macro-F1 first."""
    rows = []
    for summary_file in sorted(eval_dir.glob("*/summary.json")):
        summary = read_json(summary_file)
        metrics, training = summary["metrics"], summary["training"]
        rows.append({
            "model": summary["model"],
            **{key: metrics.get(key) for key in COLUMNS},
            "images": metrics["images"],
            "parameters_m": training.get("parameters", 0) / 1e6,
            "train_minutes": training.get("train_seconds", 0.0) / 60,
            "train_images_per_s": training.get("images_per_second"),
            "inference_images_per_s": metrics["inference_images_per_second"],
            "weights": training.get("weight_source", "members: " + ", ".join(
                f"{m} {w:.2f}" for m, w in training.get("members", {}).items())),
            "fallback": ("random init" if training.get("weight_source", "").startswith(
                "random-init") else ""),
            "accuracy 95% CI": _interval(metrics, "accuracy"),
            "macro-F1 95% CI": _interval(metrics, "macro_f1"),
            **{f"{key}_ci95": _bounds(metrics, key) for key in CHARTED},
            **_external_columns(summary.get("external", {})),
        })
    if not rows:
        raise ValueError(f"no evaluation results under {eval_dir}")
    return pd.DataFrame(rows).sort_values("macro_f1", ascending=False, kind="stable")


def _bounds(metrics: dict[str, Any], name: str) -> tuple[float, float] | None:
    """A metric's bootstrap interval as numbers, None when it was not computed."""
    low, high = metrics.get(f"{name}_ci95_low"), metrics.get(f"{name}_ci95_high")
    return None if low is None or high is None else (float(low), float(high))


def _interval(metrics: dict[str, Any], name: str) -> str:
    """``[low, high]`` of a metric's bootstrap interval, blank when it was not computed."""
    bounds = _bounds(metrics, name)
    return "" if bounds is None else f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _external_columns(external: dict[str, Any]) -> dict[str, Any]:
    """Accuracy (with its interval) and balanced accuracy on each external set, by set name;
    restricted to the set's classes when it holds only some of the model's."""
    columns = {}
    for name, summary in external.items():
        metrics = summary["metrics"]
        prefix = "restricted_" if "restricted_accuracy" in metrics else ""
        label = f"{name}{' (its classes only)' if prefix else ''}"
        columns |= {f"{label} accuracy": metrics[f"{prefix}accuracy"],
                    f"{label} 95% CI": _interval(metrics, f"{prefix}accuracy"),
                    f"{label} balanced acc.": metrics[f"{prefix}balanced_accuracy"]}
    return columns


def describe_data(source: dict[str, Any] | None) -> str:
    """One line naming the data a run used, from ``data/raw/source.json``."""
    if not source:
        return "unknown data"
    name = source["source"]
    if name == "synthetic":
        name = f"synthetic (generated, seed {source.get('seed')})"
    elif "url" in source:
        name = f"{name} ({source['url']})"
    return f"{name}: {source['images']} images, {len(source['classes'])} classes"


def is_pbc(source: dict[str, Any] | None) -> bool:
    """Whether the run's data is PBC: the ``pbc`` download or a folder or archive named pbc*."""
    return bool(source) and Path(str(source["source"])).name.lower().startswith("pbc")


def _header(table: pd.DataFrame, data: str, references: dict[str, float], drawn: bool) -> str:
    fallback = list(table.loc[table["fallback"] != "", "model"])
    lines = [f"# Model comparison on {data}", ""]
    if fallback:
        lines += [f"**Trained from random initialisation (no pretrained weights were found): "
                  f"{', '.join(fallback)}.** See the fallback column.", ""]
    lines.append("Test-split metrics of every model, best macro-F1 first, with 95% bootstrap "
                 "intervals; ECE after temperature scaling, with the uncalibrated value beside "
                 "it; external sets (evaluate.external) in the last columns.")
    if references:
        named = ", ".join(f"{name} {value:g}" for name, value in references.items())
        lines.append(f"Reference rows are the original work's figures ({named})." if drawn else
                     f"The original work's figures ({named}) are not shown as rows: they were "
                     "measured on PBC and this run's data is not PBC.")
    return "\n".join(lines) + "\n\n"


def write_comparison(table: pd.DataFrame, references: dict[str, float], metrics_path: Path,
                     report_dir: Path, source: dict[str, Any] | None = None) -> None:
    """``metrics/summary.json``, ``reports/summary.md`` and ``reports/summary.png``.

    The reports name the data (``source``: the ingest's ``source.json``); the original work's
    reference figures are drawn only when that data is PBC."""
    write_json(metrics_path, {row["model"]: {k: row[k] for k in (*COLUMNS, "images")
                                             if pd.notna(row[k])}  # a model without a map
                              for row in table.to_dict("records")})
    drawn = is_pbc(source)
    data = describe_data(source)
    shown_references = references if drawn else {}
    reference_rows = pd.DataFrame([{"model": f"{name} (reference)", "accuracy": value}
                                   for name, value in shown_references.items()])
    shown = pd.concat([table.drop(columns=[f"{k}_ci95" for k in CHARTED]), reference_rows],
                      ignore_index=True).rename(columns={
        **COLUMNS, "images": "test images", "parameters_m": "params (M)",
        "train_minutes": "train (min)", "train_images_per_s": "train img/s",
        "inference_images_per_s": "infer img/s"})
    with atomic_path(report_dir) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "summary.md").write_text(
            _header(table, data, references, drawn)
            + shown.astype(object).where(shown.notna(), None).to_markdown(
                index=False, floatfmt=".4g", missingval="") + "\n",
            encoding="utf-8")
        plots.bar_chart_png(
            list(table["model"]), {COLUMNS[k]: list(table[k]) for k in CHARTED},
            f"Test metrics by model, with 95% bootstrap intervals\n{data}",
            tmp / "summary.png", shown_references,
            {COLUMNS[k]: list(table[f"{k}_ci95"]) for k in CHARTED})


def compare(eval_dir: Path, config: CompareConfig, metrics_path: Path, report_dir: Path,
            source: dict[str, Any] | None = None) -> pd.DataFrame:
    """Build and write the comparison of everything evaluated under ``eval_dir``."""
    table = collect(eval_dir)
    write_comparison(table, config.references, metrics_path, report_dir, source)
    return table
