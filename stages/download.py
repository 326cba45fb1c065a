"""Stage download: fetch or generate ``data.source`` and ingest it into data/raw."""

import logging
import sys
from pathlib import Path

from pipeline.errors import run_entry_point
from pipeline.io import load_params
from pipeline.sources import build_raw_dataset


def main() -> None:
    data = load_params()["data"]
    build_raw_dataset(data, Path("data/raw"), Path(data["cache_dir"]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_entry_point(main))
