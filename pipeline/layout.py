"""Dataset folder layouts: ``<class>/<image>`` and ``TRAIN|TEST/<CLASS>/<image>``."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.labels import normalize_label

logger = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": "train", "test": "test"}
IGNORED_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db"}


class LayoutError(ValueError):
    """No known dataset layout was found; the message says which layouts are expected."""


@dataclass(frozen=True)
class Candidate:
    """One file found in a dataset layout, before it is validated."""

    source: Path
    label: str
    source_split: str
    relative: str


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and p.name not in IGNORED_NAMES
        and not p.name.startswith(".")
    )


def _has_files(folder: Path) -> bool:
    return any(p.is_file() and not p.name.startswith(".") for p in folder.iterdir())


def find_layout(root: Path) -> tuple[Path, str]:
    """Find the shallowest folder holding a known layout below ``root``.

    Returns ``(folder, "split")`` for ``TRAIN|TEST/<CLASS>/*`` and ``(folder, "class")`` for
    ``<class>/*``; raises SourceError when neither is found.
    """
    queue = [root]
    while queue:
        folder = queue.pop(0)
        children = _visible_dirs(folder)
        names = {child.name.lower() for child in children}
        if {"train", "test"} <= names:
            return folder, "split"
        class_dirs = [child for child in children if _has_files(child)]
        empty_dirs = [child for child in children if not any(child.iterdir())]
        if len(class_dirs) >= 2 and len(class_dirs) + len(empty_dirs) == len(children):
            return folder, "class"
        queue.extend(children)
    raise LayoutError(
        f"no dataset layout found under {root}: expected <class>/<image> folders "
        "or TRAIN|TEST/<CLASS>/<image>"
    )


def _class_candidates(folder: Path, source_split: str) -> Iterator[Candidate]:
    prefix = f"{source_split}/" if source_split else ""
    for class_dir in _visible_dirs(folder):
        label = normalize_label(class_dir.name)
        files = sorted(
            p for p in class_dir.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.name not in IGNORED_NAMES
            and "__MACOSX" not in p.parts
        )
        if not files:
            logger.warning("skipping empty class folder %s", class_dir)
        for path in files:
            yield Candidate(path, label, source_split, f"{prefix}{label}/{path.name}")


def scan_layout(root: Path) -> tuple[list[Candidate], str]:
    """List every candidate image of the layout found under ``root`` and the layout's kind."""
    folder, layout = find_layout(root)
    if layout == "class":
        candidates = list(_class_candidates(folder, ""))
    else:
        candidates = []
        for split_dir in _visible_dirs(folder):
            split = SPLIT_FOLDERS.get(split_dir.name.lower())
            if split is None:
                logger.warning("ignoring %s: not a TRAIN or TEST folder", split_dir)
                continue
            candidates.extend(_class_candidates(split_dir, split))
    return _unique_relatives(candidates), layout


def _unique_relatives(candidates: list[Candidate]) -> list[Candidate]:
    """Suffix output names that collide (two alias folders holding the same file name)."""
    seen: Counter[str] = Counter()
    unique = []
    for cand in candidates:
        relative = cand.relative
        seen[relative] += 1
        if seen[relative] > 1:
            stem, dot, suffix = relative.rpartition(".")
            relative = f"{stem}__{seen[relative] - 1}{dot}{suffix}"
        unique.append(Candidate(cand.source, cand.label, cand.source_split, relative))
    return unique
