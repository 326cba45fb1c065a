"""Stage ensemble: evaluate the weighted average of the members' calibrated probabilities,
with a temperature of its own fitted on the validation split, on the test split and on every
external set its members scored (``evaluate.external``)."""

import sys
from pathlib import Path

from pipeline.config import from_params
from pipeline.ensemble import (
    EnsembleConfig,
    combine_evaluations,
    evaluate_ensemble_external,
    member_weights,
)
from pipeline.errors import run_entry_point
from pipeline.eval_sets import EvaluateConfig, evaluation_set, held_out_set
from pipeline.io import load_params, read_json
from pipeline.model_files import MODEL_FILE, write_spec
from pipeline.reports import write_evaluation


def main() -> None:
    params = load_params()
    config, evaluate_config = (from_params(EnsembleConfig, params["ensemble"], "ensemble"),
                               from_params(EvaluateConfig, params["evaluate"], "evaluate"))
    members = config.members
    val_f1 = {m: read_json(Path("metrics") / m / "train.json")["val_macro_f1"] for m in members}
    weights = member_weights(config, val_f1)
    split, images, masks = Path("data/split"), Path("data/raw/images"), Path("data/masks")
    data = evaluation_set(evaluate_config, split, images, masks)
    validation = (held_out_set(split, images, masks, part="val")
                  if config.temperature_scaling else None)
    scored = combine_evaluations({m: Path("data/eval") / m for m in members}, weights, data,
                                 validation)
    # external sets first: a member missing one fails the stage before anything is written
    external = evaluate_ensemble_external(Path("data/eval"), weights, scored.temperature,
                                          evaluate_config, Path("data/eval/ensemble/external"))
    headline = write_evaluation(scored, Path("data/eval/ensemble"),
                                Path("metrics/ensemble/eval.json"), evaluate_config,
                                Path("resources/ensemble/eval.json"), raw_dir=Path("data/raw"),
                                external=external)
    write_spec(Path("data/models/ensemble/ensemble.json"),  # the threshold travels with it
               {m: Path("data/models") / m / MODEL_FILE for m in members}, weights,
               scored.temperature, headline.get("abstain_threshold"))


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
