"""Stage evaluate@<model>: score a trained model on the test split (or evaluate.dataset)."""

import logging
import sys
from pathlib import Path

from pipeline.errors import run_entry_point
from pipeline.evaluate import evaluation_set, held_out_set, score_checkpoint, write_evaluation
from pipeline.io import load_params
from pipeline.models import MODEL_FILE


def main(name: str) -> None:
    settings = load_params()["evaluate"]
    split, images, masks = Path("data/split"), Path("data/raw/images"), Path("data/masks")
    data = evaluation_set(settings, split, images, masks)
    validation = held_out_set(split, images, masks, part="val")  # for the ensemble's temperature
    scored = score_checkpoint(Path("data/models") / name / MODEL_FILE, data, settings, validation)
    write_evaluation(scored, Path("data/eval") / name, Path("metrics") / name / "eval.json",
                     settings, Path("resources") / name / "eval.json", raw_dir=Path("data/raw"))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_entry_point(main, sys.argv[1]))
