"""Stage crossval@<model>: mean, spread and pooled out-of-fold metrics over the folds, and the
fold models as one ensemble (``data/crossval/<model>/ensemble.json``, equal weights) for
``wbc predict``: what the external sets' ``fold_average`` figures score."""

import argparse
import sys
from pathlib import Path

from pipeline.crossval import aggregate_folds
from pipeline.errors import run_entry_point
from pipeline.io import load_params
from pipeline.model_files import MODEL_FILE, write_fold_average
from pipeline.split import fold_count


def main(name: str) -> None:
    folds = range(fold_count(load_params()["split"]["folds"]))
    fold_dirs = [Path("data/cv") / name / str(fold) for fold in folds]
    out = Path("data/crossval") / name
    aggregate_folds(name, [folder / "eval" for folder in fold_dirs], out,
                    Path("metrics") / name / "cv.json")
    write_fold_average(out / "ensemble.json",
                       [folder / "train" / "model" / MODEL_FILE for folder in fold_dirs])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a model of params.yaml crossval.models")
    sys.exit(run_entry_point(main, parser.parse_args().model))
