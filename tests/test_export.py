"""ONNX export: parity with PyTorch, metadata, quantisation, and scoring/prediction of .onnx."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline import export
from pipeline.cli import main as wbc
from pipeline.evaluate import EvaluateConfig, held_out_set, score_checkpoint
from pipeline.io import write_json
from pipeline.masks import MaskParams
from pipeline.model_files import write_spec
from pipeline.models import ModelConfig, load_checkpoint
from pipeline.onnx_runtime import OnnxClassifier
from pipeline.predict import predict
from pipeline.train import TrainConfig, train_model

SETTINGS = EvaluateConfig(batch_size=16, tta=False, ignore_unknown_classes=False)


@pytest.fixture(scope="module")
def data_dir(prepared, tmp_path_factory) -> Path:
    """A data/ folder (links to the prepared data) with one tiny trained model and its eval."""
    root = tmp_path_factory.mktemp("export") / "data"
    root.mkdir()
    for part in ("raw", "masks", "split"):
        (root / part).symlink_to(prepared / part)
    train_model("tiny", ModelConfig("mobilenetv2_100", 48, embed_dim=32, heads=2),
                TrainConfig(epochs=1, batch_size=16, lr=1e-3, mask_mode="crop", patience=5,
                            ema_decay=0.0, backbone_lr_scale=0.1, mask_margin=0.25), MaskParams(),
                root / "split", root / "raw" / "images", root / "masks", root / "models" / "tiny",
                root / "train.json", root / "live")
    write_json(root / "eval" / "tiny" / "summary.json", {"abstention": {"threshold": 0.2}})
    return root


@pytest.fixture(scope="module")
def exported(data_dir) -> tuple[Path, export.ExportReport]:
    dest = data_dir.parent / "tiny.onnx"
    return dest, export.export_model("tiny", dest, data_dir=data_dir)


def test_export_carries_metadata_and_matches_pytorch(exported, data_dir):
    dest, report = exported
    assert report.top1_mismatches == 0 and report.max_probability_diff <= export.PROB_TOLERANCE
    assert report.images == len(held_out_set(data_dir / "split", data_dir / "raw" / "images",
                                             data_dir / "masks").paths)
    props = {p.key: p.value for p in onnx.load(str(dest)).metadata_props}
    assert props["image_size"] == "48" and props["mask_mode"] == "crop"
    assert props["classes"].split(",")[0] == "basophil" and props["abstain_threshold"] == "0.2"
    metadata = OnnxClassifier(dest).metadata
    assert metadata["abstain_threshold"] == 0.2 and len(metadata["classes"]) == 8
    checkpoint = load_checkpoint(data_dir / "models" / "tiny" / "model.safetensors")[1]
    assert metadata["trained_on"] == checkpoint["trained_on"]  # the export is checked alike


def test_onnx_scores_and_predicts_like_the_checkpoint(exported, data_dir, synthetic_folder):
    dest, _ = exported
    checkpoint = data_dir / "models" / "tiny" / "model.safetensors"
    data = held_out_set(data_dir / "split", data_dir / "raw" / "images", data_dir / "masks")
    by_torch = score_checkpoint(checkpoint, data, SETTINGS)
    by_onnx = score_checkpoint(dest, data, SETTINGS)
    assert by_onnx.attention is None
    np.testing.assert_allclose(by_onnx.probabilities, by_torch.probabilities, atol=1e-3)
    with_tta = replace(SETTINGS, tta=True)
    tta = score_checkpoint(dest, data, with_tta)
    np.testing.assert_allclose(tta.probabilities,
                               score_checkpoint(checkpoint, data, with_tta).probabilities,
                               atol=1e-3)
    folder = synthetic_folder / "monocyte"
    rows_torch, rows_onnx = predict(checkpoint, [folder]), predict(dest, [folder])
    assert [r["top1"] for r in rows_onnx] == [r["top1"] for r in rows_torch]
    assert np.allclose([r["p1"] for r in rows_onnx], [r["p1"] for r in rows_torch], atol=1e-3)


def test_ensemble_of_ensembles_exports_what_predict_serves(data_dir, synthetic_folder, tmp_path):
    checkpoint = data_dir / "models" / "tiny" / "model.safetensors"
    inner, outer = tmp_path / "fold" / "ensemble.json", tmp_path / "ensemble.json"
    write_spec(inner, {"a": checkpoint, "b": checkpoint}, {"a": 0.5, "b": 0.5}, temperature=0.1)
    write_spec(outer, {"fold": inner, "single": checkpoint}, {"fold": 0.5, "single": 0.5},
               temperature=0.5)
    report = export.export_model(outer, tmp_path / "nested.onnx", data_dir=data_dir)
    assert report.top1_mismatches == 0
    assert OnnxClassifier(tmp_path / "nested.onnx").metadata["temperature"] == 0.5
    folder = synthetic_folder / "monocyte"
    served, exported = predict(outer, [folder]), predict(tmp_path / "nested.onnx", [folder])
    single = predict(checkpoint, [folder])
    assert [r["top1"] for r in exported] == [r["top1"] for r in served]
    assert np.allclose([r["p1"] for r in exported], [r["p1"] for r in served], atol=1e-3)
    assert not np.allclose([r["p1"] for r in served], [r["p1"] for r in single], atol=1e-2)
    solo = tmp_path / "solo.json"  # one member: its own temperature, then the ensemble's
    write_spec(solo, {"a": checkpoint}, {"a": 1.0}, temperature=0.5)
    export.export_model(solo, tmp_path / "solo.onnx", data_dir=data_dir)
    served, exported = predict(solo, [folder]), predict(tmp_path / "solo.onnx", [folder])
    assert np.allclose([r["p1"] for r in exported], [r["p1"] for r in served], atol=1e-3)


def test_predict_abstain_uses_the_exported_threshold(exported, synthetic_folder, tmp_path):
    dest, _ = exported
    out = tmp_path / "out.csv"
    assert wbc(["predict", str(dest), str(synthetic_folder / "monocyte"), "-o", str(out),
                "--abstain"]) == 0
    import pandas as pd

    table = pd.read_csv(out)
    expected = np.where(table["p1"] >= 0.2, table["top1"], "review")
    assert (table["decision"] == expected).all()


def test_quantized_export_reports_accuracy_change(data_dir, tmp_path):
    report = export.export_model("tiny", tmp_path / "q.onnx", quantize=True, data_dir=data_dir)
    assert report.quantized_top1_agreement is not None
    assert report.accuracy_torch is not None and report.accuracy_quantized is not None
    assert "int8" in report.lines()[1]
    assert OnnxClassifier(tmp_path / "q.onnx").metadata["quantized"] == "int8-static-qdq"


def test_failed_parity_writes_nothing(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "PROB_TOLERANCE", -1.0)
    dest = tmp_path / "bad.onnx"
    with pytest.raises(export.ParityError, match="differs from PyTorch"):
        export.export_model("tiny", dest, data_dir=data_dir)
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_check_parity_flags_a_top1_change():
    reference = np.array([[0.6, 0.4], [0.2, 0.8]])
    assert export.check_parity(reference, reference + 1e-5)[1] == 0
    with pytest.raises(export.ParityError, match="1 top-1 mismatches"):
        export.check_parity(reference, np.array([[0.4995, 0.5005], [0.2, 0.8]]))


def test_bad_inputs_give_one_line_errors(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(data_dir.parent)
    assert wbc(["export", "nowhere", "-o", str(tmp_path / "m.onnx")]) == 2
    assert "no model at nowhere" in capsys.readouterr().err
    assert wbc(["export", str(data_dir / "models" / "tiny" / "model.safetensors"), "-o",
                str(tmp_path / "m.txt")]) == 2
    assert ".onnx file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    shutil.copytree(data_dir / "models", empty / "models")
    with pytest.raises(ValueError, match="split and masks stages"):
        export.export_model("tiny", tmp_path / "m.onnx", data_dir=empty)
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        OnnxClassifier(fake)
