"""Images a model learned from must not be scored as if it had never seen them.

A trained model records in its checkpoint the images of its training and validation parts: it
fitted its weights on the first and chose its epoch and its temperature on the second.
``trained_on`` holds their digests (sha256), ``trained_on_phash`` their perceptual hashes (pHash,
as the split computed them to group near-duplicates). :func:`check_unseen` refuses, in one line,
to score a set holding any of those files, since its figure would be inflated without a trace,
and counts the scored images within :data:`NEAR_DUPLICATE_BITS` of a seen image's pHash (a
re-encoded or resized copy, or the same cell photographed twice), with a warning. This matters
when one data set is drawn from another: pbc-external is 1,600 images of PBC, so a model trained
on all of PBC has seen them. ``data.exclude`` (``pipeline.sources.ingest``) keeps such a set's
files out of the ingested data, so that the rest can be trained on and the set scored honestly.
"""

from __future__ import annotations

import hashlib
import logging
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline.errors import InputError
from pipeline.io import ImageDecodeError, decode_image, read_regular_file

logger = logging.getLogger(__name__)

DIGEST_CHARS = 16  # 64 bits of the sha256: no accidental collision among millions of images
NEAR_DUPLICATE_BITS = 4  # pHash Hamming distance the split groups as one image (its default)
_HEX = frozenset(string.hexdigits.lower())


@dataclass(frozen=True)
class SeenImages:
    """What a checkpoint records of the images it has seen."""

    digests: frozenset[str]  # short sha256 of each file
    phashes: np.ndarray | None  # uint64 pHash of each image; None when the split made none

    def nearest_distance(self, phash: int) -> int:
        """The fewest pHash bits in which ``phash`` differs from a seen image."""
        return int(np.bitwise_count(self.phashes ^ np.uint64(phash)).min())


def short_digest(sha256: str) -> str:
    """The part of a hex sha256 that a model records per image."""
    return sha256[:DIGEST_CHARS].lower()


def phash_hex(phash: int) -> str:
    """A pHash as the split's CSVs and the checkpoint store it."""
    return f"{int(phash):016x}"


def seen_record(rows: pd.DataFrame) -> dict[str, list[str]]:
    """The checkpoint's ``trained_on`` (and ``trained_on_phash``) for these manifest rows."""
    record = {"trained_on": sorted({short_digest(digest) for digest in rows["sha256"]})}
    if "phash" in rows:
        record["trained_on_phash"] = sorted(set(rows["phash"]))
    return record


def _hex_list(record: object, key: str, model: str | Path) -> list[str] | None:
    if record is None:
        return None
    if not isinstance(record, list) or not all(
            isinstance(h, str) and len(h) == DIGEST_CHARS and set(h) <= _HEX for h in record):
        raise InputError(f"{model}: its {key} record is not a list of "
                         f"{DIGEST_CHARS}-character hexadecimal hashes: retrain or re-export it")
    return record


def read_seen(checkpoint: Mapping[str, Any], model: str | Path) -> SeenImages | None:
    """A checkpoint's record of its seen images, checked; None for a model that has none."""
    digests = _hex_list(checkpoint.get("trained_on"), "trained_on", model)
    if digests is None:
        return None
    phashes = _hex_list(checkpoint.get("trained_on_phash"), "trained_on_phash", model)
    return SeenImages(frozenset(digests), None if not phashes else
                      np.array([int(h, 16) for h in phashes], dtype=np.uint64))


def combined_seen(checkpoints: Sequence[tuple[Path, Mapping[str, Any]]]
                  ) -> dict[str, list[str] | None]:
    """An ensemble's record from its members' ``(path, checkpoint)``: every image any of them
    has seen; None when one records none (nothing can be checked then)."""
    seen = [read_seen(checkpoint, path) for path, checkpoint in checkpoints]
    if any(member is None for member in seen):
        return {"trained_on": None, "trained_on_phash": None}
    phashes = [member.phashes for member in seen]
    return {"trained_on": sorted(set().union(*(member.digests for member in seen))),
            "trained_on_phash": None if any(p is None for p in phashes) else
            sorted({phash_hex(h) for p in phashes for h in p})}


def ensemble_check(checks: Sequence[dict[str, int] | None]) -> dict[str, int] | None:
    """An ensemble's check from its members' (each member scored the images against its own
    seen images): the most any member had seen and found, or None when one was not checked."""
    if not checks or any(check is None for check in checks):
        return None
    merged = {"members": len(checks), "images_seen": max(c["images_seen"] for c in checks)}
    if all("near_duplicates" in check for check in checks):
        merged |= {"near_duplicates": max(c["near_duplicates"] for c in checks),
                   "near_duplicate_bits": NEAR_DUPLICATE_BITS}
    return merged


def _identity(path: Path, with_phash: bool) -> tuple[str | None, int | None]:
    """A file's short digest and, if asked, its pHash, from one read; None for what cannot be
    read or decoded (the evaluation skips it, with its reason)."""
    try:
        data = read_regular_file(path)
    except (ImageDecodeError, OSError):
        return None, None
    digest = short_digest(hashlib.sha256(data).hexdigest())
    if not with_phash:
        return digest, None
    try:
        return digest, int(str(imagehash.phash(Image.fromarray(decode_image(data)))), 16)
    except ImageDecodeError:
        return digest, None


def check_unseen(paths: Sequence[Path], seen: SeenImages | None, model: str | Path
                 ) -> dict[str, int] | None:
    """Refuse to score ``paths`` when any of them is a file ``model`` trained or validated on;
    return how many images it has seen and how many of ``paths`` are near-duplicates of them.

    A model without the record (made before it existed) is scored with a warning, and None."""
    if seen is None:
        logger.warning("%s does not record the images it was trained on: not checked whether "
                       "the images scored are among them", model)
        return None
    identities = [_identity(path, seen.phashes is not None)
                  for path in tqdm(paths, desc="check unseen", unit="img", leave=False)]
    identical = [path for path, (digest, _) in zip(paths, identities, strict=True)
                 if digest in seen.digests]
    if identical:
        more = f" and {len(identical) - 1} more" if len(identical) > 1 else ""
        raise InputError(
            f"{identical[0]}{more} of the {len(paths)} images to score are byte-identical to "
            f"images {model} was trained or validated on, so its score would be inflated: hold "
            f"them out of its training data (data.exclude) or score other images")
    result = {"images_seen": len(seen.digests)}
    if seen.phashes is not None:
        near = [path for path, (_, phash) in zip(paths, identities, strict=True)
                if phash is not None and seen.nearest_distance(phash) <= NEAR_DUPLICATE_BITS]
        result |= {"near_duplicates": len(near), "near_duplicate_bits": NEAR_DUPLICATE_BITS}
        if near:
            logger.warning("%d of the %d images to score (first %s) are near-duplicates (pHash "
                           "within %d bits) of images %s was trained or validated on: its score "
                           "on them may be inflated", len(near), len(paths), near[0],
                           NEAR_DUPLICATE_BITS, model)
    return result
