"""Wall time of every pipeline stage: run ``dvc repro`` (or ``dvc exp run``) and time each stage.

Usage::

    python bench/stage_times.py [--out bench/stage_times.json] [--] [dvc repro arguments]
    python bench/stage_times.py -- -f                      # force every stage
    python bench/stage_times.py --exp -- -S data.source=../shared/datasets/pbc-1560

DVC prints ``Running stage '<name>':`` when it starts a stage; a stage's time runs from that line
to the next stage's line (or to the end of the run). Skipped stages ("didn't change") are listed
with no time. The command's output is passed through, so progress bars still show.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from run import machine_info  # bench/run.py, beside this script

STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def timed_repro(dvc_args: list[str], experiment: bool) -> dict[str, float]:
    """Run DVC, echo its output, and return the seconds spent in each stage that ran."""
    command = [sys.executable, "-m", "dvc", "exp" if experiment else "repro"]
    command += ["run", *dvc_args] if experiment else dvc_args
    times: dict[str, float] = {}
    current, started = None, time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            match = STAGE_LINE.search(line)
            if match:
                now = time.perf_counter()
                if current:
                    times[current] = now - started
                current, started = match.group(1), now
        if current:
            times[current] = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")
    return times


def main(argv: list[str] | None = None) -> None:
    """Time the run, print a table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", action="store_true", help="dvc exp run instead of dvc repro")
    parser.add_argument("--out", type=Path, default=Path("bench/stage_times.json"))
    parser.add_argument("dvc_args", nargs="*", help="passed to dvc (after --)")
    args = parser.parse_args(argv)
    machine = machine_info()
    times = timed_repro(args.dvc_args, args.exp)
    report = {"machine": machine, "dvc_args": args.dvc_args,
              "stage_seconds": times, "total_seconds": sum(times.values())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| stage | wall time |\n|---|---|")
    for stage, seconds in times.items():
        print(f"| {stage} | {seconds / 60:.1f} min ({seconds:.0f} s) |")
    print(f"| total | {report['total_seconds'] / 60:.1f} min |\n\nwritten: {args.out}")


if __name__ == "__main__":
    main()
