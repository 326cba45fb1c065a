"""params.yaml against its schema (issue 44 §3) and the config dataclasses (issue 42 §3): every
key checked for type and range as the file is read, every config field a params key."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from pipeline import params_schema as schema
from pipeline.compare import CompareConfig
from pipeline.config import from_params
from pipeline.ensemble import EnsembleConfig
from pipeline.evaluate import EvaluateConfig
from pipeline.io import load_params
from pipeline.masks import MaskParams
from pipeline.models import ModelConfig
from pipeline.params_schema import ParamsError
from pipeline.sources import DataConfig
from pipeline.sources.ingest import SyntheticConfig
from pipeline.split import SplitConfig
from pipeline.train import RANDOM_INIT_RECIPE, TrainConfig, recipe_for

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
SECTIONS = {"data": DataConfig, "masks": MaskParams, "split": SplitConfig, "train": TrainConfig,
            "evaluate": EvaluateConfig, "ensemble": EnsembleConfig, "compare": CompareConfig}
# Config fields that are not params, and why: nothing else may be missing from params.yaml.
NOT_PARAMS = {("evaluate", "device"): "stages score on the best device found; wbc's option"}
FAST_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _keys(typed_dict: Any) -> set[str]:
    return set(get_type_hints(typed_dict))


def _fields(cls: type, section: str) -> set[str]:
    names = {field.name for field in dataclasses.fields(cls)}
    return names - {name for where, name in NOT_PARAMS if where == section}


# ------------------------------------------------ schema, dataclasses and params.yaml agree


def test_params_yaml_passes_its_schema_unchanged():
    assert load_params(ROOT / "params.yaml") == PARAMS


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_config_field_is_a_params_key_and_a_schema_key(section):
    """Issue 42 §3: a knob in code only (no params.yaml entry, no schema entry) fails here, and
    so does a schema key that no config reads."""
    cls = SECTIONS[section]
    fields = _fields(cls, section) | getattr(cls, "READ_ELSEWHERE", set())
    schema_keys = _keys(schema._unwrap(get_type_hints(schema.Params, include_extras=True)[section]))
    assert fields - set(PARAMS[section]) == set(), f"{section}: fields missing in params.yaml"
    assert schema_keys == fields, f"{section}: schema and {cls.__name__} differ"


def test_nested_configs_match_too():
    """Each model entry, data.synthetic and train.random_init: the same keys everywhere."""
    model_fields = _fields(ModelConfig, "models")
    assert _keys(schema.Model) == model_fields
    code_defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                     if f.default is not dataclasses.MISSING and f.name != "pretrained"}
    for name, entry in PARAMS["models"].items():
        assert set(entry) == model_fields, f"models.{name}"
        assert {key: entry[key] for key in code_defaults} == code_defaults  # default behaviour
    assert _keys(schema.Synthetic) == _fields(SyntheticConfig, "data.synthetic") \
        == set(PARAMS["data"]["synthetic"])
    recipe_keys = _fields(TrainConfig, "train") - {"random_init"}
    assert _keys(schema.Recipe) == recipe_keys >= set(PARAMS["train"]["random_init"])
    assert _keys(schema.Params) == set(PARAMS)
    assert _keys(schema.Crossval) == set(PARAMS["crossval"])  # read by dvc.yaml's foreach


def test_the_keys_params_must_give_are_the_configs_required_fields():
    def required(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}

    def missing(typed_dict: Any) -> set[str]:  # what pydantic asks of an empty mapping
        try:
            TypeAdapter(typed_dict).validate_python({})
        except ValidationError as error:
            return {item["loc"][-1] for item in error.errors() if item["type"] == "missing"}
        return set()

    assert set(schema.TRAIN_REQUIRED) == required(TrainConfig) and not missing(schema.Train)
    assert missing(schema.Model) == required(ModelConfig)
    assert missing(schema.Ensemble) == required(EnsembleConfig)
    others = set(SECTIONS) - {"train", "ensemble"}
    assert all(not required(SECTIONS[section]) for section in others)


def test_a_code_only_knob_would_fail_the_check():
    """The check above is not vacuous: a field added to a config without a params entry."""
    grown = dataclasses.make_dataclass("Grown", [("secret_knob", int, dataclasses.field(
        default=0))], bases=(MaskParams,), frozen=True)
    assert _fields(grown, "masks") - set(PARAMS["masks"]) == {"secret_knob"}


def test_random_init_is_read_as_written():
    """The fallback block's keys replace train's and nothing else changes; the recipe's name
    (train.json's ``recipe``, tests/test_train.py) says which block trained the model."""
    config = from_params(TrainConfig, PARAMS["train"], "train")
    fallback, recipe = recipe_for(config, "random-init (pretrained weights unavailable)")
    assert recipe == RANDOM_INIT_RECIPE
    changed = {f.name for f in dataclasses.fields(config)
               if getattr(fallback, f.name) != getattr(config, f.name)}
    assert changed == {key for key, value in PARAMS["train"]["random_init"].items()
                       if PARAMS["train"].get(key) != value}
    assert recipe_for(config, "timm:pretrained") == (config, "default")


# ------------------------------------------------------------------------- hostile values


def _leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of params.yaml down to its values (mappings of known keys descended)."""
    paths = []
    for key, value in tree.items():
        path = (*prefix, key)
        paths.append(path)
        if isinstance(value, dict) and key not in ("references", "adapt"):
            paths.extend(_leaves(value, path))
    return paths


LEAVES = _leaves(PARAMS)
HOSTILE = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 10**9, 10**12, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.5, 1e-300, 1e300]),
    st.booleans(), st.none(),
    st.text(max_size=20), st.sampled_from(["5", "1e9", "auto", "", "../..", "yes", "(", " "]),
    st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=5)), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(-2, 2), max_size=3),
)


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    params = copy.deepcopy(PARAMS)
    node = params
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return params


def _build_every_config(params: dict[str, Any]) -> None:
    """What the stages build from valid params: none of it may fail afterwards."""
    for section, cls in SECTIONS.items():
        from_params(cls, params[section], section)
    train = from_params(TrainConfig, params["train"], "train")
    recipe_for(train, "random-init (no weights)")
    for name, entry in params["models"].items():
        from_params(ModelConfig, entry, f"models.{name}")


def _check(path_file: Path, document: str, named: str | None) -> None:
    """``load_params`` returns (and every config builds) or raises one line naming ``named``."""
    path_file.write_text(document, encoding="utf-8")
    try:
        params = load_params(path_file)
    except ParamsError as error:
        message = str(error)
        assert "\n" not in message and message.startswith(str(path_file)), message
        assert named is None or named in message or "more bad key" in message, message
        return
    _build_every_config(params)


@FUZZ
@given(path=st.sampled_from(LEAVES), value=HOSTILE)
def test_any_value_of_any_key_is_valid_or_one_line(path, value):
    key = ".".join(path)
    with tempfile.TemporaryDirectory() as folder:
        document = yaml.safe_dump(_with(path, value), sort_keys=False)
        _check(Path(folder) / "params.yaml", document, key.rsplit(".", 1)[0])


@FUZZ
@given(path=st.sampled_from(LEAVES), name=st.text(min_size=1, max_size=12), value=HOSTILE)
def test_an_unknown_key_anywhere_is_one_line(path, name, value):
    parent = _with(path, None)
    node = parent
    for key in path[:-1]:
        node = node[key]
    node[name] = value
    with tempfile.TemporaryDirectory() as folder:
        _check(Path(folder) / "params.yaml", yaml.safe_dump(parent), None)


@FUZZ
@given(text=st.text(max_size=200))
def test_any_text_is_valid_params_or_one_line(text):
    with tempfile.TemporaryDirectory() as folder:
        _check(Path(folder) / "params.yaml", text, None)


def _hint(path: tuple[str, ...]) -> Any:
    """The schema's type of the key at ``path``."""
    hint: Any = schema.Params
    for key in path:
        hint = schema._unwrap(hint)
        hint = get_args(hint)[1] if get_origin(hint) is dict else \
            get_type_hints(hint, include_extras=True)[key]
    return hint


def _bounds(hint: Any) -> set[float]:
    """Every numeric bound (ge, gt, le, lt) declared anywhere in ``hint``."""
    found = {getattr(item, name) for item in getattr(hint, "metadata", ())
             for name in ("ge", "gt", "le", "lt") if hasattr(item, name)}
    return found.union(*(_bounds(arg) for arg in get_args(hint)))


def _near(bound: float) -> set[Any]:
    """Values on and around a bound, as integers and as floats."""
    values = {bound - 1, bound, bound + 1, bound - 1e-9, bound + 1e-9}
    return values | {int(value) for value in values if abs(value) < 2**64}


def test_values_at_every_bound_pass_both_the_schema_and_the_configs(tmp_path):
    """On each side of each declared bound: what the schema accepts every config builds from
    (the schema is no looser than the code), else one line (a deterministic complement of the
    random values above)."""
    checked = 0
    for path in LEAVES:
        for value in sorted(set().union(*map(_near, _bounds(_hint(path)))), key=float):
            _check(tmp_path / "params.yaml", yaml.dump(_with(path, value), Dumper=FAST_DUMPER),
                   ".".join(path).rsplit(".", 1)[0])
            checked += 1
    assert checked > 500


def test_any_key_left_out_is_valid_or_one_line(tmp_path):
    """A key (or a section) taken out: its config's default, or one line if it has none."""
    for path in LEAVES:
        params = copy.deepcopy(PARAMS)
        node = params
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        _check(tmp_path / "params.yaml", yaml.dump(params, Dumper=FAST_DUMPER),
               ".".join(path).rsplit(".", 1)[0])


@pytest.mark.parametrize(("key", "value", "message"), [
    ("data.synthetic.images_per_class", 10**9, "must be <= 100000 (got 1000000000)"),
    ("data.synthetic.images_per_class", 1e9, "must be an integer (got 1000000000.0)"),
    ("data.per_class", -1, "must be >= 1 (got -1)"),
    ("data.per_class", "5", "must be an integer (got '5')"),
    ("data.per_class", 1.5, "must be an integer (got 1.5)"),
    ("train.epochs", 0, "must be >= 1 (got 0)"),
    ("train.batch_size", 0, "must be >= 1 (got 0)"),
    ("train.lr", math.nan, "must be a finite number (got .nan)"),
    ("train.lr", 100000, "must be <= 10 (got 100000)"),
    ("train.amp", "yes", "must be true or false or 'auto' (got 'yes')"),
    ("masks.work_size", 0, "must be >= 16 (got 0)"),
    ("masks.gallery_per_class", 0, "must be >= 1 (got 0)"),
    ("models.mobilenet_attention.image_size", 0, "must be >= 16 (got 0)"),
    ("models.mobilenet_attention.output_stride", 4, "must be 8, 16 or 32 (got 4)"),
    ("train.random_init.epochs", -3, "must be >= 1 (got -3)"),
    ("split.folds", [1, 2], "must list the fold ids 0..K-1"),
    ("evaluate.abstain_target_accuracy", 0, "must be > 0 (got 0)"),
])
def test_the_issues_values_are_refused_naming_file_key_and_range(tmp_path, key, value, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_with(tuple(key.split(".")), value)))
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(error.value).startswith(f"{path} {key}: {message}")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda p: p["ensemble"].update(members=["mobilenet_attention", "resnet"]),
     ": ensemble.members: 'resnet' is not an entry of models"),
    (lambda p: p["train"].update(cell_fraction=0.6, red_cell_crop=3.0),
     " train: cell_fraction and red_cell_crop both set the crop's scale: "),
    (lambda p: p["train"]["random_init"].update(red_cell_crop=3.0) or p["train"].update(
        cell_fraction=0.6), " train: cell_fraction and red_cell_crop both set the crop's scale "
                            "(with random_init)"),
    (lambda p: p["split"].update(val=0.5, test=0.5), " split: val + test must be below 1"),
    (lambda p: p["masks"].update(min_area_fraction=0.9),
     " masks: min_area_fraction (0.9) must be below max_area_fraction (0.85)"),
    (lambda p: p["models"]["xception_attention"].update(embed_dim=30, heads=4),
     " models.xception_attention: embed_dim (30) must be a multiple of heads (4)"),
    (lambda p: p.pop("train"), " train: is missing"),
    (lambda p: p.pop("compare"), " compare: is missing"),  # the compare stage reads it
    (lambda p: p["train"].pop("lr"), " train: missing key(s) lr"),
    (lambda p: p["train"].update(transfer=True), " train: unknown key(s) transfer; known: amp,"),
])
def test_keys_that_disagree_are_refused(tmp_path, edit, message):
    params = copy.deepcopy(PARAMS)
    edit(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=f"^{tmp_path / 'params.yaml'}"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(ParamsError) as error:
        load_params(tmp_path / "params.yaml")
    assert message in str(error.value)


# ----------------------------------------------------------------------- the file itself


def _billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("text", "message"), [
    (_billion_laughs(), "not valid YAML: an alias (*a0) is not allowed in a params file at line 2"),
    ("train: " + "[" * 50 + "]" * 50 + "\n", "nested more than 16 levels deep"),
    ("train: {epochs: 1}\ntrain: {epochs: 2}\n", "key 'train' appears twice at line 2"),
    ("train: [\n", "not valid YAML: "),
    ("", "must be a mapping of keys (got null)"),
    ("- 1\n", "must be a mapping of keys (got [1])"),
])
def test_hostile_yaml_is_refused_before_it_is_built(tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError) as error:
        load_params(tmp_path / "params.yaml")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_huge_or_special_file_is_refused_unread(tmp_path):
    big = tmp_path / "params.yaml"
    big.write_text("# padding\n" * (schema.MAX_PARAMS_BYTES // 10 + 1))
    with pytest.raises(ParamsError, match="larger than 1048576 bytes: not a params file"):
        load_params(big)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # would block a reader forever
    with pytest.raises(ParamsError, match="fifo.yaml: not a regular file"):
        load_params(fifo)
    with pytest.raises(ParamsError, match="no such file"):
        load_params(tmp_path / "absent.yaml")
    (tmp_path / "latin.yaml").write_bytes("train: {device: café}\n".encode("latin-1"))
    with pytest.raises(ParamsError, match="not UTF-8 text"):
        load_params(tmp_path / "latin.yaml")


def test_exponent_numbers_are_numbers(tmp_path):
    """``lr: 1e-3`` is a number (YAML 1.2, as DVC writes it), not the string PyYAML reads."""
    text = (ROOT / "params.yaml").read_text().replace("  lr: 0.001\n", "  lr: 1e-3\n", 1)
    assert "lr: 1e-3" in text
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml")["train"]["lr"] == 0.001


@pytest.mark.parametrize(("edit", "line"), [
    (lambda text: text.replace("  epochs: 6\n", "  epochs: 0\n", 1),
     "error: params.yaml train.epochs: must be >= 1 (got 0)\n"),
    (lambda text: text.replace("  per_class: null ", '  per_class: "5"  ', 1),
     "error: params.yaml data.per_class: must be an integer (got '5')\n"),
    (lambda text: _billion_laughs() + text,
     "error: params.yaml: not valid YAML: an alias (*a0) is not allowed in a params file at "
     "line 2, column 10\n"),
])
def test_a_stage_exits_2_with_one_line_and_writes_nothing(tmp_path, edit, line):
    """The split stage reads only split, yet a bad key anywhere stops it before any work."""
    (tmp_path / "params.yaml").write_text(edit((ROOT / "params.yaml").read_text()))
    result = subprocess.run([sys.executable, "-m", "stages.split"], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                            text=True, timeout=120)
    assert (result.returncode, result.stderr) == (2, line)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"]
