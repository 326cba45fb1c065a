"""Stage download: fetch or generate ``data.source`` and ingest it into data/raw."""

import logging
import sys
from pathlib import Path

from pipeline.archive import ArchiveError
from pipeline.io import load_params
from pipeline.layout import LayoutError
from pipeline.sources import SourceError, build_raw_dataset


def main() -> None:
    data = load_params()["data"]
    try:
        build_raw_dataset(data, Path("data/raw"), Path(data["cache_dir"]))
    except (SourceError, LayoutError, ArchiveError) as error:
        sys.exit(f"download: {error}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
