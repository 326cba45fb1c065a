"""Stage train@<model> (and cv_train@<model>-<fold>): train one attention classifier.

``python -m stages.train MODEL`` trains on the split in data/split; ``--fold K`` trains on
cross-validation fold K (data/folds/K) into data/cv/MODEL/K/train.
"""

import argparse
import sys
from pathlib import Path

from pipeline.config import from_params
from pipeline.errors import PipelineError, run_entry_point
from pipeline.io import load_params
from pipeline.masks import MaskParams
from pipeline.models import ModelConfig, WeightsError
from pipeline.train import TrainConfig, train_model

# An interrupted run's state, outside DVC's outputs (which ``dvc repro`` deletes before a rerun)
RESUME_DIR = Path(".cache/resume")


def _outputs(name: str, fold: int | None) -> dict[str, Path]:
    """Where a model (or one fold's model) and its records go."""
    if fold is None:
        return {"split_dir": Path("data/split"), "out_dir": Path("data/models") / name,
                "metrics_path": Path("metrics") / name / "train.json",
                "live_dir": Path("dvclive") / name,
                "resources_path": Path("resources") / name / "train.json",
                "resume_path": RESUME_DIR / name / "state.pt"}
    run = Path("data/cv") / name / str(fold) / "train"
    return {"split_dir": Path("data/folds") / str(fold), "out_dir": run / "model",
            "metrics_path": run / "train.json", "live_dir": run / "dvclive",
            "resources_path": run / "resources.json",
            "resume_path": RESUME_DIR / f"{name}-fold{fold}" / "state.pt"}


def main(name: str, fold: int | None = None) -> None:
    params = load_params()
    try:
        model = params["models"][name]
    except KeyError:
        raise PipelineError(f"train: no model {name!r} in params.yaml models") from None
    try:
        train_model(
            name,
            from_params(ModelConfig, model, f"models.{name}"),
            from_params(TrainConfig, params["train"], "train"),
            from_params(MaskParams, params["masks"], "masks"),
            images_dir=Path("data/raw/images"),
            masks_dir=Path("data/masks"),
            **_outputs(name, fold),
        )
    except WeightsError as error:
        raise PipelineError(f"train {name}: {error}") from error


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--fold", type=int, help="train on this cross-validation fold")
    args = parser.parse_args()
    sys.exit(run_entry_point(main, args.model, args.fold))
