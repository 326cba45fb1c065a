"""Apply recipe files with ``dvc exp run``: ``python -m recipes NAME [NAME...] [options]``.

A recipe (``recipes/<name>.yaml``, or any YAML file given by path) holds ``about`` (one line),
``targets`` (the stages to run, e.g. ``evaluate@efficientnet_lite0_attention``; ``[]``: all),
``params``: only the ``params.yaml`` keys it changes, nested as in ``params.yaml``, and
optionally ``copies`` (``new_model: existing_model``): a new ``models`` entry that starts as a
copy of an existing one as the recipes leave it, under the keys ``params`` gives it. Several
recipes compose in order (a later one wins on a key; targets add up), so a data recipe takes a
modifier: ``python -m recipes pbc-1560 ensemble``. The command is one experiment::

    dvc exp run <targets> -S ++key=value ... -m "recipes: pbc-1560 + ensemble"

so the experiment's ``params.yaml`` holds every value it ran with (``dvc params diff``,
``dvc exp show``). Every key must be one of ``params.yaml`` (a new ``models`` entry must have
the keys of the existing ones), every value must pass ``params.yaml``'s schema, and every target
must be a stage of ``dvc.yaml``: a typo is a one-line error before DVC starts.

Options: ``--holdout DIR`` (repeatable) keeps a labelled set out of training and scores it
(``data.exclude`` and ``evaluate.external``); ``-S key=value`` is passed on after the recipes'
values; ``--dry``, ``--queue`` are ``dvc exp run``'s; ``--print`` prints the command and runs
nothing; without a recipe name, the recipes are listed.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.errors import PipelineError, run_entry_point
from pipeline.params_schema import PARAMS_SCHEMA, describe, read_params

RECIPES = Path(__file__).resolve().parent
ROOT = RECIPES.parent
FIELDS = {"about", "targets", "params"}
OPTIONAL_FIELDS = {"copies"}
# Strings the override grammar reads as themselves unquoted; others are quoted.
PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
KEYWORDS = {"true", "false", "null", "nan", "inf"}
BACKSLASHES = re.compile(r"\\+(?='|\$\{|$)")  # runs the override grammar reads as escapes


class RecipeError(PipelineError, ValueError):
    """A recipe that cannot be applied: unknown name, key or stage, or a malformed file."""


def recipe_path(name: str) -> Path:
    """The file of a recipe given by name (``recipes/<name>.yaml``) or by path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RecipeError(f"recipe file {name} does not exist")
        return path
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        raise RecipeError(f"no recipe {name!r}; known: {', '.join(available())}")
    return path


def available() -> list[str]:
    """The names of the recipes under ``recipes/``."""
    return sorted(path.stem for path in RECIPES.glob("*.yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """A recipe's fields, checked for shape (not yet against ``params.yaml``)."""
    path = recipe_path(name)
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path}: not valid YAML ({error.__class__.__name__})") from error
    if not isinstance(recipe, dict) or not FIELDS <= set(recipe) <= FIELDS | OPTIONAL_FIELDS:
        raise RecipeError(f"recipe {path}: must be a mapping of {', '.join(sorted(FIELDS))} "
                          f"(and optionally {', '.join(sorted(OPTIONAL_FIELDS))})")
    recipe.setdefault("copies", {})
    if not all(isinstance(recipe[key], dict) for key in ("params", "copies")) \
            or not isinstance(recipe["targets"], list):
        raise RecipeError(f"recipe {path}: params and copies must be mappings, targets a list")
    return recipe


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, mappings merged key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def compose(names: Sequence[str], holdout: Sequence[str] = ()
            ) -> tuple[list[str], dict[str, Any], dict[str, str]]:
    """The targets, params and model copies of ``names`` applied in order, then of ``holdout``
    sets."""
    targets: list[str] = []
    params: dict[str, Any] = {}
    copies: dict[str, str] = {}
    for name in names:
        recipe = load_recipe(name)
        targets += [target for target in recipe["targets"] if target not in targets]
        params = merge(params, recipe["params"])
        copies |= recipe["copies"]
    if holdout:
        params = merge(params, {"data": {"exclude": list(holdout)},
                                "evaluate": {"external": list(holdout)}})
    return targets, params, copies


def add_copies(changes: dict[str, Any], copies: Mapping[str, str], params: Mapping[str, Any]
               ) -> dict[str, Any]:
    """``changes`` with each new model of ``copies`` (``new: existing``) in full: the existing
    entry as the recipes leave it, under the new entry's own keys."""
    models = merge(params["models"], changes.get("models", {}))
    for new, existing in copies.items():
        if new in params["models"] or existing not in models:
            raise RecipeError(f"copies: {new}: {existing} must be a model of params.yaml and "
                              f"{new} a new one")
        own = changes.get("models", {}).get(new, {})
        if unknown := sorted(set(own) - set(models[existing])):
            raise RecipeError(f"models.{new}: unknown key(s) {', '.join(unknown)}")
        changes = merge(changes, {"models": {new: merge(models[existing], own)}})
    return changes


def check_keys(changes: Mapping[str, Any], params: Mapping[str, Any], where: str = "") -> None:
    """Refuse a key of ``changes`` that ``params`` does not have, except a new ``models`` entry
    with exactly the keys of the existing ones (:func:`add_copies` makes them)."""
    for key, value in changes.items():
        name = f"{where}{key}"
        if where == "models." and key not in params:
            expected = set(next(iter(params.values())))
            if not isinstance(value, Mapping) or set(value) != expected:
                raise RecipeError(f"new model {name} must set exactly: "
                                  f"{', '.join(sorted(expected))}")
            continue
        if key not in params:
            raise RecipeError(f"{name} is no key of params.yaml")
        current = params[key]
        if isinstance(value, Mapping):
            if not isinstance(current, Mapping):
                raise RecipeError(f"{name} is a single value in params.yaml, not a mapping")
            if current:  # {} (evaluate.adapt) takes any keys
                check_keys(value, current, f"{name}.")


def stage_names(params: Mapping[str, Any], dvc_yaml: Path) -> set[str]:
    """The stages of ``dvc_yaml`` a recipe may target: single stages, and ``<stage>@<model>``
    for each model of a stage repeated ``foreach: ${models}`` (the per-model stages)."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    names = set()
    for name, stage in stages.items():
        if stage.get("foreach") == "${models}":
            names |= {f"{name}@{model}" for model in params["models"]}
        elif "foreach" not in stage and "matrix" not in stage:
            names.add(name)
    return names


def check_targets(targets: Sequence[str], params: Mapping[str, Any], dvc_yaml: Path) -> None:
    """Refuse a target that is no stage of ``dvc.yaml`` once the recipes are applied."""
    known = stage_names(params, dvc_yaml)
    if unknown := [target for target in targets if target not in known]:
        raise RecipeError(f"target {unknown[0]!r} is no stage of dvc.yaml; known: "
                          f"{', '.join(sorted(known))}")


def override_value(value: Any) -> str:
    """``value`` in the override grammar ``dvc exp run -S`` parses (Hydra's)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str) and PLAIN.fullmatch(value) and value.lower() not in KEYWORDS:
        return value
    if isinstance(value, str):  # backslashes doubled only before a quote or the end; ${ literal
        escaped = BACKSLASHES.sub(lambda run: run[0] * 2, value).replace("'", "\\'")
        return "'" + escaped.replace("${", "\\${") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    raise RecipeError(f"cannot pass {value!r} to dvc exp run -S")


def overrides(params: Mapping[str, Any], where: str = "") -> list[str]:
    """One ``-S`` value per leaf: ``++`` sets a key whether or not ``params.yaml`` has it (a new
    model entry, a key of ``evaluate.adapt``), which :func:`check_keys` has vetted."""
    found = []
    for key, value in params.items():
        if isinstance(value, Mapping):
            found += overrides(value, f"{where}{key}.")
        else:
            found.append(f"++{where}{key}={override_value(value)}")
    return found


def command(names: Sequence[str], holdout: Sequence[str] = (), extra: Sequence[str] = (),
            params_file: Path = ROOT / "params.yaml") -> list[str]:
    """The ``dvc exp run`` command that applies ``names``, checked against ``params_file``."""
    targets, changes, copies = compose(names, holdout)
    params = read_params(params_file)
    changes = add_copies(changes, copies, params)
    check_keys(changes, params)
    applied = merge(params, changes)
    try:
        PARAMS_SCHEMA.validate_python(applied)
    except ValidationError as error:
        raise RecipeError(describe(error, applied, f"recipe {' + '.join(names)}:")) from None
    check_targets(targets, applied, params_file.with_name("dvc.yaml"))
    settings = [part for item in overrides(changes) for part in ("-S", item)]
    message = "recipes: " + " + ".join(Path(name).stem for name in names)
    return ["dvc", "exp", "run", *targets, *settings, "-m", message, *extra]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes", description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="*", help="recipe names (recipes/) or YAML files")
    parser.add_argument("--holdout", action="append", default=[], metavar="DIR",
                        help="a labelled set to keep out of training and to score")
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                        help="passed on to dvc exp run after the recipes' values")
    parser.add_argument("--dry", action="store_true", help="dvc exp run --dry")
    parser.add_argument("--queue", action="store_true", help="dvc exp run --queue")
    parser.add_argument("--print", action="store_true", help="print the command, run nothing")
    args = parser.parse_args(argv)
    if not args.recipes:
        for name in available():
            print(f"{name:10} {load_recipe(name)['about']}")
        return 0
    extra = [part for item in args.set_param for part in ("-S", item)]
    extra += ["--dry"] * args.dry + ["--queue"] * args.queue
    dvc = command(args.recipes, args.holdout, extra)
    print(shlex.join(dvc), file=sys.stderr)
    if args.print:
        return 0
    return subprocess.run([sys.executable, "-m", *dvc], cwd=ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
