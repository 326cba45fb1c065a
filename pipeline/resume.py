"""Resuming an interrupted training run, as DVCLive's ``resume`` does.

After every validated epoch, training writes its whole state (weights, their moving average, the
optimiser, the best epoch so far, the history, the random generators) to one file. When the same
run starts again (same params, split, code and PyTorch) it continues after the last finished
epoch and ends with the numbers an uninterrupted run would have given; a run of anything else
starts afresh. The file is kept outside DVC's outputs (``dvc repro`` would delete those before
rerunning the stage) and removed once the model is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.io import atomic_path

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
PACKAGE = Path(__file__).resolve().parent


def run_key(settings: Any, files: Iterable[Path]) -> str:
    """What identifies a run: its settings (JSON-able), the bytes of ``files`` (its split), the
    pipeline's source code and the PyTorch version."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(torch.__version__.encode())
    for path in [*files, *sorted(PACKAGE.rglob("*.py"))]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def random_state(loader_generator: torch.Generator) -> dict[str, Any]:
    """The generators a training epoch draws from: PyTorch's, NumPy's and the data loader's."""
    numpy_state = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(), "loader": loader_generator.get_state(),
            "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "numpy_pos": int(numpy_state["state"]["pos"]),
            "numpy_gauss": (int(numpy_state["has_gauss"]), float(numpy_state["gauss"]))}


def restore_random_state(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    """Set the generators back to ``random_state``'s record."""
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": state["numpy_key"].numpy().astype(np.uint32),
                                   "pos": state["numpy_pos"]},
                         "has_gauss": has_gauss, "gauss": gauss})


def save_state(path: Path, key: str, state: dict[str, Any]) -> None:
    """Write ``state`` for the run ``key`` (atomically: an interruption while writing leaves the
    previous epoch's file)."""
    with atomic_path(path) as tmp:
        torch.save({"format": STATE_FORMAT, "key": key, **state}, tmp)


def load_state(path: Path, key: str) -> dict[str, Any] | None:
    """The saved state of the run ``key``, or None (logged) when there is none to resume: no
    file, an unreadable one, or one of another run."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any damage means: start afresh
        logger.warning("%s: unreadable (%s), training from the start", path,
                       error.__class__.__name__)
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT \
            or state.get("key") != key:
        logger.info("%s: saved by a run with other params, data or code; training from the "
                    "start", path)
        return None
    return state


def clear_state(path: Path) -> None:
    """Remove the saved state once the run's outputs are written."""
    path.unlink(missing_ok=True)
