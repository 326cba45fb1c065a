"""Model files are hostile input (issue 44): metadata selects nothing outside the project, is
bounded before anything is allocated, NaN never passes a check, ensembles are read once and
capped, and git never runs in the user's folder."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_files_kit import (
    cell_image,
    crafted_checkpoint,
    crafted_onnx,
    tiny_checkpoint,
    valid_metadata,
)

from pipeline import model_card, model_files
from pipeline.cli import main as wbc
from pipeline.errors import USER_ERROR_EXIT, PipelineError
from pipeline.export import ParityError, check_parity
from pipeline.model_file import CheckpointError, ModelFile
from pipeline.model_files import read_spec, write_spec
from pipeline.onnx_runtime import OnnxClassifier
from pipeline.predict import NOT_FINITE, predict
from pipeline.scoring import MAX_DEPTH, MAX_LEAVES, resolve_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("hostile") / "tiny" / "model.safetensors")


def _one_line_error(tmp_path: Path, model: Path, capsys) -> str:
    """``wbc predict model cell``'s stderr, asserted to be one line with exit code 2."""
    code = wbc(["predict", str(model), str(cell_image(tmp_path / "cell.png"))])
    err = capsys.readouterr().err.strip()
    assert code == USER_ERROR_EXIT and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------- 1. a backbone never comes from the network

@pytest.mark.parametrize("backbone", ["hf-hub:owner/name", "timm/mobilenetv2_100.ra_in1k",
                                      "https://example.org/net.pth", "../../evil", "no_such_net"])
def test_backbone_from_a_file_never_reaches_the_network(backbone, tmp_path, capsys, monkeypatch):
    attempts = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: refuse(None, args))
    config = valid_metadata()["model_config"] | {"backbone": backbone}
    model = crafted_checkpoint(tmp_path / "model.safetensors", valid_metadata(model_config=config))
    err = _one_line_error(tmp_path, model, capsys)
    assert err.startswith(f"error: {model}: model_config.backbone ") and "offline" in err
    assert attempts == []


# ------------------------------------------------- 2. one schema, type and range, per kind

@pytest.mark.parametrize(("change", "key"), [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": 1e-9}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"classes": ["a", "a"]}, "classes"),
    ({"classes": ["a", ""]}, "classes"),
    ({"classes": "abc"}, "classes"),
    ({"model_config": valid_metadata()["model_config"] | {"depth": 100000}},
     "model_config.depth"),
    ({"model_config": valid_metadata()["model_config"] | {"embed_dim": 2 ** 20}},
     "model_config.embed_dim"),
    ({"model_config": valid_metadata()["model_config"] | {"heads": 3}}, "model_config.heads"),
    ({"model_config": valid_metadata()["model_config"] | {"image_size": 10 ** 6}},
     "model_config.image_size"),
    ({"preprocess": valid_metadata()["preprocess"] | {"std": [0.2, 0.0, 0.2]}},
     "preprocess.std"),
    ({"preprocess": valid_metadata()["preprocess"] | {"mean": [0.5, float("inf"), 0.5]}},
     "preprocess.mean"),
    ({"mask_params": valid_metadata()["mask_params"] | {"work_size": 10 ** 9}},
     "mask_params.work_size"),
    ({"abstain_threshold": 7}, "abstain_threshold"),
])
def test_out_of_range_metadata_is_refused_before_allocation(change, key, tmp_path, capsys):
    model = crafted_checkpoint(tmp_path / "model.safetensors", valid_metadata(**change))
    err = _one_line_error(tmp_path, model, capsys)
    assert err.startswith(f"error: {model}: {key}"), err


def _values():
    scalars = (st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


SECTIONS = ("model_config", "preprocess", "mask_params")
_BASE = valid_metadata()
KEYS = [(key,) for key in _BASE] + [(section, key) for section in SECTIONS
                                     for key in _BASE[section]]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), _values()), min_size=1, max_size=3))
def test_any_metadata_is_a_model_file_or_one_line_error(changes):
    """Random values at random keys: a valid, bounded record or CheckpointError, nothing else."""
    metadata = json.loads(json.dumps(_BASE))
    for path, value in changes:
        target = metadata
        for part in path[:-1]:
            target = target[part] if isinstance(target.get(part), dict) else {}
        target[path[-1]] = value
    try:
        model_file = ModelFile.from_metadata(metadata, "m.safetensors")
    except CheckpointError as error:
        assert str(error).startswith("m.safetensors: ") and "\n" not in str(error)
        return
    config = model_file.model_config
    assert config.depth <= 12 and config.embed_dim <= 1024 and config.image_size <= 1024
    assert 1e-3 <= model_file.temperature <= 1e3
    assert all(math.isfinite(v) and v > 0 for v in model_file.preprocess.std)


def test_onnx_metadata_is_validated_by_the_same_schema(tmp_path, capsys):
    record = valid_metadata(temperature=-1.0)
    del record["format"]
    model = crafted_onnx(tmp_path / "model.onnx", record)
    with pytest.raises(CheckpointError, match=r"model.onnx: temperature: .*greater than or equal"):
        OnnxClassifier(model)
    err = _one_line_error(tmp_path, model, capsys)
    assert err.startswith(f"error: {model}: temperature")
    good = crafted_onnx(tmp_path / "good.onnx", valid_metadata(abstain_threshold=0.7))
    assert OnnxClassifier(good).model_file.abstain_threshold == 0.7


@settings(max_examples=30, deadline=None)
@given(weight=st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=4),
       temperature=st.floats(allow_nan=True, allow_infinity=True))
def test_any_ensemble_numbers_are_valid_or_one_line(tmp_path_factory, weight, temperature):
    folder = tmp_path_factory.mktemp("spec")
    spec = folder / "ensemble.json"
    spec.write_text(json.dumps({"kind": "ensemble", "temperature": temperature,
                                "members": [{"name": "a", "checkpoint": "m", "weight": weight}]}))
    try:
        read = read_spec(spec)
    except PipelineError as error:
        assert str(error).startswith(f"{spec}: ") and "\n" not in str(error)
        return
    assert all(0 < m["weight"] < math.inf for m in read["members"])
    assert 1e-3 <= read["temperature"] <= 1e3


# ------------------------------------------------- 3. NaN is never a pass

def test_parity_check_fails_on_nan():
    """NaN where the reference has its top class: the same argmax, and ``nan > tolerance`` is
    False, so the old check passed it."""
    reference = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    exported = reference.copy()
    exported[1, 1] = np.nan
    assert (exported.argmax(1) == reference.argmax(1)).all()
    with pytest.raises(ParityError, match="0 top-1 mismatches, max probability difference nan"):
        check_parity(reference, exported)
    with pytest.raises(ParityError):
        check_parity(np.full((2, 3), np.nan), np.full((2, 3), np.nan))
    assert check_parity(reference, reference) == (0.0, 0)


def test_a_model_answering_nan_gives_error_rows_not_numbers(tmp_path):
    model = tiny_checkpoint(tmp_path / "nan" / "model.safetensors", nan_head=True)
    rows = predict(model, [cell_image(tmp_path / "a.png"), cell_image(tmp_path / "b.png", 1)],
                   device="cpu")
    assert [row["error"] for row in rows] == [NOT_FINITE, NOT_FINITE]
    assert all("p1" not in row for row in rows)


# ------------------------------------------------- 4. ensembles: read once, capped, no cycle

def _chain(folder: Path, checkpoint: Path, levels: int, fan: int) -> Path:
    """``levels`` ensemble files, each naming the next ``fan`` times; the last, the checkpoint."""
    below = checkpoint
    for level in reversed(range(levels)):
        spec = folder / f"level{level}.json"
        write_spec(spec, {f"m{i}": below for i in range(fan)}, dict.fromkeys(
            [f"m{i}" for i in range(fan)], 1.0))
        below = spec
    return below


def test_each_ensemble_file_is_read_once(tmp_path, checkpoint, monkeypatch):
    reads = []
    real = model_files.read_json
    monkeypatch.setattr(model_files, "read_json", lambda path: reads.append(path) or real(path))
    top = _chain(tmp_path, checkpoint, levels=3, fan=2)
    tree = resolve_model(top)
    assert len(reads) == 3 and tree.leaf_count == 8
    assert tree.checkpoints() == [checkpoint.resolve()]


def test_forty_files_each_naming_the_next_twice_are_refused_at_once(tmp_path, checkpoint):
    """Before: 2^40 reads (hours). After: refused for depth, having read 9 files."""
    top = _chain(tmp_path, checkpoint, levels=40, fan=2)
    with pytest.raises(PipelineError, match=f"nested more than {MAX_DEPTH} deep"):
        resolve_model(top)
    wide = _chain(tmp_path / "wide", checkpoint, levels=4, fan=3)  # 81 checkpoints averaged
    with pytest.raises(PipelineError, match=f"averages 81 models .* the {MAX_LEAVES} allowed"):
        resolve_model(wide)


def test_a_cycle_through_three_files_is_refused(tmp_path, checkpoint, capsys):
    a, b, c = (tmp_path / f"{name}.json" for name in "abc")
    write_spec(c, {"a": a, "m": checkpoint}, {"a": 1.0, "m": 1.0})
    write_spec(b, {"c": c}, {"c": 1.0})
    write_spec(a, {"b": b}, {"b": 1.0})
    assert _one_line_error(tmp_path, a, capsys) == f"error: {a}: an ensemble that contains itself"


# ------------------------------------------------- 5. git never runs in the user's folder

def test_model_card_never_runs_git_in_the_working_folder(tmp_path, monkeypatch):
    repo, marker = tmp_path / "repo", tmp_path / "MARKER"
    environment = os.environ | {"GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", "init", "-q", str(repo)], check=True, env=environment)
    subprocess.run(["git", "config", "core.fsmonitor", f"touch {marker}; false"], cwd=repo,
                   check=True, env=environment)
    (repo / "f").write_text("x")
    subprocess.run(["git", "add", "f"], cwd=repo, check=True, env=environment)
    subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                   env=environment)
    assert marker.exists()  # the hostile folder works: plain `git status` there runs it
    marker.unlink()
    monkeypatch.chdir(repo)
    commit = model_card.git_commit()
    assert not marker.exists()
    expected = 40 if (REPO / ".git").exists() else len("unknown")  # the project's own commit
    assert len(commit.removesuffix("-dirty")) == expected
    assert model_card.git_commit(tmp_path / "elsewhere") == "unknown"


# ------------------------------------------------- 6. the real command line, end to end

@pytest.mark.parametrize(("change", "key"), [
    ({"model_config": valid_metadata()["model_config"] | {"backbone": "hf-hub:owner/name"}},
     "model_config.backbone"),
    ({"model_config": valid_metadata()["model_config"] | {"depth": 100000}},
     "model_config.depth"),
])
def test_wbc_refuses_a_hostile_model_in_one_line(change, key, tmp_path):
    model = crafted_checkpoint(tmp_path / "model.safetensors", valid_metadata(**change))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", str(model),
                           str(cell_image(tmp_path / "cell.png"))], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=os.environ | {"HF_HUB_OFFLINE": "0"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == USER_ERROR_EXIT and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {model}: {key}")
