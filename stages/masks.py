"""Stage masks: a GrabCut + morphology mask for every image of data/raw."""

import logging
import sys
from pathlib import Path

import pandas as pd

from pipeline.errors import run_entry_point
from pipeline.io import load_params
from pipeline.masks import MaskParams, build_masks


def main() -> None:
    settings = dict(load_params()["masks"])
    gallery_per_class = settings.pop("gallery_per_class")
    manifest = pd.read_csv("data/raw/manifest.csv", keep_default_na=False)
    build_masks(manifest, Path("data/raw/images"), Path("data/masks"), MaskParams(**settings),
                gallery_per_class, gallery=Path("data/masks_gallery.png"))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_entry_point(main))
