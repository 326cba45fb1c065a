"""Stage evaluate@<model>: score a trained model on the test split (or evaluate.dataset).

``--fold K`` (stage cv_evaluate@<model>-<K>) scores cross-validation fold K's model on that
fold's test part (data/folds/K), into data/cv/MODEL/K/eval. Either way every set of
evaluate.external is scored too (``external/`` beside the test results; their quality figures
nested by set name under ``external`` in ``eval.json``); the ``external`` stage's fingerprint of
those sets reruns this stage when one changes.
"""

import argparse
import sys
from pathlib import Path

from pipeline.config import from_params
from pipeline.errors import run_entry_point
from pipeline.eval_sets import EvaluateConfig, evaluation_set, held_out_set
from pipeline.evaluate import evaluate_external, score_checkpoint
from pipeline.io import load_params
from pipeline.model_files import MODEL_FILE
from pipeline.reports import write_evaluation


def main(name: str, fold: int | None = None) -> None:
    config = from_params(EvaluateConfig, load_params()["evaluate"], "evaluate")
    images, masks = Path("data/raw/images"), Path("data/masks")
    if fold is None:
        split, model_dir = Path("data/split"), Path("data/models") / name
        out, metrics = Path("data/eval") / name, Path("metrics") / name / "eval.json"
        resources = Path("resources") / name / "eval.json"
        data = evaluation_set(config, split, images, masks)
    else:
        split = Path("data/folds") / str(fold)
        model_dir = Path("data/cv") / name / str(fold) / "train" / "model"
        out = Path("data/cv") / name / str(fold) / "eval"
        data = held_out_set(split, images, masks)
        metrics, resources = out / "eval.json", out / "resources.json"
    validation = held_out_set(split, images, masks, part="val")  # for the ensemble's temperature
    scored = score_checkpoint(model_dir / MODEL_FILE, data, config, validation)
    external = evaluate_external(model_dir / MODEL_FILE, config.external, config,
                                 out / "external")
    write_evaluation(scored, out, metrics, config, resources, raw_dir=Path("data/raw"),
                     external=external)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--fold", type=int, help="score this cross-validation fold's model")
    args = parser.parse_args()
    sys.exit(run_entry_point(main, args.model, args.fold))
