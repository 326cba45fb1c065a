"""An ensemble under cross-validation: is it better than its members on every image once?

Run after ``dvc repro crossval@A crossval@B ...`` (``split.folds`` set, the members in
``crossval.models``): every fold then holds each member's evaluation (``data/cv/<model>/<k>/eval``,
with its test and validation probabilities). Each fold's ensemble is built as the ``ensemble``
stage builds it (``ensemble.weighting`` by the members' validation macro-F1 of that fold, a
temperature fitted on that fold's validation part), evaluated, and the folds are aggregated like
``crossval@<model>``. The ensemble is then paired with each member on the same out-of-fold images
(bootstrap over images of the accuracy difference), which is what choosing between them needs.
The sets of ``evaluate.external`` that the members' fold models scored are averaged the same way
(reported in ``external``, never used to choose). ``<out>/ensemble.json`` serves what their
``fold_average`` scores: an ensemble of the fold ensembles (``<out>/<k>/ensemble.json``, each with
its own weights and temperature), equally weighted, for ``wbc predict`` and ``wbc evaluate``.

    python -m bench.cv_ensemble efficientnet_lite0_attention efficientnet_lite1_attention \\
        [--out .cache/cv_ensemble] [--json bench/cv_ensemble.json] \\
        [--pair-with <another recipe's out_of_fold_predictions.csv> ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from pipeline.config import from_params
from pipeline.crossval import (
    aggregate_folds,
    correct_by_image,
    paired_on_images,
    read_predictions,
)
from pipeline.ensemble import (
    EnsembleConfig,
    combine_evaluations,
    combine_external,
    member_weights,
)
from pipeline.errors import InputError, run_entry_point
from pipeline.evaluate import (
    EvaluateConfig,
    held_out_set,
    score_external_sets,
    write_evaluation,
)
from pipeline.io import load_params, read_csv, read_json
from pipeline.model_files import MODEL_FILE, write_fold_average, write_spec
from pipeline.split import fold_count

CV, SPLIT = Path("data/cv"), Path("data/folds")
IMAGES, MASKS = Path("data/raw/images"), Path("data/masks")


def fold_ensemble(members: list[str], fold: int, weighting: str, config: EvaluateConfig,
                  out_dir: Path) -> dict[str, float]:
    """The ensemble of ``members``' evaluations of ``fold``, written to ``out_dir``; its weights."""
    val_f1 = {m: read_json(CV / m / str(fold) / "train" / "train.json")["val_macro_f1"]
              for m in members}
    weights = member_weights(EnsembleConfig(tuple(members), weighting), val_f1)
    split = SPLIT / str(fold)
    scored = combine_evaluations({m: CV / m / str(fold) / "eval" for m in members}, weights,
                                 held_out_set(split, IMAGES, MASKS),
                                 held_out_set(split, IMAGES, MASKS, part="val"))
    external = score_external_sets(  # what the members' fold evaluations scored
        lambda name, data, _adapt_on: combine_external(
            {m: CV / m / str(fold) / "eval" / "external" / name for m in members}, weights,
            data, scored.temperature, config.ignore_unknown_classes),
        config.external, config, out_dir / "external")
    write_evaluation(scored, out_dir, out_dir / "eval.json", config, out_dir / "resources.json",
                     external=external)
    write_spec(out_dir / "ensemble.json",
               {m: CV / m / str(fold) / "train" / "model" / MODEL_FILE for m in members}, weights,
               scored.temperature)
    return weights | {"temperature": scored.temperature}


def checked_inputs(members: list[str], folds: int, pair_with: list[Path]
                   ) -> dict[str, pd.DataFrame]:
    """Refuse, before anything is written, members that were not cross-validated on every fold
    and predictions that cannot be paired; return the out-of-fold predictions to pair with."""
    if len(set(members)) < 2 or len(set(members)) != len(members):
        raise InputError("an ensemble needs two different members or more: "
                         + " ".join(members))
    if folds == 0:
        raise InputError("split.folds is empty: cross-validate the members first")
    for member in members:
        for fold in range(folds):
            for needed in (CV / member / str(fold) / "train" / "train.json",
                           CV / member / str(fold) / "eval" / "predictions.csv"):
                if not needed.is_file():
                    raise InputError(f"{needed} is missing: run dvc repro crossval@{member} "
                                     f"with these split.folds first")
    others = {member: Path("data/crossval") / member / "out_of_fold_predictions.csv"
              for member in members} | {str(path): path for path in pair_with}
    frames = {name: read_predictions(path) for name, path in others.items()}
    images = set(frames[members[0]]["path"])
    for name, frame in frames.items():
        if set(frame["path"]) != images:
            raise InputError(f"{name}: not scored on the same images as {members[0]} out of "
                             f"fold; pair recipes cross-validated on the same folds")
    return frames


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("members", nargs="+", help="models cross-validated by crossval@<model>")
    parser.add_argument("--out", type=Path, default=Path(".cache/cv_ensemble"))
    parser.add_argument("--json", type=Path, default=Path("bench/cv_ensemble.json"))
    parser.add_argument("--pair-with", type=Path, nargs="*", default=[],
                        help="other recipes' out_of_fold_predictions.csv to pair with")
    args = parser.parse_args(argv)
    params = load_params()
    config = from_params(EvaluateConfig, params["evaluate"], "evaluate")
    folds = fold_count(params["split"]["folds"])
    others = checked_inputs(args.members, folds, args.pair_with)
    weights = [fold_ensemble(args.members, fold, params["ensemble"]["weighting"], config,
                             args.out / str(fold)) for fold in range(folds)]
    write_fold_average(args.out / "ensemble.json",  # what the external sets' fold_average scores
                       [args.out / str(fold) / "ensemble.json" for fold in range(folds)])
    summary = aggregate_folds("ensemble of " + " + ".join(args.members),
                              [args.out / str(fold) for fold in range(folds)],
                              args.out / "aggregate", args.out / "cv.json")
    pooled = correct_by_image(read_csv(args.out / "aggregate" / "out_of_fold_predictions.csv"))
    summary |= {"fold_weights": weights, "paired": {  # first: the ensemble, second: the other
        name: paired_on_images(pooled, correct_by_image(frame), name)
        for name, frame in others.items()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("mean", "std", "out_of_fold_ci95", "paired")},
                     indent=2))


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
