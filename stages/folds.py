"""Stage folds: the cross-validation folds of ``split.folds`` (data/folds/K/{train,val,test}.csv),
dealt from data/split's images by their leakage groups; only data/folds/summary.json when off."""

import sys
from pathlib import Path

from pipeline.config import from_params
from pipeline.errors import run_entry_point
from pipeline.io import atomic_path, load_params, read_split, write_csv, write_json
from pipeline.split import PARTS, SplitConfig, fold_dataset, fold_summary

SPLIT_DIR, FOLDS_DIR = Path("data/split"), Path("data/folds")


def main() -> None:
    params = load_params()  # each key by name: dvc.yaml lists exactly these (DVC checks them)
    config = from_params(SplitConfig, {
        "folds": params["split"]["folds"], "val": params["split"]["val"],
        "seed": params["split"]["seed"]}, "split")
    fold_parts = fold_dataset({part: read_split(SPLIT_DIR, part) for part in PARTS}, config)
    with atomic_path(FOLDS_DIR) as out:
        for fold, parts in enumerate(fold_parts):
            for name, rows in parts.items():
                write_csv(out / str(fold) / f"{name}.csv", rows)
        write_json(out / "summary.json", fold_summary(fold_parts))


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
