"""Images a model learned from must not be scored as if it had never seen them.

A trained model records in its checkpoint (``trained_on``) the digest of every image of its
training and validation parts: it fitted its weights on the first and chose its epoch and its
temperature on the second. :func:`check_unseen` refuses, in one line, to score a set holding any
of those images, since its figure would be inflated without a trace; this matters when one data
set is drawn from another (pbc-external is 1,600 images of PBC, so a model trained on all of PBC
has seen them). ``data.exclude`` (:func:`held_out_digests`) keeps such a set's images out of the
ingested data, so that the rest can be trained on and the set still scored honestly.

Identity is the file's bytes (sha256): a re-encoded or resized copy is a different file here.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

from tqdm import tqdm

from pipeline.errors import InputError, PipelineError
from pipeline.io import sha256_file

logger = logging.getLogger(__name__)

DIGEST_CHARS = 16  # 64 bits of the sha256: no accidental collision among millions of images
_HEX = frozenset(string.hexdigits.lower())


def short_digest(sha256: str) -> str:
    """The part of a hex sha256 that a model records per image."""
    return sha256[:DIGEST_CHARS].lower()


def trained_on_record(sha256s: Iterable[str]) -> list[str]:
    """What a checkpoint stores as ``trained_on``: sorted, unique short digests."""
    return sorted({short_digest(digest) for digest in sha256s})


def read_trained_on(record: object, model: str | Path) -> frozenset[str] | None:
    """A checkpoint's ``trained_on``, checked; None for a model that records none."""
    if record is None:
        return None
    if not isinstance(record, list) or not all(
            isinstance(d, str) and len(d) == DIGEST_CHARS and set(d) <= _HEX for d in record):
        raise InputError(f"{model}: its trained_on record is not a list of "
                         f"{DIGEST_CHARS}-character image digests")
    return frozenset(record)


def combined_trained_on(records: Sequence[tuple[Path, object]]) -> list[str] | None:
    """An ensemble's ``trained_on`` from its members' ``(checkpoint, record)``: every image any
    of them has seen, or None when one records none (nothing can be checked then)."""
    seen: set[str] = set()
    for path, record in records:
        digests = read_trained_on(record, path)
        if digests is None:
            return None
        seen |= digests
    return sorted(seen)


def _digest_or_none(path: Path) -> str | None:
    """The short digest of a file, or None when it cannot be read (it is skipped later)."""
    try:
        return short_digest(sha256_file(path))
    except OSError:
        return None


def check_unseen(paths: Sequence[Path], trained_on: frozenset[str] | None,
                 model: str | Path) -> None:
    """Refuse to score ``paths`` when any of them is an image ``model`` trained or validated on.

    A model without a ``trained_on`` record (made before it existed, or an export of one) is
    scored with a warning that the check could not be made."""
    if trained_on is None:
        logger.warning("%s does not record the images it was trained on: not checked whether "
                       "the images scored are among them", model)
        return
    seen = [path for path in tqdm(paths, desc="check unseen", unit="img", leave=False)
            if _digest_or_none(path) in trained_on]
    if seen:
        more = f" and {len(seen) - 1} more" if len(seen) > 1 else ""
        raise InputError(
            f"{seen[0]}{more} of the {len(paths)} images to score are byte-identical to images "
            f"{model} was trained or validated on, so its score would be inflated: hold them "
            f"out of its training data (data.exclude) or score other images")


def exclude_path(location: str) -> Path:
    """A ``data.exclude`` entry as a path, which must exist."""
    path = Path(location).expanduser()
    if not path.exists():
        raise PipelineError(f"data.exclude: {location!r} is not a folder or file")
    return path


def held_out_digests(locations: Sequence[str]) -> dict[str, str]:
    """``{sha256: location}`` for every file under the ``data.exclude`` folders (or files)."""
    digests: dict[str, str] = {}
    for location in locations:
        path = exclude_path(location)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in tqdm(files, desc=f"exclude {path.name}", unit="file", leave=False):
            digests.setdefault(sha256_file(file), str(location))
    return digests
