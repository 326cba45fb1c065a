"""Stage crossval@<model>: mean, spread and pooled out-of-fold metrics over the folds."""

import sys
from pathlib import Path

from pipeline.crossval import aggregate_folds
from pipeline.errors import run_entry_point
from pipeline.io import load_params
from pipeline.split import fold_count


def main(name: str) -> None:
    folds = fold_count(load_params()["split"]["folds"])
    aggregate_folds(name, [Path("data/cv") / name / str(fold) / "eval" for fold in range(folds)],
                    Path("data/crossval") / name, Path("metrics") / name / "cv.json")


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1]))
