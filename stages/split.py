"""Stage split: leakage-safe stratified train/val/test lists in data/split."""

import sys
from pathlib import Path

from pipeline.config import from_params
from pipeline.errors import run_entry_point
from pipeline.io import atomic_path, load_params, read_csv, write_csv, write_json
from pipeline.split import SplitConfig, split_dataset


def main() -> None:
    config = from_params(SplitConfig, load_params()["split"], "split")
    manifest = read_csv("data/raw/manifest.csv")
    result = split_dataset(manifest, Path("data/raw/images"), config)
    with atomic_path("data/split") as out:
        for folder, parts in [(out, result.parts)] + [
                (out / "folds" / str(fold), parts) for fold, parts in enumerate(result.folds)]:
            for name, rows in parts.items():
                write_csv(folder / f"{name}.csv", rows)
        write_json(out / "summary.json", result.summary)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
