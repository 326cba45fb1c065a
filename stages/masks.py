"""Stage masks: a GrabCut + morphology mask for every image of data/raw."""

import sys
from pathlib import Path

from pipeline.config import from_params
from pipeline.errors import run_entry_point
from pipeline.io import load_params, read_csv
from pipeline.masks import MaskParams, build_masks


def main() -> None:
    settings = load_params()["masks"]
    params = from_params(MaskParams, settings, "masks")
    manifest = read_csv("data/raw/manifest.csv")
    build_masks(manifest, Path("data/raw/images"), Path("data/masks"), params,
                settings["gallery_per_class"], gallery=Path("data/masks_gallery.png"))


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
