"""Abstention: risk-coverage curve, threshold picked on validation, review marks."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.abstain import (
    abstention_summary,
    at_threshold,
    mark_review,
    pick_threshold,
    risk_coverage,
    risk_coverage_png,
    stored_threshold,
)
from pipeline.io import write_json


def _two_class(confidence: list[float], correct: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.stack([confidence, 1 - np.array(confidence)], axis=1)
    labels = np.where(correct, 0, 1)
    return probabilities, labels


def test_risk_coverage_keeps_the_most_confident_first():
    probabilities, labels = _two_class([0.99, 0.95, 0.9, 0.9, 0.6], [1, 1, 0, 1, 0])
    curve = risk_coverage(probabilities, labels)
    assert list(curve["threshold"]) == [0.99, 0.95, 0.9, 0.6]  # the tie at 0.9 is one row
    assert list(curve["coverage"]) == [0.2, 0.4, 0.8, 1.0]
    assert list(curve["accuracy"]) == pytest.approx([1, 1, 0.75, 0.6])


def test_threshold_is_the_lowest_reaching_the_target():
    probabilities, labels = _two_class([0.99, 0.95, 0.9, 0.9, 0.6], [1, 1, 0, 1, 0])
    assert pick_threshold(probabilities, labels, 1.0) == 0.95
    assert pick_threshold(probabilities, labels, 0.75) == 0.9
    assert pick_threshold(probabilities, labels, 0.5) == 0.6
    none_right = _two_class([0.9, 0.8], [0, 0])
    assert pick_threshold(*none_right, 0.5) is None
    # nothing kept: the accuracy is undefined (None, valid JSON), never NaN
    assert at_threshold(*none_right, None) == {"coverage": 0.0, "accuracy": None, "kept": 0,
                                               "referred": 2}
    with pytest.raises(ValueError, match="target accuracy"):
        pick_threshold(probabilities, labels, 1.5)
    with pytest.raises(ValueError, match="no validation images"):
        pick_threshold(probabilities[:0], labels[:0], 0.9)


def test_summary_applies_the_validation_threshold_to_test(tmp_path):
    val = _two_class([0.99, 0.95, 0.9, 0.9, 0.6], [1, 1, 0, 1, 0])
    test = _two_class([0.97, 0.93, 0.5, 0.96], [1, 0, 1, 1])
    summary = abstention_summary(*val, *test, target_accuracy=1.0)
    assert summary["threshold"] == 0.95
    assert summary["test"] == {"coverage": 0.5, "accuracy": 1.0, "kept": 2, "referred": 2}
    curves = {"validation": risk_coverage(*val), "test": risk_coverage(*test)}
    risk_coverage_png(curves, summary, "demo", tmp_path / "rc.png")
    assert (tmp_path / "rc.png").stat().st_size > 10_000


def test_review_marks_and_stored_threshold(tmp_path):
    rows = [{"path": "a", "error": "", "top1": "ig", "p1": 0.97},
            {"path": "b", "error": "", "top1": "ig", "p1": 0.5},
            {"path": "c", "error": "cannot decode"}]
    marked = mark_review(rows, 0.9)
    assert [r.get("decision") for r in marked] == ["ig", "review", None]
    with pytest.raises(ValueError, match="no abstention threshold"):
        mark_review(rows, None)
    write_json(tmp_path / "eval" / "m" / "summary.json", {"abstention": {"threshold": 0.8}})
    assert stored_threshold("m", tmp_path / "eval") == 0.8
    checkpoint = tmp_path / "models" / "m" / "model.safetensors"
    assert stored_threshold(checkpoint, tmp_path / "eval") == 0.8
    with pytest.raises(ValueError, match="no evaluation of other"):
        stored_threshold("other", tmp_path / "eval")
    assert stored_threshold("other", tmp_path / "eval", missing_ok=True) is None
