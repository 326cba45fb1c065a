"""Recipes under cross-validation, side by side and paired on the same images.

Each recipe is the ``data/crossval/<model>`` folder that ``crossval@<model>`` wrote (each
recipe in a clone of its own), every one on the same folds. One row per recipe: the folds'
accuracy mean ± std, the pooled out-of-fold accuracy with its 95% bootstrap interval, balanced
accuracy, per-class recall, and on each external set (``evaluate.external``) the fold models'
averaged probabilities. Every recipe after the first is paired with the first on the same
out-of-fold images (accuracy difference, bootstrap interval over images, images only one of
them gets right): the comparison that chooses. The external sets are paired the same way and
reported, never to choose with.

A recipe given as ``NAME=FOLDER+FOLDER...`` is the ensemble of those recipes as
``ensemble.weighting: mean`` serves it: each image's probabilities (each member's own
temperature) averaged with equal weights, out of fold and on every external set all members
scored. It fits nothing, so it needs no validation predictions and stays fair to members that
trained on their validation images (``train.refit``).

A recipe run several times (other seeds, one CPU) is given as ``NAME=RUN,RUN...``, each run a
folder or a ``+`` ensemble. Its runs are not averaged into an ensemble: each image counts by the
share of the runs that get it right, so that a pairing with another recipe holds the runs' spread
as well as the images' (a bootstrap over images of one run each cannot).

``--level`` adds each paired difference's interval at another level beside the 95% one, for a
rule that decides at, e.g., a Bonferroni level over several looks at one question (0.9875 for
four): ``ci_level`` in the JSON, after the 95% interval in the table.

    python -m bench.cv_compare default=../cv-default/data/crossval/efficientnet_lite0_attention \\
        refit=../cv-refit/data/crossval/efficientnet_lite0_attention [--json /tmp/compare.json]
    python -m bench.cv_compare lite0=../cv-lite0/data/crossval/efficientnet_lite0_attention \\
        both=../cv-lite0/data/crossval/efficientnet_lite0_attention+../cv-lite1/data/crossval/...
    python -m bench.cv_compare base=../seed0/data/crossval/M,../seed1/data/crossval/M \\
        new=../new0/data/crossval/M,../new1/data/crossval/M --level 0.9875
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.crossval import (
    average_predictions,
    correct_by_image,
    paired_on_images,
    probability_classes,
    read_predictions,
    same_images,
    score_predictions,
)
from pipeline.errors import InputError, run_entry_point
from pipeline.metrics_ci import bootstrap_intervals, mean_interval


def scored(predictions: pd.DataFrame) -> dict[str, Any]:
    """Accuracy, balanced accuracy, their intervals, per-class recall (None for a class with no
    images: balanced accuracy leaves it out too) and the count right."""
    labels, probabilities, headline, per_class = score_predictions(
        predictions, probability_classes(predictions))
    predicted = probabilities.argmax(1)
    return {"accuracy": headline["accuracy"], "balanced_accuracy": headline["balanced_accuracy"],
            "ci95": bootstrap_intervals(labels, predicted),
            "right": int((labels == predicted).sum()), "images": len(labels),
            "recall": {row["class"]: row["recall"] if row["support"] else None
                       for row in per_class}}


Predictions = tuple[pd.DataFrame, dict[str, pd.DataFrame]]  # out of fold; external by set name
Shares = tuple[pd.Series, dict[str, pd.Series]]  # per image, the share of runs right: the same
Run = list[Path]  # a crossval output folder, or the folders of an equal-weight ensemble


def run_predictions(folders: Run) -> Predictions:
    """A run's out-of-fold predictions and each external set's fold-averaged predictions, each
    read once; several folders (crossval outputs) make their equal-weight ensemble."""
    read = [_crossval_predictions(folder) for folder in folders]
    if len(read) == 1:
        return read[0]
    names = "+".join(map(str, folders))
    shared = sorted(set.intersection(*(set(external) for _, external in read)))
    return (average_predictions([oof for oof, _ in read], f"{names}, out of fold"),
            {name: average_predictions([external[name] for _, external in read],
                                       f"{names}, {name}")
             for name in shared})


def _crossval_predictions(folder: Path) -> Predictions:
    if not (folder / "folds.csv").is_file():
        raise InputError(f"{folder / 'folds.csv'} is missing: is {folder} a crossval@<model> "
                         f"output?")
    externals = sorted((folder / "external").glob("*/fold_average_predictions.csv"))
    return (read_predictions(folder / "out_of_fold_predictions.csv"),
            {path.parent.name: read_predictions(path) for path in externals})


def shares_right(runs: list[Predictions], name: str) -> Shares:
    """Per image, the share of a recipe's runs that get it right (0 or 1 for one run), out of
    fold and on each external set every run scored; runs on other images or folds are a one-line
    error."""
    def share(frames: list[pd.DataFrame], what: str) -> pd.Series:
        right = [correct_by_image(frame) for frame in frames]
        if not all(same_images(r, right[0]) for r in right[1:]):
            raise InputError(f"{name}, {what}: its runs were not scored on the same images; "
                             f"compare runs on the same folds")
        return pd.concat([r.reindex(right[0].index) for r in right], axis=1).mean(axis=1)
    shared = sorted(set.intersection(*(set(external) for _, external in runs)))
    out_of_fold = share([oof for oof, _ in runs], "out of fold")
    if len(runs) > 1:
        _check_same_folds([oof for oof, _ in runs], name)
    return (out_of_fold,
            {set_name: share([external[set_name] for _, external in runs], set_name)
             for set_name in shared})


def _check_same_folds(out_of_fold: list[pd.DataFrame], name: str) -> None:
    """A one-line error unless every run of a recipe put each image in the same fold: the
    recipe's fold spread is read from its first run's folds."""
    folds = [image_folds(frame).astype(str) for frame in out_of_fold]
    if not all(other.reindex(folds[0].index).equals(folds[0]) for other in folds[1:]):
        raise InputError(f"{name}: its runs put the images in other folds; compare runs of one "
                         f"recipe on the same folds (split.folds, split.seed)")


def recipe_summary(runs: list[Run], predictions: list[Predictions], shares: Shares
                   ) -> dict[str, Any]:
    """One recipe's row: fold spread, out-of-fold and external scores. A recipe run several
    times is scored by each image's share of runs right, with each run's accuracy beside it."""
    folder = ",".join("+".join(map(str, run)) for run in runs)
    if len(runs) == 1:
        (out_of_fold, external), = predictions
        folds = fold_accuracy(out_of_fold)
        return {"folder": folder, "folds": len(folds),
                "fold_accuracy": {"mean": float(folds.mean()), "std": float(folds.std(ddof=1))},
                "out_of_fold": scored(out_of_fold),
                "external": {name: scored(frame) for name, frame in external.items()}}
    oof_share, external_shares = shares
    folds = oof_share.groupby(_by_path(predictions[0][0], "fold", oof_share)).mean()
    return {"folder": folder, "runs": len(runs), "folds": len(folds),
            "fold_accuracy": {"mean": float(folds.mean()), "std": float(folds.std(ddof=1))},
            "out_of_fold": scored_shares(oof_share, predictions[0][0]) | {
                "run_accuracy": [float(correct_by_image(oof).mean()) for oof, _ in predictions]},
            "external": {name: scored_shares(share, predictions[0][1][name])
                         for name, share in external_shares.items()}}


def scored_shares(share: pd.Series, predictions: pd.DataFrame) -> dict[str, Any]:
    """Accuracy (the mean share of runs right) with its bootstrap interval over images, balanced
    accuracy, per-class recall (None for a class with no images) and the runs' mean count right;
    ``predictions`` (one run's) gives the labels and classes."""
    labels = _by_path(predictions, "label", share).astype(str)
    recall = share.groupby(labels).mean()
    return {"accuracy": float(share.mean()), "balanced_accuracy": float(recall.mean()),
            "ci95": {"accuracy": mean_interval(share.to_numpy())},
            "right": float(share.sum()), "images": len(share),
            "recall": {name: float(recall[name]) if name in recall else None
                       for name in probability_classes(predictions)}}


def _by_path(predictions: pd.DataFrame, column: str, share: pd.Series) -> np.ndarray:
    """``column`` of ``predictions`` in the order of ``share``'s images."""
    return predictions.set_index("path")[column].reindex(share.index).to_numpy()


def fold_accuracy(out_of_fold: pd.DataFrame) -> pd.Series:
    """Each fold's accuracy, from the pooled out-of-fold predictions' ``fold`` column."""
    return correct_by_image(out_of_fold).groupby(image_folds(out_of_fold).to_numpy()).mean()


def image_folds(out_of_fold: pd.DataFrame) -> pd.Series:
    """Each image's fold (indexed by path, in the predictions' order); a one-line error for
    predictions without a fold column."""
    if "fold" not in out_of_fold.columns:
        raise InputError("out-of-fold predictions without a fold column: written by an older "
                         "crossval stage? Rerun crossval@<model>")
    return out_of_fold.set_index("path")["fold"]


def paired_with_reference(reference: Shares, other: Shares, names: tuple[str, str],
                          level: float | None = None) -> dict[str, Any]:
    """``other`` minus ``reference`` on the out-of-fold images and on each external set both
    scored, with the images ``other`` (``only_this_right``) and ``reference``
    (``only_reference_right``) get right more often (``names``: the two recipes', for errors);
    with ``level``, the interval at that level too (``ci_level``)."""
    def paired(first: pd.Series, second: pd.Series, what: str) -> dict[str, Any]:
        label = f"{what}: {names[1]} against {names[0]}"
        pair = paired_on_images(first, second, label)
        result = {"difference": pair["difference"], "ci95": pair["ci95"],
                  "only_this_right": pair["only_first_right"],
                  "only_reference_right": pair["only_second_right"]}
        if level is not None:
            interval = paired_on_images(first, second, label, level)["ci95"]
            result["ci_level"] = {"level": level, "interval": interval}
        return result
    (reference_oof, reference_external), (other_oof, other_external) = reference, other
    return {"out_of_fold": paired(other_oof, reference_oof, "out of fold")} | {
        name: paired(other_external[name], reference_external[name], name)
        for name in sorted(set(reference_external) & set(other_external))}


def markdown(summaries: dict[str, dict[str, Any]], paired: dict[str, dict[str, Any]]) -> str:
    """The recipes as a Markdown table, paired differences in the last columns."""
    first = next(iter(summaries.values()))
    classes, externals = list(first["out_of_fold"]["recall"]), list(first["external"])
    header = (["recipe", "fold acc. mean ± std", "out-of-fold acc. [95% CI]", "bal. acc."]
              + [f"recall {c}" for c in classes]
              + [f"{e} acc. [95% CI] (bal.)" for e in externals]
              + ["Δ out-of-fold vs first [95% CI] (won/lost)"]
              + [f"Δ {e} vs first" for e in externals])
    rows = [_row(name, summary, paired.get(name, {}), classes, externals)
            for name, summary in summaries.items()]
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _row(name: str, summary: dict[str, Any], pairs: dict[str, Any], classes: list[str],
         externals: list[str]) -> list[str]:
    spread, oof = summary["fold_accuracy"], summary["out_of_fold"]
    external = [f"{_with_interval(summary['external'][e])} "
                f"({summary['external'][e]['balanced_accuracy']:.4f})"
                if e in summary["external"] else "-" for e in externals]
    return ([name, f"{spread['mean']:.3f} ± {spread['std']:.3f}", _with_interval(oof),
             f"{oof['balanced_accuracy']:.3f}"]
            + ["-" if oof["recall"][c] is None else f"{oof['recall'][c]:.3f}" for c in classes]
            + external
            + [_difference(pairs.get(key)) for key in ["out_of_fold", *externals]])


def _with_interval(score: dict[str, Any]) -> str:
    low, high = score["ci95"]["accuracy"]
    right = f"{score['right']:.6g}"  # a mean count for a recipe run several times: 1504.67
    return f"{score['accuracy']:.4f} [{low:.3f}, {high:.3f}] ({right}/{score['images']})"


def _difference(pair: dict[str, Any] | None) -> str:
    if pair is None:
        return "-"
    low, high = pair["ci95"]
    text = (f"{pair['difference']:+.3f} [{low:+.3f}, {high:+.3f}] "
            f"({pair['only_this_right']}/{pair['only_reference_right']})")
    if "ci_level" in pair:
        low, high = pair["ci_level"]["interval"]
        text += f"; {pair['ci_level']['level']:.2%}: [{low:+.3f}, {high:+.3f}]"
    return text


def parse_recipe(text: str) -> tuple[str, list[Run]]:
    """``NAME=FOLDER``, ``NAME=FOLDER+FOLDER...`` (an equal-weight ensemble), or runs of one
    recipe separated by commas (``NAME=FOLDER,FOLDER``, each run a folder or an ensemble)."""
    name, separator, runs = text.partition("=")
    if not separator or not name or any("" in run.split("+") for run in runs.split(",")):
        raise InputError(f"{text!r}: give each recipe as NAME=FOLDER (a crossval output folder), "
                         f"NAME=FOLDER+FOLDER (their ensemble) or NAME=RUN,RUN (runs of one "
                         f"recipe)")
    return name, [[Path(folder) for folder in run.split("+")] for run in runs.split(",")]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", metavar="NAME=FOLDER[+FOLDER...][,RUN...]",
                        help="crossval@<model> output folders (+: their equal-weight ensemble; "
                             ",: runs of one recipe); the first is the reference")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the figures here (nothing is written without it)")
    parser.add_argument("--level", type=float, default=None,
                        help="also give each paired difference's interval at this level, in "
                             "(0, 1): e.g. 0.9875, a Bonferroni level over four looks")
    args = parser.parse_args(argv)
    if args.level is not None and not 0 < args.level < 1:
        raise InputError(f"--level {args.level}: give a confidence level between 0 and 1, e.g. "
                         f"0.9875")
    recipes = dict(parse_recipe(text) for text in args.recipes)
    if len(recipes) != len(args.recipes):
        raise InputError("two recipes share a name: give each its own NAME=")
    predictions = {name: [run_predictions(run) for run in runs] for name, runs in recipes.items()}
    shares = {name: shares_right(runs, name) for name, runs in predictions.items()}
    first, *others = recipes
    paired = {name: paired_with_reference(shares[first], shares[name], (first, name), args.level)
              for name in others}  # before scoring: runs on other images stop here, in one line
    summaries = {name: recipe_summary(recipes[name], predictions[name], shares[name])
                 for name in recipes}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"recipes": summaries, "paired_with_first": paired},
                                        indent=2) + "\n")
    print(markdown(summaries, paired))


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
