"""Recipe files (recipes/*.yaml) applied by ``python -m recipes``: every documented recipe
applies cleanly to this checkout's params.yaml, through DVC's own ``-S`` parser; a broken
recipe is a one-line error before DVC starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from dvc.utils.hydra import apply_overrides
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.compare import CompareConfig
from pipeline.config import from_params
from pipeline.ensemble import EnsembleConfig
from pipeline.evaluate import EvaluateConfig
from pipeline.masks import MaskParams
from pipeline.model_file import ModelConfig
from pipeline.params_schema import read_params
from pipeline.sources.ingest import DataConfig
from pipeline.split import SplitConfig
from pipeline.train import TrainConfig
from recipes.apply import add_copies, available, command, compose, merge, override_value

sys.path.insert(0, str(Path(__file__).parent))
from project_copy import fresh_clone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
# Every recipe, and every combination the README documents.
DOCUMENTED = [["pbc-1560"], ["pbc"], ["bccd"], ["real-data"], ["transfer"], ["ensemble"],
              ["pbc-1560", "transfer"], ["pbc-1560", "ensemble"],
              ["pbc-1560", "transfer", "ensemble"], ["pbc", "ensemble"]]


def _applied_by_dvc(dvc_command: list[str], tmp_path: Path) -> dict[str, Any]:
    """params.yaml after DVC's ``-S`` parser applies the command's values to a copy of it."""
    copy = tmp_path / "params.yaml"
    shutil.copy(PARAMS, copy)
    values = [dvc_command[i + 1] for i, part in enumerate(dvc_command) if part == "-S"]
    apply_overrides(copy, values)
    return read_params(copy)  # the file DVC wrote, through params.yaml's schema


def _expected(names: list[str], holdout: tuple[str, ...] = ()) -> dict[str, Any]:
    params = yaml.safe_load(PARAMS.read_text())
    _, changes, copies = compose(names, holdout)
    return merge(params, add_copies(changes, copies, params))


def _validate(params: dict[str, Any]) -> None:
    """Every section through the config class its stage builds (what a run would refuse)."""
    for config, name in ((DataConfig, "data"), (TrainConfig, "train"), (EvaluateConfig, "evaluate"),
                         (EnsembleConfig, "ensemble"), (SplitConfig, "split"),
                         (MaskParams, "masks"), (CompareConfig, "compare")):
        from_params(config, params[name], name)
    for model, section in params["models"].items():
        from_params(ModelConfig, section, f"models.{model}")
    assert set(params["ensemble"]["members"]) <= set(params["models"])


def test_every_recipe_file_is_documented():
    assert {name for names in DOCUMENTED for name in names} == set(available())


@pytest.mark.parametrize("names", DOCUMENTED, ids="+".join)
def test_recipe_applies_through_dvc_set_param(names, tmp_path):
    dvc_command = command(names)
    assert dvc_command[:3] == ["dvc", "exp", "run"]
    applied = _applied_by_dvc(dvc_command, tmp_path)
    assert applied == _expected(names)
    _validate(applied)
    assert dvc_command[dvc_command.index("-m") + 1] == "recipes: " + " + ".join(names)


def test_recipe_values_reach_params(tmp_path):
    applied = _applied_by_dvc(command(["pbc-1560", "transfer", "ensemble"]), tmp_path)
    lite1 = applied["models"]["efficientnet_lite1_attention"]
    assert lite1 == {**applied["models"]["efficientnet_lite0_attention"],
                     "backbone": "efficientnet_lite1", "pretrained": True}
    assert lite1["image_size"] == 160  # the copy is Lite0's entry as pbc-1560 leaves it
    assert applied["data"] | {"per_class": 195, "source": "pbc"} == applied["data"]
    assert (applied["train"]["epochs"], applied["train"]["cell_fraction"]) == (20, 0.6)
    assert applied["ensemble"]["members"] == ["efficientnet_lite0_attention",
                                              "efficientnet_lite1_attention"]


def test_holdout_is_excluded_and_scored(tmp_path):
    held = ("my sets/pbc external", "other's")
    applied = _applied_by_dvc(command(["pbc"], held), tmp_path)
    assert applied == _expected(["pbc"], held)
    assert applied["data"]["exclude"] == applied["evaluate"]["external"] == list(held)


def test_extra_values_follow_the_recipes():
    dvc_command = command(["pbc-1560"], extra=["-S", "data.source=/my/copy", "--queue"])
    assert dvc_command[-3:] == ["-S", "data.source=/my/copy", "--queue"]
    assert dvc_command.index("++data.source=pbc") < dvc_command.index("data.source=/my/copy")


@settings(max_examples=40, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12))
def test_any_string_reaches_params_unchanged(text):
    """Paths with spaces, quotes, backslashes, ``${``, or that read as true/null/numbers."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(shutil.copy(PARAMS, Path(folder) / "params.yaml"))
        apply_overrides(copy, [f"++data.source={override_value(text)}"])
        assert yaml.safe_load(copy.read_text())["data"]["source"] == text


HOSTILE = {  # recipe fields laid over a valid empty recipe (a string: the file's whole text)
    "unknown key": ({"params": {"train": {"epoch": 20}}}, "train.epoch is no key of params"),
    "unknown section": ({"params": {"trian": {"epochs": 20}}}, "trian is no key of params"),
    "mapping for a value": ({"params": {"train": {"epochs": {"a": 1}}}},
                            "train.epochs is a single value"),
    "mapping for a null": ({"params": {"data": {"per_class": {"a": 1}}}},
                           "data.per_class is a single value"),
    "value out of range": ({"params": {"train": {"epochs": 0}}}, "train.epochs"),
    "wrong type": ({"params": {"evaluate": {"tta": "yes"}}}, "evaluate.tta"),
    "unknown target": ({"targets": ["evaluate@nonexistent"]}, "is no stage of dvc.yaml"),
    "new model, no copy": ({"params": {"models": {"m2": {"backbone": "x"}}}},
                           "new model models.m2 must set exactly"),
    "copy of nothing": ({"copies": {"m2": "nothing"}}, "must be a model of params.yaml"),
    "copy, unknown key": ({"copies": {"m2": "efficientnet_lite0_attention"},
                           "params": {"models": {"m2": {"size": 3}}}}, "unknown key(s) size"),
    "stray field": ({"stage": "train"}, "must be a mapping of"),
    "targets not a list": ({"targets": "ensemble"}, "targets a list"),
    "not yaml": ("params: [unclosed", "not valid YAML"),
    "not a mapping": ("- a list", "must be a mapping of"),
}


def _recipe(tmp_path: Path, fields: dict | str) -> Path:
    path = tmp_path / "hostile.yaml"
    if isinstance(fields, str):
        path.write_text(fields)
    else:
        path.write_text(yaml.safe_dump({"about": "test", "targets": [], "params": {}} | fields))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recipes", *args], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.parametrize("case", HOSTILE)
def test_broken_recipe_is_one_line_before_dvc(case, tmp_path):
    fields, message = HOSTILE[case]
    run = _cli(str(_recipe(tmp_path, fields)), "--print")
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr
    assert "dvc exp run" not in run.stderr  # refused before any command was made


@pytest.mark.parametrize("name", ["pbx", "missing.yaml"])
def test_unknown_recipe_names_the_known_ones(name):
    run = _cli(name)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert ("known: bccd, ensemble, pbc, pbc-1560, real-data, transfer" in run.stderr
            or "does not exist" in run.stderr)


def test_listing_names_every_recipe():
    run = _cli()
    assert run.returncode == 0, run.stderr
    assert [line.split()[0] for line in run.stdout.splitlines()] == available()


@pytest.mark.slow
def test_recipes_queue_on_a_fresh_clone(tmp_path):
    """In a git copy of the project, each documented recipe queues an experiment whose
    params.yaml is the recipe applied (``dvc exp show``), without running it."""
    fresh_clone(tmp_path)
    for names in DOCUMENTED:
        run = subprocess.run([sys.executable, "-m", "recipes", *names, "--queue"], cwd=tmp_path,
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    shown = json.loads(subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"],
                                      cwd=tmp_path, capture_output=True, text=True,
                                      check=True).stdout)
    queued = [experiment["revs"][0]["data"]["params"]["params.yaml"]["data"]
              for baseline in shown for experiment in baseline.get("experiments") or []]
    expected = [_expected(names) for names in DOCUMENTED]
    assert sorted(map(json.dumps, queued)) == sorted(map(json.dumps, expected))
