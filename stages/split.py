"""Stage split: leakage-safe stratified train/val/test lists in data/split."""

import logging
import sys
from pathlib import Path

import pandas as pd

from pipeline.errors import run_entry_point
from pipeline.io import atomic_path, load_params, write_csv, write_json
from pipeline.split import SplitError, split_dataset


def main() -> None:
    settings = load_params()["split"]
    manifest = pd.read_csv("data/raw/manifest.csv", keep_default_na=False)
    try:
        result = split_dataset(manifest, Path("data/raw/images"), settings)
    except SplitError as error:
        sys.exit(f"split: {error}")
    with atomic_path("data/split") as out:
        for folder, parts in [(out, result.parts)] + [
                (out / "folds" / str(fold), parts) for fold, parts in enumerate(result.folds)]:
            for name, rows in parts.items():
                write_csv(folder / f"{name}.csv", rows)
        write_json(out / "summary.json", result.summary)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_entry_point(main))
