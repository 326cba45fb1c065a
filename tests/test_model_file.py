"""One typed model file (issue 41 section 3): what a model carries, read and written in one place,
and what the commands take from it wherever they run."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pandas as pd
import pytest
from model_files_kit import CLASSES, cell_image, class_tree, tiny_checkpoint, valid_metadata

from pipeline.cli import main as wbc
from pipeline.data import Preprocess
from pipeline.errors import USER_ERROR_EXIT
from pipeline.io import atomic_path, write_json
from pipeline.model_file import ModelFile, TrainingData, read_model_file, write_model_file
from pipeline.models import ModelConfig, load_model_file
from pipeline.scoring import evaluation_of

PBC = {"source": "pbc", "synthetic": False, "images": 1234, "per_class": {"monocyte": 1234}}
SYNTHETIC = {"source": "synthetic", "synthetic": True, "images": 80}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints at data/models/<name>/ of a throw-away repository layout."""
    root = tmp_path_factory.mktemp("repo") / "data" / "models"
    return {"pbc": tiny_checkpoint(root / "pbc" / "model.safetensors", training_data=PBC),
            "synthetic": tiny_checkpoint(root / "synthetic" / "model.safetensors",
                                         training_data=SYNTHETIC)}


def test_the_record_is_typed_and_round_trips(models, tmp_path):
    network, model_file = load_model_file(models["pbc"])
    assert isinstance(model_file.preprocess, Preprocess)
    assert isinstance(model_file.model_config, ModelConfig)
    assert model_file.training_data == TrainingData(**PBC) and not model_file.synthetic
    assert model_file.classes == CLASSES and model_file.temperature == 1.0
    copy = tmp_path / "copy.safetensors"
    write_model_file(model_file, network.state_dict(), copy)
    again, state = read_model_file(copy)
    assert again == model_file and state.keys() == network.state_dict().keys()
    assert ModelFile.from_metadata(valid_metadata(), "x").training_data is None


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_model_files_follow_the_umask(models, tmp_path, umask, mode):
    """safetensors' save_file wrote 0600 whatever the umask."""
    network, model_file = load_model_file(models["pbc"])
    previous = os.umask(umask)
    try:
        write_model_file(model_file, network.state_dict(), tmp_path / "plain.safetensors")
        with atomic_path(tmp_path / "staged.safetensors") as staging:
            write_model_file(model_file, network.state_dict(), staging)
    finally:
        os.umask(previous)
    for name in ("plain", "staged"):
        assert stat.S_IMODE((tmp_path / f"{name}.safetensors").stat().st_mode) == mode


def test_abstain_works_from_any_folder(models, tmp_path, monkeypatch, capsys):
    """The threshold is found by the model's path (data/models/pbc -> data/eval/pbc), not from
    the working folder."""
    summary = evaluation_of(models["pbc"])
    assert summary == models["pbc"].parents[2] / "eval" / "pbc" / "summary.json"
    write_json(summary, {"abstention": {"threshold": 0.99}})
    cell = cell_image(tmp_path / "cell.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert wbc(["predict", "--abstain", str(models["pbc"]), str(cell), "-o", "out.csv"]) == 0
    assert pd.read_csv(elsewhere / "out.csv")["decision"].tolist() == ["review"]
    capsys.readouterr()
    assert wbc(["predict", "--abstain", str(models["synthetic"]), str(cell)]) == USER_ERROR_EXIT
    assert "error: no evaluation of synthetic" in capsys.readouterr().err


def test_evaluate_outside_the_repository_takes_the_source_from_the_model(models, tmp_path,
                                                                         monkeypatch):
    data = class_tree(tmp_path / "cells")
    monkeypatch.chdir(tmp_path)
    assert wbc(["evaluate", str(models["pbc"]), str(data), "-o", str(tmp_path / "report")]) == 0
    card = (tmp_path / "report" / "MODEL_CARD.md").read_text()
    assert "- source: `pbc` (1234 images)" in card and "synthetic" not in card
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["card"]["data"][
        "per_class"] == {"monocyte": 1234}


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelname == "WARNING" and "synthetic cells" in record.getMessage()]


def test_a_model_trained_on_synthetic_cells_says_so(models, tmp_path, caplog, capsys):
    data, cell = class_tree(tmp_path / "cells"), cell_image(tmp_path / "cell.png")
    model = str(models["synthetic"])
    for command in (["predict", model, str(cell)],
                    ["evaluate", model, str(data), "-o", str(tmp_path / "report")],
                    ["explain", model, str(cell), "-o", str(tmp_path / "explained")]):
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert wbc(command) == 0
        assert len(_warnings(caplog)) == 1, command
    card = (tmp_path / "report" / "MODEL_CARD.md").read_text()
    assert "- **Warning**: trained on **synthetic cells**" in card
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert wbc(["predict", str(models["pbc"]), str(cell)]) == 0
    assert _warnings(caplog) == []


def test_explain_says_in_one_line_what_it_takes(models, tmp_path, capsys):
    export = tmp_path / "lite0.onnx"
    export.write_bytes(b"an export")
    code = wbc(["explain", str(export), str(cell_image(tmp_path / "cell.png")), "-o",
                str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == USER_ERROR_EXIT and err == (
        f"error: {export}: wbc explain needs the model.safetensors an ONNX export was made from "
        "(gradients and attention maps are not in the export)")
