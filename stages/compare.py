"""Stage compare: every evaluated model side by side (metrics/summary.json, reports/)."""

import logging
import sys
from pathlib import Path

from pipeline.compare import CompareConfig, compare
from pipeline.errors import run_entry_point
from pipeline.io import load_params, read_json


def main() -> None:
    config = CompareConfig(**load_params()["compare"])
    compare(Path("data/eval"), config, Path("metrics/summary.json"), Path("reports"),
            read_json(Path("data/raw/source.json")))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_entry_point(main))
