"""The schema of ``params.yaml``: every key's type and range, checked when the file is read.

:func:`read_params` is the one boundary: it refuses a file that is too large, not YAML, uses
aliases (a YAML "billion laughs" would expand in memory before any check), nests deeper than a
params file does or repeats a key, then validates the document against :data:`PARAMS_SCHEMA`
(pydantic, strict: an integer must not come as ``"5"`` or ``1.5``; no NaN or infinity; ranges
bound every size before any work). Any defect is one line naming the file, the key and what is
allowed: ``params.yaml train.epochs: must be >= 1 (got 0)``.

A key may be absent (the config dataclasses hold the defaults); a key present must be valid. The
config dataclasses stay the typed objects the code uses; ``tests/test_params_schema.py`` holds
the schema, the dataclasses and ``params.yaml`` to the same keys.
"""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import yaml
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    with_config,
)
from typing_extensions import NotRequired, Required, TypedDict

from pipeline.config import ConfigError

MAX_PARAMS_BYTES = 1 << 20  # params.yaml is about 8 KB
MAX_NESTING = 16            # params.yaml nests 3 levels deep
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ParamsError(ConfigError):
    """``params.yaml`` cannot be read or holds a value outside its key's type or range."""


def _between(low: float, high: float, *, low_open: bool = False, high_open: bool = False
             ) -> Any:
    """A pydantic bound: ``low <= x <= high``, either end open when asked."""
    return Field(**{"gt" if low_open else "ge": low, "lt" if high_open else "le": high})


Seed = Annotated[int, _between(0, 2**32 - 1)]  # NumPy's seeds are 32-bit
Count = Annotated[int, _between(1, 1_000_000)]
Pixels = Annotated[int, _between(0, 1000)]      # a morphology radius or a border, in pixels
Text = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
Share = Annotated[float, _between(0, 1)]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")]
Switch = bool | Literal["auto"]


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"must be a regular expression: {error}") from None
    return pattern


def _check_fold_ids(folds: list[int]) -> list[int]:
    if folds and (len(folds) < 2 or folds != list(range(len(folds)))):
        raise ValueError("must list the fold ids 0..K-1 for K >= 2 folds, e.g. [0, 1, 2, 3, 4], "
                         "or be [] (off)")
    return folds


@with_config(_STRICT)
class Synthetic(TypedDict, total=False):
    images_per_class: Annotated[int, _between(1, 100_000)]
    seed: Seed


@with_config(_STRICT)
class Data(TypedDict, total=False):
    source: Text
    cache_dir: Text
    timeout_s: Annotated[float, _between(0, 86_400, low_open=True)]
    retries: Annotated[int, _between(0, 100)]
    max_image_pixels: Annotated[int, _between(1, 500_000_000)]
    min_image_side: Annotated[int, _between(0, 100_000)]
    max_file_bytes: Annotated[int, _between(1, 2**36)]  # 64 GiB
    archive_max_total_bytes: Annotated[int, _between(1, 2**44)]  # 16 TiB
    archive_max_entries: Annotated[int, _between(1, 100_000_000)]
    archive_max_entry_bytes: Annotated[int, _between(1, 2**40)]
    synthetic: Synthetic
    per_class: Count | None
    seed: Seed
    exclude: Text | Annotated[list[Text], Field(max_length=1000)]


def _check_area_fractions(masks: Masks) -> Masks:
    low, high = masks.get("min_area_fraction", 0.0), masks.get("max_area_fraction", 1.0)
    if low >= high:
        raise ValueError(f"min_area_fraction ({low}) must be below max_area_fraction ({high})")
    return masks


@with_config(_STRICT)
class Masks(TypedDict, total=False):
    work_size: Annotated[int, _between(16, 4096)]
    saturation_min: Annotated[int, _between(0, 255)]
    green_max: Annotated[int, _between(0, 255)]
    prior_open_px: Pixels
    cytoplasm_px: Pixels
    border_px: Annotated[int, _between(1, 1000)]  # 0 would make the whole image background
    grabcut_iterations: Annotated[int, _between(1, 100)]
    open_px: Pixels
    close_px: Pixels
    min_area_fraction: Share
    max_area_fraction: Share
    seed: Seed
    gallery_per_class: Annotated[int, _between(1, 100)]


def _check_split_shares(split: Split) -> Split:
    val, test = split.get("val", 0.15), split.get("test", 0.15)
    if val + test >= 1:
        raise ValueError(f"val + test must be below 1, the rest is for training (got {val} + "
                         f"{test})")
    folds = len(split.get("folds", []))
    if folds and val >= 1 - 1 / folds:
        raise ValueError(f"val must be below {1 - 1 / folds:.3g} with {folds} folds, the share "
                         f"they leave beside the test fold (got {val})")
    return split


@with_config(_STRICT)
class Split(TypedDict, total=False):
    folds: Annotated[list[Annotated[int, _between(0, 99)]], Field(max_length=100),
                     AfterValidator(_check_fold_ids)]
    val: Annotated[float, _between(0, 1, low_open=True, high_open=True)]
    test: Annotated[float, _between(0, 1, high_open=True)]
    seed: Seed
    near_duplicate_distance: Annotated[int, _between(-1, 64)]  # pHash bits; -1: off
    original_id_pattern: Annotated[Text, AfterValidator(_check_regex)]


# Keys ``train`` must give (a ``random_init`` block gives any of the recipe's keys, none needed).
TRAIN_REQUIRED = ("epochs", "batch_size", "lr")


def _check_train(train: Train) -> Train:
    """The keys the recipe needs, and one crop scale at most, in the recipe and in the recipe
    ``random_init`` makes of it."""
    if missing := [key for key in TRAIN_REQUIRED if key not in train]:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    for where, recipe in (("", train), (" (with random_init)", {
            **train, **train.get("random_init", {})})):
        if recipe.get("cell_fraction") is not None and recipe.get("red_cell_crop") is not None:
            raise ValueError(f"cell_fraction and red_cell_crop both set the crop's scale{where}: "
                             "set one of them, the other null")
    return train


@with_config(_STRICT)
class Recipe(TypedDict, total=False):
    """The training recipe: ``train`` and, key by key, its ``random_init`` block."""

    epochs: Annotated[int, _between(1, 10_000)]
    batch_size: Annotated[int, _between(1, 65_536)]
    lr: Annotated[float, _between(0, 10, low_open=True)]
    optimizer: Literal["adamw", "sgd"]
    backbone_lr_scale: Annotated[float, _between(0, 100)]
    weight_decay: Annotated[float, _between(0, 10)]
    warmup_epochs: Annotated[float, _between(0, 10_000)]
    freeze_epochs: Annotated[int, _between(0, 10_000)]
    label_smoothing: Annotated[float, _between(0, 1, high_open=True)]
    grad_clip: Annotated[float, _between(0, 1e6)]  # 0: off
    ema_decay: Annotated[float, _between(0, 1, high_open=True)]  # 0: off
    recompute_bn: bool
    recompute_bn_images: Annotated[int, _between(1, 10_000_000)] | None
    patience: Annotated[int, _between(1, 10_000)]
    balance: Literal["none", "loss_weights", "sampler"]
    mask_mode: Literal["none", "crop", "suppress"]
    mask_margin: Annotated[float, _between(0, 10)]
    suppress_strength: Share
    mask_guidance: Annotated[float, _between(0, 1000)]
    device: Annotated[str, StringConstraints(pattern=r"^(auto|cpu|mps|(cuda|xpu)(:\d{1,3})?)$")]
    amp: Switch
    channels_last: bool
    compile: bool
    num_workers: Annotated[int, _between(0, 256)] | Literal["auto"]
    in_memory_max_mb: Annotated[float, _between(0, 2**30)]
    seed: Seed
    temperature_scaling: bool
    distributed: Switch
    cell_fraction: Annotated[float, _between(0, 1, low_open=True)] | None
    stain_normalise: bool
    stain_jitter: Annotated[float, _between(0, 1, high_open=True)]
    blur_sigma: Annotated[float, _between(0, 100)]
    red_cell_crop: Annotated[float, _between(0, 100, low_open=True)] | None
    cell_stain_normalise: bool
    refit: bool
    resume: bool
    resume_every_s: Annotated[float, _between(0, 1e9)]


@with_config(_STRICT)
class Train(Recipe, total=False):
    # the recipe for a backbone without pretrained weights: these keys replace train's
    random_init: Recipe


def _check_heads(model: Model) -> Model:
    dim, heads = model.get("embed_dim", 256), model.get("heads", 4)
    if dim % heads:
        raise ValueError(f"embed_dim ({dim}) must be a multiple of heads ({heads})")
    return model


@with_config(_STRICT)
class Model(TypedDict, total=False):
    backbone: Required[Text]
    image_size: Required[Annotated[int, _between(16, 2048)]]
    pretrained: bool | Literal["if_available"]
    weights_file: Text | None
    embed_dim: Annotated[int, _between(1, 8192)]
    heads: Annotated[int, _between(1, 256)]
    depth: Annotated[int, _between(1, 64)]
    dropout: Annotated[float, _between(0, 1, high_open=True)]
    drop_path: Annotated[float, _between(0, 1, high_open=True)]
    output_stride: Literal[8, 16, 32]
    registers: Annotated[int, _between(0, 64)]


@with_config(_STRICT)
class Evaluate(TypedDict, total=False):
    batch_size: Annotated[int, _between(1, 65_536)]
    gradient_batch_size: Annotated[int, _between(1, 65_536)]
    tta: bool
    external: Text | Annotated[list[Text], Field(max_length=1000)]
    dataset: Text | None
    ignore_unknown_classes: bool
    strict_images: bool
    mistakes: Annotated[int, _between(0, 10_000)]
    abstain_target_accuracy: Annotated[float, _between(0, 1, low_open=True)] | None
    adapt: Annotated[dict[Name, Text], Field(max_length=1000)]


@with_config(_STRICT)
class Crossval(TypedDict, total=False):
    models: Annotated[list[Name], Field(max_length=1000)]


@with_config(_STRICT)
class Ensemble(TypedDict, total=False):
    members: Required[Annotated[list[Name], Field(min_length=1, max_length=1000)]]
    weighting: Literal["mean", "val_f1"]
    temperature_scaling: bool


@with_config(_STRICT)
class Compare(TypedDict, total=False):
    references: Annotated[dict[Text, Share], Field(max_length=1000)]


def _check_model_names(params: Params) -> Params:
    """Every model that ``ensemble`` and ``crossval`` name is an entry of ``models``."""
    named = {("ensemble.members", name) for name in params["ensemble"].get("members", [])}
    named |= {("crossval.models", name) for name in params["crossval"].get("models", [])}
    for key, name in sorted(named):
        if name not in params["models"]:
            raise ValueError(f"{key}: {name!r} is not an entry of models "
                             f"({', '.join(sorted(params['models']))})")
    return params


@with_config(_STRICT)
class Params(TypedDict):
    data: Data
    masks: Annotated[Masks, AfterValidator(_check_area_fractions)]
    split: Annotated[Split, AfterValidator(_check_split_shares)]
    train: Annotated[Train, AfterValidator(_check_train)]
    models: Annotated[dict[Name, Annotated[Model, AfterValidator(_check_heads)]],
                      Field(min_length=1, max_length=100)]
    evaluate: Evaluate
    crossval: Crossval
    ensemble: Ensemble
    compare: Compare


PARAMS_SCHEMA = TypeAdapter(Annotated[Params, AfterValidator(_check_model_names)])

# ----------------------------------------------------------------------------- reading the file


class _ParamsLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when there
    """Safe YAML that refuses repeated keys and reads ``1e-3`` as a number (YAML 1.2, as DVC
    writes it; PyYAML's YAML 1.1 reads it as a string). Aliases and nesting are checked before,
    on the event stream (:func:`_check_events`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key.value!r} appears twice", key.start_mark)
                seen.add(key.value)
        return super().construct_mapping(node, deep)


def _check_events(text: str) -> None:
    """Refuse aliases (a "billion laughs" expands exponentially wherever it is walked) and
    nesting deeper than ``MAX_NESTING``, before any node is built."""
    depth = 0
    for event in yaml.parse(text, Loader=_ParamsLoader):
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, f"an alias (*{event.anchor}) is not allowed in a params file",
                event.start_mark)
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_NESTING} levels deep", event.start_mark)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_params(path: str | Path) -> dict[str, Any]:
    """The parameters in ``path``, each key checked against :data:`PARAMS_SCHEMA`; any defect
    is a one-line :class:`ParamsError` naming the file and the key."""
    document = _read_yaml(Path(path))
    try:
        PARAMS_SCHEMA.validate_python(document)
    except ValidationError as error:
        raise ParamsError(describe(error, document, str(path))) from None
    return document


def _read_yaml(path: Path) -> Any:
    """The YAML document at ``path``: a regular file of at most ``MAX_PARAMS_BYTES``."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ParamsError(f"{path}: not a regular file")
        with open(path, "rb") as handle:
            data = handle.read(MAX_PARAMS_BYTES + 1)
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such file (run in the project's folder)") from None
    except OSError as error:
        raise ParamsError(f"{path}: cannot read it: {error.strerror or error}") from None
    if len(data) > MAX_PARAMS_BYTES:
        raise ParamsError(f"{path}: larger than {MAX_PARAMS_BYTES} bytes: not a params file")
    try:
        text = data.decode("utf-8")
        _check_events(text)
        return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 - a safe loader
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None) or type(error).__name__
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return " ".join(f"{problem}{where}".split())

# --------------------------------------------------------------------------- one-line messages


_MESSAGES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "string_too_long": "must be at most {max_length} characters",
    "string_pattern_mismatch": "must match {pattern}",
    "literal_error": "must be {expected}",
    "list_type": "must be a list",
    "dict_type": "must be a mapping of keys",
    "typed_dict_type": "must be a mapping of keys",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} items",
    "missing": "is missing",
    "value_error": "{error}",
}


def describe(error: ValidationError, document: Any, source: str) -> str:
    """One line for a failed validation: the file, the first bad key, what it must be and what
    it is (alternatives of a union joined by "or"), and how many other keys are bad. Unknown
    keys of one mapping are one problem, named together."""
    problems: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for item in error.errors():
        path = _document_path(item, document)
        if item["type"] == "extra_forbidden":
            path = (*path[:-1], "")
        problems.setdefault(path, []).append(item)
    path, items = next(iter(problems.items()))
    first = items[0]
    if first["type"] == "extra_forbidden":
        path = path[:-1]
        unknown = ", ".join(str(item["loc"][-1]) for item in items)
        what = f"unknown key(s) {unknown}; known: {', '.join(_known_keys(path))}"
    else:
        messages = list(dict.fromkeys(_message(item) for item in items))
        what = " or ".join([messages[0], *(m.removeprefix("must be ") for m in messages[1:])])
        if first["type"] != "missing" and not isinstance(first["input"], dict):
            what += f" (got {_shown(first['input'])})"
    where = f" {'.'.join(path)}" if path else ""
    more = f" (and {len(problems) - 1} more bad key(s))" if len(problems) > 1 else ""
    return " ".join(f"{source}{where}: {what}{more}".split())


def _message(item: dict[str, Any]) -> str:
    template = _MESSAGES.get(item["type"])
    if template is None:
        return item["msg"]
    context = dict(item.get("ctx", {}))
    context = {key: _number(value) for key, value in context.items()}
    if item["type"] == "string_pattern_mismatch" and "[A-Za-z0-9]" in str(context["pattern"]):
        return "must be a name of letters, digits, '_', '.' and '-'"
    return template.format(**context)


def _number(value: Any) -> Any:
    """A bound as people write it: 4294967295, not 4.294967295e9; 1e6 kept short."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    return value


def _document_path(item: dict[str, Any], document: Any) -> tuple[str, ...]:
    """The keys of the error's location that exist in ``document`` (pydantic adds union member
    tags and ``[key]`` after them), with a missing key as the last one."""
    path, node = [], document
    for part in item["loc"]:
        if not isinstance(node, dict | list) or part not in (
                node if isinstance(node, dict) else range(len(node))):
            break
        path.append(str(part))
        node = node[part]
    if item["type"] == "missing":
        path.append(str(item["loc"][-1]))
    return tuple(path)


def _known_keys(path: tuple[str, ...]) -> list[str]:
    """The keys the schema allows at ``path`` (a section, or a model entry)."""
    schema: Any = Params
    for part in path:
        if get_origin(schema) is dict:  # models: any name, each entry a Model
            schema = _unwrap(get_args(schema)[1])
        else:
            schema = _unwrap(get_type_hints(schema, include_extras=True)[part])
    return sorted(get_type_hints(schema))


def _unwrap(hint: Any) -> Any:
    """The class under ``Annotated``, ``Required``/``NotRequired`` and ``dict[...]`` values."""
    while get_origin(hint) in (Annotated, Required, NotRequired):
        hint = get_args(hint)[0]
    return hint


def _shown(value: Any, limit: int = 60) -> str:
    """A value as YAML writes it, cut to ``limit`` characters."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
    text = repr(value) if isinstance(value, str | int | float | list) else \
        f"a {type(value).__name__}: {value!r}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
