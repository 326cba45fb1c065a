"""Stage split: leakage-safe stratified train/val/test lists in data/split.

It reads every ``split`` key but ``folds``: cross-validation folds are the ``folds`` stage's, so
that turning them on or off leaves data/split, and every model trained on it, untouched.
"""

import sys
from pathlib import Path

from pipeline.config import from_params
from pipeline.errors import run_entry_point
from pipeline.io import atomic_path, load_params, read_csv, write_csv, write_json
from pipeline.split import SplitConfig, split_dataset


def main() -> None:
    params = load_params()  # each key by name: dvc.yaml lists exactly these (DVC checks them)
    config = from_params(SplitConfig, {
        "val": params["split"]["val"], "test": params["split"]["test"],
        "seed": params["split"]["seed"],
        "near_duplicate_distance": params["split"]["near_duplicate_distance"],
        "original_id_pattern": params["split"]["original_id_pattern"]}, "split")
    manifest = read_csv("data/raw/manifest.csv")
    result = split_dataset(manifest, Path("data/raw/images"), config)
    with atomic_path("data/split") as out:
        for name, rows in result.parts.items():
            write_csv(out / f"{name}.csv", rows)
        write_json(out / "summary.json", result.summary)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
