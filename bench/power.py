"""Which differences a paired comparison of ``bench/cv_compare`` could have detected.

For each pairing in the given ``cv_compare`` JSON files (out of fold, or ``--set`` another set
both recipes scored), the standard error of the difference is read off its 95% bootstrap
interval (width / 3.92, the normal approximation), and from it:

- the minimum detectable difference: the smallest true difference a two-sided 5% test on this
  many images finds with 80% power, (1.96 + 0.84) x the standard error;
- the images needed for the observed difference to be found with that power, the standard
  error shrinking as one over the square root of the images (the same discordance per image).

It answers, before a rule is written, whether a candidate's plausible gain can pass it.

    python -m bench.cv_compare a=... b=... --json /tmp/ab.json   # then:
    python -m bench.power /tmp/ab.json [more cv_compare JSON files] [--set pbc-external]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from scipy.stats import norm

from pipeline.errors import InputError, run_entry_point
from pipeline.io import read_json

Z_TEST, Z_POWER = float(norm.ppf(0.975)), float(norm.ppf(0.80))  # two-sided 5%; 80% power


def detectable(pair: dict[str, Any], images: int) -> dict[str, float]:
    """The standard error, minimum detectable difference and images needed for one pairing
    (``difference`` and ``ci95`` as ``cv_compare`` writes them) scored on ``images`` images."""
    low, high = (float(bound) for bound in pair["ci95"])
    if not (math.isfinite(float(pair["difference"])) and math.isfinite(low) and low <= high
            and math.isfinite(high)):
        raise ValueError(f"a difference and a 95% interval of finite numbers, low <= high: {pair}")
    standard_error = (high - low) / (2 * Z_TEST)
    needed = (images * ((Z_TEST + Z_POWER) * standard_error / pair["difference"]) ** 2
              if pair["difference"] else math.inf)
    return {"standard_error": standard_error,
            "detectable_difference": (Z_TEST + Z_POWER) * standard_error,
            "images_needed": needed}


def rows(path: Path, set_name: str) -> list[list[str]]:
    """One table row per pairing in a ``cv_compare`` JSON file, on ``set_name``."""
    try:
        result = read_json(path)
        recipes, pairs = result["recipes"], result["paired_with_first"]
        reference = next(iter(recipes))
        return [_row(path.stem, f"{name} − {reference}", pair[set_name],
                     _images(recipes[reference], set_name))
                for name, pair in pairs.items() if set_name in pair]
    except (ValueError, KeyError, TypeError, StopIteration, AttributeError):
        raise InputError(f"{path}: not a bench/cv_compare JSON file (recipes, paired_with_first, "
                         f"each pairing's difference and ci95)") from None


def _images(reference: dict[str, Any], set_name: str) -> int:
    scores = reference["out_of_fold"] if set_name == "out_of_fold" else (
        reference["external"][set_name])
    return int(scores["images"])


def _row(file: str, pairing: str, pair: dict[str, Any], images: int) -> list[str]:
    found = detectable(pair, images)
    low, high = pair["ci95"]
    return [file, pairing, f"{pair['difference']:+.4f}", f"[{low:+.3f}, {high:+.3f}]",
            str(images), f"{found['detectable_difference']:.4f}",
            f"{found['images_needed']:,.0f}"]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="bench/cv_compare --json outputs")
    parser.add_argument("--set", default="out_of_fold",
                        help="out_of_fold (default) or an external set's name, e.g. pbc-external")
    args = parser.parse_args(argv)
    header = ["file", "pairing", "difference", "95% CI", "images",
              "detectable at 80% power", "images needed for this difference"]
    table = [row for path in args.files for row in rows(path, args.set)]
    if not table:
        raise InputError(f"no pairing on {args.set!r} in {', '.join(map(str, args.files))}")
    print("\n".join("| " + " | ".join(line) + " |"
                    for line in [header, ["---"] * len(header), *table]))


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
