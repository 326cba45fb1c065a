"""Backbones compared on real data through the pipeline's own entry point, ``dvc exp run``.

Each recipe is one experiment of ``efficientnet_lite0_attention`` (its backbone overridden), run
up to its evaluate stage with the same small schedule on ``../shared/datasets/pbc-1560``, and
scored on the split's test part and on ``../shared/datasets/pbc-external`` (reported, never
used to choose). Run from the repository root with ``dvc cache dir --local`` set up:

    python -m bench.recipes [--recipes lite0,lite1,lite2] [--out bench/recipes.json]
    python -m bench.recipes --table bench/recipes.json        # the markdown table only

Wall time is the whole ``dvc exp run`` (stages restored from the run cache take seconds). Run one
recipe at a time per git repository: worktrees share ``refs/exps``, and two concurrent
``dvc exp run`` calls were seen to run the same queued parameters (both trained Lite0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.io import read_csv

MODEL = "efficientnet_lite0_attention"
EXTERNAL = "pbc-external"
COMMON = {
    "data.source": "../shared/datasets/pbc-1560",
    "train.epochs": "2",
    f"models.{MODEL}.image_size": "96",
    "evaluate.tta": "false",
    "evaluate.external": f"[../shared/datasets/{EXTERNAL}]",
}
RECIPES = {f"lite{version}": {f"models.{MODEL}.backbone": f"efficientnet_lite{version}"}
           for version in (0, 1, 2)}


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def recalls(report: Path) -> dict[str, float | None]:
    """Per-class recall from an evaluation's ``report.csv``; None for a class with no images
    (a recall of 0 would read as every image of it missed)."""
    rows = read_csv(report)
    return {name: round(float(recall), 4) if support else None
            for name, recall, support in zip(rows["class"], rows["recall"], rows["support"],
                                             strict=True)}


def collect(root: Path = Path(".")) -> dict[str, Any]:
    """The figures one evaluated experiment left in the workspace."""
    test = read_json(root / "metrics" / MODEL / "eval.json")
    external = test["external"][EXTERNAL]
    train = read_json(root / "metrics" / MODEL / "train.json")
    return {
        "backbone": train["backbone"], "image_size": train["image_size"],
        "weight_source": train["weight_source"], "epochs_run": train["epochs_run"],
        "best_epoch": train["best_epoch"],
        "train_seconds": read_json(root / "resources" / MODEL / "train.json")["seconds"],
        "test": {k: test[k] for k in ("accuracy", "accuracy_ci95_low", "accuracy_ci95_high",
                                      "balanced_accuracy", "macro_f1", "images")},
        "test_recall": recalls(root / "data" / "eval" / MODEL / "report.csv"),
        "external": {k: external[k] for k in ("accuracy", "accuracy_ci95_low",
                                              "accuracy_ci95_high", "balanced_accuracy",
                                              "macro_f1", "images")},
        "external_recall": recalls(root / "data" / "eval" / MODEL / "external" / EXTERNAL
                                   / "report.csv"),
    }


def run_recipe(name: str, overrides: dict[str, str]) -> dict[str, Any]:
    """``dvc exp run`` the recipe up to its evaluation; its figures and wall time."""
    settings = [arg for key, value in (COMMON | overrides).items()
                for arg in ("-S", f"{key}={value}")]
    start = time.perf_counter()
    subprocess.run(["dvc", "exp", "run", "-n", f"recipe-{name}", f"evaluate@{MODEL}",
                    *settings], check=True)
    result = collect()
    wanted = overrides.get(f"models.{MODEL}.backbone")
    if wanted and result["backbone"] != wanted:  # e.g. another worktree's queued experiment ran
        raise SystemExit(f"recipe {name}: asked for {wanted}, the experiment trained "
                         f"{result['backbone']}; run one `dvc exp run` at a time per git repo")
    return {"recipe": name, "overrides": COMMON | overrides,
            "wall_seconds": round(time.perf_counter() - start, 1), **result}


def _interval(scores: dict[str, float]) -> str:
    return (f"{scores['accuracy']:.3f} [{scores['accuracy_ci95_low']:.3f}, "
            f"{scores['accuracy_ci95_high']:.3f}]")


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per recipe, then per-class recall on the test split and on the external set."""
    lines = ["| recipe | px | epochs (best) | wall s | test acc [95% CI] | test bal. acc | "
             "external acc [95% CI] | external bal. acc |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['image_size']} | {r['epochs_run']} ({r['best_epoch']}) | "
              f"{r['wall_seconds']:.0f} | {_interval(r['test'])} | "
              f"{r['test']['balanced_accuracy']:.3f} | {_interval(r['external'])} | "
              f"{r['external']['balanced_accuracy']:.3f} |" for r in results]
    classes = list(results[0]["test_recall"]) if results else []
    lines += ["", "| recall (test / external) | " + " | ".join(classes) + " |",
              "|---" * (len(classes) + 1) + "|"]
    lines += [f"| {r['backbone']} | " + " | ".join(
        f"{_recall(r['test_recall'], c)} / {_recall(r['external_recall'], c)}" for c in classes)
        + " |" for r in results]
    return "\n".join(lines)


def _recall(recalls_by_class: dict[str, float | None], name: str) -> str:
    """A class's recall in two decimals, ``-`` where the set has no image of it."""
    value = recalls_by_class.get(name)
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--out", type=Path, default=Path("bench/recipes.json"))
    parser.add_argument("--table", type=Path, help="print the table of a results file and stop")
    args = parser.parse_args()
    if args.table:
        print(markdown(read_json(args.table)["results"]))
        return
    results = []
    for name in args.recipes.split(","):
        results.append(run_recipe(name, RECIPES[name]))
        args.out.write_text(json.dumps({"results": results}, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
