"""The ``wbc`` command: predictions and ad-hoc evaluations with trained models."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from pipeline.io import write_csv


def _predict(args: argparse.Namespace) -> int:
    from pipeline.predict import predict

    try:
        rows = predict(args.model, args.inputs, top_k=args.top_k, batch_size=args.batch_size,
                       device=args.device, tta=args.tta)
    except (FileNotFoundError, ValueError) as error:
        print(f"wbc predict: {error}", file=sys.stderr)
        return 2
    if args.abstain:
        from pipeline.abstain import mark_review, stored_threshold

        try:
            rows = mark_review(rows, stored_threshold(args.model))
        except (FileNotFoundError, ValueError) as error:
            print(f"wbc predict: {error}", file=sys.stderr)
            return 2
    table = pd.DataFrame(rows)
    if args.output:
        write_csv(args.output, table)
        print(f"wrote {len(table)} rows to {args.output}")
    else:
        table.to_csv(sys.stdout, index=False)
    failed = table["error"].astype(bool)
    for row in table[failed].itertuples():
        print(f"wbc predict: skipped {row.path}: {row.error}", file=sys.stderr)
    return 1 if failed.all() else 0


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import external_set, score_checkpoint, write_evaluation

    settings = {"batch_size": args.batch_size, "tta": args.tta, "device": args.device,
                "ignore_unknown_classes": args.ignore_unknown, "mistakes": 18,
                "attention_per_class": 2}
    try:
        scored = score_checkpoint(args.model, external_set(args.data), settings)
    except ValueError as error:
        print(f"wbc evaluate: {error}", file=sys.stderr)
        return 2
    headline = write_evaluation(scored, args.output, args.output / "eval.json", settings)
    print(f"accuracy {headline['accuracy']:.4f}  macro-F1 {headline['macro_f1']:.4f}  "
          f"({headline['images']} images) -> {args.output}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.export import ParityError, export_model

    try:
        report = export_model(args.model, args.output, args.quantize, images=args.images)
    except (FileNotFoundError, ValueError, ParityError) as error:
        print(f"wbc export: {error}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wbc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="top-k classes for images or folders")
    predict.add_argument("model", help="model.pt, ensemble.json, or a name in data/models/")
    predict.add_argument("inputs", nargs="+", help="image files and/or folders")
    predict.add_argument("-o", "--output", type=Path, help="CSV to write (default: stdout)")
    predict.add_argument("-k", "--top-k", type=int, default=3)
    predict.add_argument("--abstain", action="store_true",
                         help="add a decision column: the class, or 'review' below the "
                              "model's abstention threshold")
    predict.set_defaults(run=_predict)
    export = commands.add_parser("export", help="ONNX export, checked against PyTorch")
    export.add_argument("model", help="model.pt, ensemble.json, or a name in data/models/")
    export.add_argument("-o", "--output", type=Path, required=True, help="the .onnx to write")
    export.add_argument("--quantize", action="store_true",
                        help="int8 (static, calibrated on validation images), accuracy change "
                             "printed")
    export.add_argument("--images", type=Path,
                        help="labelled folder for the parity check (default: the test split)")
    export.set_defaults(run=_export)
    evaluate = commands.add_parser("evaluate", help="score a model on another labelled data set")
    evaluate.add_argument("model", type=Path, help="a model.pt or an exported .onnx")
    evaluate.add_argument("data", type=Path,
                          help="a folder (<class>/* or TRAIN|TEST/<CLASS>/*) or a manifest.csv")
    evaluate.add_argument("-o", "--output", type=Path, required=True, help="report folder")
    evaluate.add_argument("--ignore-unknown", action="store_true",
                          help="skip images of classes the model does not know")
    evaluate.set_defaults(run=_evaluate)
    for command in (predict, evaluate):
        command.add_argument("--batch-size", type=int, default=64)
        command.add_argument("--device", default="auto")
        command.add_argument("--tta", action="store_true", help="average flips and rotations")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
