"""Stage source (always run): the identity of ``data.source``'s content, for ``download``."""

import sys
from pathlib import Path

from pipeline.config import from_params
from pipeline.errors import run_entry_point
from pipeline.fingerprint import source_fingerprint
from pipeline.io import load_params, write_json
from pipeline.sources import DataConfig


def main() -> None:
    data = from_params(DataConfig, load_params()["data"], "data")
    write_json(Path("data/fingerprint.json"), source_fingerprint(data, Path(data.cache_dir)))


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
