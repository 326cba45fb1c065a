"""Stage source (always run): the identity of ``data.source``'s content, for ``download``."""

import logging
import sys
from pathlib import Path

from pipeline.errors import run_entry_point
from pipeline.fingerprint import source_fingerprint
from pipeline.io import load_params, write_json


def main() -> None:
    data = load_params()["data"]
    write_json(Path("data/fingerprint.json"), source_fingerprint(data, Path(data["cache_dir"])))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_entry_point(main))
