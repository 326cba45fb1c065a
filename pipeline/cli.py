"""The ``wbc`` command: predictions and ad-hoc evaluations with trained models.

Every argument is checked where it comes in: numbers against their range, the device by name,
and each output (``-o``) before any work, so that it never replaces or writes into an input, a
folder the pipeline did not make, or anything but a regular file (:func:`pipeline.io.check_output`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd

from pipeline.errors import USER_ERROR_EXIT, PipelineError, run_entry_point
from pipeline.io import OUTPUT_MARKER, check_output, csv_text, write_csv

MODELS_DIR = Path("data/models")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, exit code 2, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(USER_ERROR_EXIT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range ({low} to {high})")
        return value
    return parse


def device_name(text: str) -> str:
    """An argparse type: ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``, present here."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: auto, cpu, cuda, cuda:N "
                                         "or mps")
    if text.startswith("cuda") or text == "mps":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(text.partition(":")[2] or 0)
        if text == "mps" and not torch.backends.mps.is_available() or \
                text != "mps" and index >= count:
            raise argparse.ArgumentTypeError(f"{text} is not available on this machine "
                                             f"({count} CUDA devices)")
    return text


def model_paths(model: str) -> list[Path]:
    """The files and folders a model argument reads: the path or name given, its folder's
    ensemble description and, recursively, every member of an ensemble (found without loading
    anything, so that a bad output is refused at once; one that cannot be read is left to the
    command, which says why)."""
    from pipeline.model_files import read_spec

    paths, stack = [], [Path(model), MODELS_DIR / model]
    while stack:
        path = stack.pop()
        if path in paths:
            continue
        paths.append(path)
        spec = path / "ensemble.json" if path.is_dir() else path
        if spec.suffix == ".json" and spec.is_file():
            try:
                stack += [Path(member["checkpoint"]) for member in read_spec(spec)["members"]]
            except PipelineError:
                continue
    return paths


@contextmanager
def output_folder(dest: Path, inputs: list[Path]) -> Iterator[Path]:
    """``dest`` checked (see check_output), created and marked as the pipeline's own, so later
    runs may write into it again; removed again if the command fails before writing into it."""
    check_output(dest, inputs, folder=True)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    (dest / OUTPUT_MARKER).touch()
    try:
        yield dest
    except BaseException:
        if created and [p.name for p in dest.iterdir()] == [OUTPUT_MARKER]:
            shutil.rmtree(dest)
        raise


def _predict(args: argparse.Namespace) -> int:
    if args.output:
        check_output(args.output, [*model_paths(args.model), *args.inputs])
    from pipeline.predict import output_columns, predict

    rows = predict(args.model, args.inputs, top_k=args.top_k, batch_size=args.batch_size,
                   device=args.device, tta=args.tta)
    columns = output_columns(args.top_k)
    if args.abstain:
        from pipeline.abstain import mark_review, stored_threshold

        rows = mark_review(rows, stored_threshold(args.model))
        columns.append("decision")
    table = pd.DataFrame(rows, columns=columns)
    if args.output:
        write_csv(args.output, table)
        print(f"wrote {len(table)} rows to {args.output}")
    else:
        sys.stdout.write(csv_text(table))
    failed = table["error"].astype(bool)
    for row in table[failed].itertuples():
        print(f"wbc predict: skipped {row.path}: {row.error}", file=sys.stderr)
    return 1 if failed.all() else 0


def _score(model: str, data: Any, config: Any) -> Any:
    """Score a single model or an ensemble (weighted member probabilities, its temperature)."""
    from dataclasses import replace

    from pipeline.evaluate import score_checkpoint
    from pipeline.leakage import ensemble_check
    from pipeline.scoring import resolve_model

    tree = resolve_model(model)
    scored = {path: score_checkpoint(path, data, config, localise=not tree.members)
              for path in tree.checkpoints()}
    first = next(iter(scored.values()))
    if not tree.members:
        return first
    if any(s.classes != first.classes for s in scored.values()):
        raise PipelineError(f"{model}: its members predict different classes")
    uncalibrated = sum(scored[path].uncalibrated * share for path, share in tree.leaves())
    return replace(first, probabilities=tree.combine(lambda path: scored[path].probabilities),
                   uncalibrated=uncalibrated, name=Path(model).stem,
                   unseen_check=ensemble_check([s.unseen_check for s in scored.values()]),
                   temperature=tree.temperature, attention=None)


def _evaluate(args: argparse.Namespace) -> int:
    inputs = [*model_paths(args.model), args.data]
    if args.data.suffix == ".csv":
        inputs.append(args.data.parent / "images")
    check_output(args.output, inputs, folder=True)
    from pipeline.eval_sets import EvaluateConfig, external_set
    from pipeline.reports import write_evaluation

    config = EvaluateConfig(batch_size=args.batch_size, tta=args.tta, device=args.device,
                            ignore_unknown_classes=args.ignore_unknown, mistakes=18,
                            strict_images=args.strict, abstain_target_accuracy=None)
    with output_folder(args.output, inputs):
        scored = _score(args.model, external_set(args.data), config)
        headline = write_evaluation(scored, args.output, args.output / "eval.json", config)
    print(f"accuracy {headline['accuracy']:.4f}  macro-F1 {headline['macro_f1']:.4f}  "
          f"({headline['images']} images) -> {args.output}")
    return 0


def _adapt(args: argparse.Namespace) -> int:
    check_output(args.output, [*model_paths(args.model), args.images])
    from pipeline.adapt import adapt_checkpoint

    adapted_on = adapt_checkpoint(args.model, args.images, args.output, args.device,
                                  args.batch_size)
    print(f"adapted batch-norm statistics on {adapted_on['images']} images of "
          f"{adapted_on['folder']} -> {args.output}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    inputs = [*model_paths(args.model), *map(Path, args.inputs)]
    check_output(args.output, inputs, folder=True)
    from pipeline.explain import explain_files

    with output_folder(args.output, inputs):
        table = explain_files(args.model, args.inputs, args.output, args.device,
                              args.batch_size)
    failed = table["error"].astype(bool)
    for row in table[failed].drop_duplicates("path").itertuples():
        print(f"wbc explain: skipped {row.path}: {row.error}", file=sys.stderr)
    print(f"explained {(~failed).sum()} of {len(table)} images -> {args.output}")
    return 1 if failed.all() else 0


def _export(args: argparse.Namespace) -> int:
    check_output(args.output, [*model_paths(args.model), *([args.images] if args.images else [])])
    from pipeline.export import export_model

    report = export_model(args.model, args.output, args.quantize, images=args.images)
    for line in report.lines():
        print(line)
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wbc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="top-k classes for images or folders")
    model_help = "a model.safetensors, an ensemble.json, an .onnx, or a name in data/models/"
    predict.add_argument("model", help=model_help)
    predict.add_argument("inputs", nargs="+", help="image files and/or folders")
    predict.add_argument("-o", "--output", type=Path, help="CSV to write (default: stdout)")
    predict.add_argument("-k", "--top-k", type=int_in(1, 1000), default=3,
                         help="how many classes to list per image (1 or more)")
    predict.add_argument("--abstain", action="store_true",
                         help="add a decision column: the class, or 'review' below the "
                              "model's abstention threshold")
    predict.set_defaults(run=_predict)
    export = commands.add_parser("export", help="ONNX export, checked against PyTorch")
    export.add_argument("model", help=model_help)
    export.add_argument("-o", "--output", type=Path, required=True, help="the .onnx to write")
    export.add_argument("--quantize", action="store_true",
                        help="int8 (static, calibrated on validation images), accuracy change "
                             "printed")
    export.add_argument("--images", type=Path,
                        help="labelled folder for the parity check (default: the test split)")
    export.set_defaults(run=_export)
    evaluate = commands.add_parser("evaluate", help="score a model on another labelled data set")
    evaluate.add_argument("model", help=model_help)
    evaluate.add_argument("data", type=Path,
                          help="a folder (<class>/* or TRAIN|TEST/<CLASS>/*) or a manifest.csv")
    evaluate.add_argument("-o", "--output", type=Path, required=True, help="report folder")
    evaluate.add_argument("--ignore-unknown", action="store_true",
                          help="skip images of classes the model does not know")
    evaluate.add_argument("--strict", action="store_true",
                          help="fail on the first unreadable image instead of skipping it")
    evaluate.set_defaults(run=_evaluate)
    adapt = commands.add_parser("adapt", help="adapt a model to another laboratory's images "
                                              "(batch-norm statistics, no labels)")
    adapt.add_argument("model", help="a model.safetensors, its folder, or a name in data/models/")
    adapt.add_argument("images", type=Path, help="a folder of the new laboratory's images "
                                                  "(labels, if any, are not read)")
    adapt.add_argument("-o", "--output", type=Path, required=True,
                       help="the adapted model.safetensors to write")
    adapt.set_defaults(run=_adapt)
    explain = commands.add_parser("explain", help="attention and Grad-CAM panels for images")
    explain.add_argument("model", help="a model.safetensors, an ensemble.json of them, or a name "
                         "in data/models/ (not an .onnx: Grad-CAM needs the PyTorch model)")
    explain.add_argument("inputs", nargs="+", help="image files and/or folders")
    explain.add_argument("-o", "--output", type=Path, required=True, help="folder to write")
    explain.add_argument("--batch-size", type=int_in(1, 1 << 16), default=32)
    explain.add_argument("--device", type=device_name, default="auto")
    explain.set_defaults(run=_explain)
    for command in (predict, evaluate, adapt):
        command.add_argument("--batch-size", type=int_in(1, 1 << 16), default=64)
        command.add_argument("--device", type=device_name, default="auto",
                             help="auto, cpu, cuda, cuda:N or mps")
    for command in (predict, evaluate):
        command.add_argument("--tta", action="store_true", help="average flips and rotations")
    for command in (predict, export, evaluate, explain, adapt):
        command.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names in any encoding print, escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else USER_ERROR_EXIT
    return run_entry_point(args.run, args, debug=args.debug or None)


if __name__ == "__main__":
    sys.exit(main())
