"""Stage external (always run): the identity of the sets the evaluations score besides the
split (``evaluate.external``, ``evaluate.dataset``, ``evaluate.adapt``), for ``evaluate``.

Like ``source``: DVC cannot watch folders outside the repository, so this stage always runs (a
directory walk; hashes cached by size and times) and its JSON changes only when a set does."""

import sys
from pathlib import Path

from pipeline.config import as_tuple
from pipeline.errors import run_entry_point
from pipeline.fingerprint import evaluation_sets_fingerprint
from pipeline.io import load_params, write_json


def main() -> None:
    params = load_params()  # each key by name: dvc.yaml lists exactly these (DVC checks them)
    write_json(Path("data/external_fingerprint.json"), evaluation_sets_fingerprint(
        as_tuple(params["evaluate"]["external"]), params["evaluate"]["dataset"],
        params["evaluate"]["adapt"] or {}, Path(params["data"]["cache_dir"])))


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
