"""Stage train@<model>: train one attention classifier of params.yaml: models."""

import logging
import sys
from pathlib import Path

from pipeline.errors import PipelineError, run_entry_point
from pipeline.io import load_params
from pipeline.masks import MaskParams
from pipeline.models import ModelConfig, WeightsError
from pipeline.train import TrainConfig, train_model


def main(name: str) -> None:
    params = load_params()
    mask_settings = {k: v for k, v in params["masks"].items() if k != "gallery_per_class"}
    try:
        train_model(
            name,
            ModelConfig(**params["models"][name]),
            TrainConfig(**params["train"]),
            MaskParams(**mask_settings),
            split_dir=Path("data/split"),
            images_dir=Path("data/raw/images"),
            masks_dir=Path("data/masks"),
            out_dir=Path("data/models") / name,
            metrics_path=Path("metrics") / name / "train.json",
            live_dir=Path("dvclive") / name,
            resources_path=Path("resources") / name / "train.json",
        )
    except WeightsError as error:
        raise PipelineError(f"train {name}: {error}") from error


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_entry_point(main, sys.argv[1]))
