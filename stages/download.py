"""Stage download: fetch or generate ``data.source`` and ingest it into data/raw."""

import sys
from pathlib import Path

from pipeline.config import from_params
from pipeline.errors import run_entry_point
from pipeline.io import load_params
from pipeline.sources import DataConfig, build_raw_dataset


def main() -> None:
    data = from_params(DataConfig, load_params()["data"], "data")
    build_raw_dataset(data, Path("data/raw"), Path(data.cache_dir))


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
