"""Stage compare: every evaluated model side by side (metrics/summary.json, reports/)."""

import sys
from pathlib import Path

from pipeline.compare import CompareConfig, compare
from pipeline.config import from_params
from pipeline.errors import run_entry_point
from pipeline.io import load_params, read_json


def main() -> None:
    config = from_params(CompareConfig, load_params()["compare"], "compare")
    compare(Path("data/eval"), config, Path("metrics/summary.json"), Path("reports"),
            read_json(Path("data/raw/source.json")))


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
