"""Abstention: keep a prediction only when its calibrated confidence reaches a threshold.

The risk-coverage curve gives, for every confidence threshold, the share of images kept
(coverage) and the accuracy on them. The threshold is picked on the validation split as the
lowest confidence whose kept predictions reach a target accuracy, and then reported on test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import InputError
from pipeline.figures import new_figure, plain_text, save_figure
from pipeline.io import read_json
from pipeline.onnx_runtime import OnnxClassifier
from pipeline.scoring import evaluation_of, resolve_model

REVIEW = "review"


def risk_coverage(probabilities: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """One row per distinct confidence, most confident first: threshold, coverage, accuracy."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    order = np.argsort(-confidence, kind="stable")
    kept_correct = np.cumsum(correct[order])
    kept = np.arange(1, len(order) + 1)
    # Ties share one threshold: keep the last row of each run of equal confidences.
    last = np.append(confidence[order][1:] != confidence[order][:-1], True)
    return pd.DataFrame({"threshold": confidence[order][last],
                         "coverage": kept[last] / len(order),
                         "accuracy": kept_correct[last] / kept[last]})


def pick_threshold(probabilities: np.ndarray, labels: np.ndarray, target_accuracy: float
                   ) -> float | None:
    """The lowest confidence threshold whose kept predictions reach ``target_accuracy``
    (largest coverage); None when even the single most confident prediction misses it."""
    if not 0 < target_accuracy <= 1:
        raise InputError(f"abstain target accuracy must be in (0, 1], not {target_accuracy}")
    if len(labels) == 0:
        raise InputError("no validation images to pick an abstention threshold on")
    curve = risk_coverage(probabilities, labels)
    reaching = curve[curve["accuracy"] >= target_accuracy]
    return None if reaching.empty else float(reaching["threshold"].iloc[-1])


def at_threshold(probabilities: np.ndarray, labels: np.ndarray, threshold: float | None
                 ) -> dict[str, Any]:
    """Coverage and accuracy of the predictions kept at ``threshold`` (None keeps nothing);
    the accuracy of no kept prediction is None (undefined), not NaN."""
    kept = (probabilities.max(1) >= threshold if threshold is not None
            else np.zeros(len(labels), bool))
    correct = probabilities.argmax(1) == labels
    return {"coverage": float(kept.mean()),
            "accuracy": float(correct[kept].mean()) if kept.any() else None,
            "kept": int(kept.sum()), "referred": int((~kept).sum())}


def abstention_summary(val_probabilities: np.ndarray, val_labels: np.ndarray,
                       test_probabilities: np.ndarray, test_labels: np.ndarray,
                       target_accuracy: float) -> dict[str, Any]:
    """Threshold from validation, its validation and test coverage/accuracy (for summary.json)."""
    threshold = pick_threshold(val_probabilities, val_labels, target_accuracy)
    return {"target_accuracy": target_accuracy, "threshold": threshold,
            "validation": at_threshold(val_probabilities, val_labels, threshold),
            "test": at_threshold(test_probabilities, test_labels, threshold)}


def stored_threshold(model: str | Path, eval_dir: Path | None = None,
                     missing_ok: bool = False) -> float | None:
    """The threshold that travels with a model: an ``.onnx`` export's or an ensemble file's
    own, else the one in its evaluation's ``summary.json``, found by the model's path
    (:func:`pipeline.scoring.evaluation_of`), or in ``eval_dir/<name>`` when given."""
    path = Path(model)
    if eval_dir is not None:
        name = path.parent.name if path.suffix in (".safetensors", ".json") else path.name
        summary = eval_dir / name / "summary.json"
    else:
        tree = resolve_model(model)
        if tree.path.suffix == ".onnx":
            return OnnxClassifier(tree.path).model_file.abstain_threshold
        if tree.abstain_threshold is not None:
            return tree.abstain_threshold
        name, summary = tree.path.parent.name, evaluation_of(tree.path)
    if not summary.is_file():
        if missing_ok:
            return None
        raise InputError(f"no evaluation of {name} ({summary}): its evaluate stage picks the "
                         "abstention threshold")
    return (read_json(summary).get("abstention") or {}).get("threshold")


def mark_review(rows: list[dict[str, Any]], threshold: float | None) -> list[dict[str, Any]]:
    """Add ``decision`` to prediction rows: the top-1 class, or ``review`` below ``threshold``."""
    if threshold is None:
        raise InputError("this model has no abstention threshold (none reached the target "
                         "accuracy on validation, or it was never evaluated)")
    for row in rows:
        if not row.get("error"):
            row["decision"] = row["top1"] if row["p1"] >= threshold else REVIEW
    return rows


def risk_coverage_png(curves: dict[str, pd.DataFrame], summary: dict[str, Any], title: str,
                      dest: Path) -> None:
    """Accuracy of kept predictions against coverage, per split, with the chosen operating point."""
    figure = new_figure((6.4, 4.6))
    axis = figure.subplots()
    for name, curve in curves.items():
        axis.step(curve["coverage"], curve["accuracy"], where="post", label=name)
    axis.axhline(summary["target_accuracy"], color="grey", linestyle=":",
                 label=f"target {summary['target_accuracy']:.3f}")
    test = summary["test"] if summary["threshold"] is not None else {"accuracy": None}
    if test["accuracy"] is not None:
        axis.plot([test["coverage"]], [test["accuracy"]], "o", color="red",
                  label=f"test at p >= {summary['threshold']:.3f}: "
                        f"{test['coverage']:.1%} kept, acc. {test['accuracy']:.3f}")
    axis.set(xlabel="coverage (share of images given a class)",
             ylabel="accuracy of the kept predictions", xlim=(0, 1.01), title=plain_text(title))
    low = min(float(c["accuracy"].min()) for c in curves.values())
    axis.set_ylim(max(0.0, low - 0.02), 1.005)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower left", fontsize=8)
    save_figure(figure, dest, dpi=120)
