"""Dataset folder layouts: ``<class>/<image>`` and ``TRAIN|TEST/<CLASS>/<image>``."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.io import IMAGE_SUFFIXES, read_csv
from pipeline.sources.labels import (
    PBC_CLASSES,
    UnsafeNameError,
    closest_known_class,
    normalize_label,
    safe_name,
)

logger = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": "train", "test": "test"}
IGNORED_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db"}


def is_image_file(path: Path) -> bool:
    """A file with an image extension, hidden or not (PBC publishes ``.DS_169665.jpg``, a real
    image), but not macOS's ``._name`` resource forks or the system files above."""
    return (path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("._")
            and path.name not in IGNORED_NAMES and path.is_file())


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files given directly, and every visible image file below folders given, in a stable
    order; files in folders without an image extension are skipped and counted."""
    files: list[Path] = []
    skipped = 0
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file())
            images = [p for p in found if is_image_file(p)]
            skipped += len(found) - len(images)
            files.extend(images)
        else:
            files.append(item)
    if skipped:
        logger.warning("skipped %d files without an image extension (%s)", skipped,
                       " ".join(sorted(IMAGE_SUFFIXES)))
    return files


class LayoutError(PipelineError, ValueError):
    """No known dataset layout was found; the message says which layouts are expected."""


@dataclass(frozen=True)
class Candidate:
    """One file found in a dataset layout, before it is validated."""

    source: Path
    label: str
    source_split: str
    relative: str


def _visible_dirs(folder: Path) -> list[Path]:
    """The visible sub-folders of ``folder``; a symbolic link to a folder is never followed (a
    link to an ancestor would make the walk endless)."""
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()
        and p.name not in IGNORED_NAMES and not p.name.startswith(".")
    )


def _linked_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_symlink() and p.is_dir())


def _has_images(folder: Path) -> bool:
    """Whether ``folder`` directly holds a file with an image extension."""
    return any(is_image_file(p) for p in folder.iterdir())


def _holds_image_folders(folder: Path) -> bool:
    """Whether a visible sub-folder of ``folder`` directly holds images."""
    return any(_has_images(child) for child in _visible_dirs(folder))


def _known_share(folders: list[Path]) -> float:
    """The share of ``folders`` named like a known white-cell class (aliases included)."""
    def known(name: str) -> bool:
        try:
            return normalize_label(name) in PBC_CLASSES
        except UnsafeNameError:
            return False
    return sum(known(folder.name) for folder in folders) / max(len(folders), 1)


def find_layout(root: Path) -> tuple[Path, str]:
    """Find the shallowest folder holding a known layout below ``root``.

    Returns ``(folder, "split")`` for ``TRAIN|TEST/<CLASS>/*``, ``(folder, "class")`` for
    ``<class>/*`` (at least two folders holding images; stray folders and files beside them are
    ignored with a warning) and ``(folder, "nested")`` for ``<class>/<group>/*`` (patients,
    slides: every image below a class folder is of that class); raises LayoutError when none is
    found, or when images sit two levels down and neither level is named like classes.
    """
    queue = [root]
    while queue:
        folder = queue.pop(0)
        children = _visible_dirs(folder)
        names = {child.name.lower() for child in children}
        if {"train", "test"} <= names:
            return folder, "split"
        if sum(_has_images(child) for child in children) >= 2:
            return _class_level(folder, root)
        queue.extend(children)
    raise LayoutError(
        f"no dataset layout found under {root}: expected <class>/<image> folders "
        "or TRAIN|TEST/<CLASS>/<image>"
    )


def _class_level(folder: Path, root: Path) -> tuple[Path, str]:
    """``folder`` holds folders of images: its own are the classes, unless its siblings hold
    folders of images too (``<class>/<patient>/<image>``), when the level above is."""
    if folder == root:
        return folder, "class"
    parent = folder.parent
    groups = [child for child in _visible_dirs(parent) if _holds_image_folders(child)]
    if len(groups) < 2:
        return folder, "class"
    inner, outer = _known_share(_visible_dirs(folder)), _known_share(groups)
    if outer > inner:
        return parent, "nested"
    if inner > outer:
        others = ", ".join(g.name for g in groups if g != folder)
        logger.warning("ignoring %s in %s: only %s holds folders named like cell classes; give "
                       "another folder as the data source to read it", others, parent, folder.name)
        return folder, "class"
    raise LayoutError(
        f"ambiguous layout under {parent}: {', '.join(g.name for g in groups)} each hold "
        "folders of images, and neither level is named like cell classes; arrange the images "
        "as <class>/<image>")


def _is_outside_link(path: Path, root: Path) -> bool:
    return path.is_symlink() and not path.resolve().is_relative_to(root.resolve())


def _class_candidates(folder: Path, source_split: str, root: Path, nested: bool = False
                      ) -> Iterator[Candidate]:
    prefix = f"{source_split}/" if source_split else ""
    holds = _holds_image_folders if nested else _has_images
    stray = sorted(p.name for p in folder.iterdir()
                   if p.is_file() or (p.is_dir() and not p.is_symlink() and not holds(p)))
    if stray:
        logger.warning("ignoring %s in %s: not class folders of images", ", ".join(stray), folder)
    for link in _linked_dirs(folder):
        if _is_outside_link(link, root):
            logger.warning("skipping %s: a symbolic link pointing outside %s", link, root)
        else:
            logger.warning("skipping %s: a symbolic link to a folder (never followed)", link)
    for class_dir in _visible_dirs(folder):
        if not holds(class_dir):
            continue
        label = _checked_name(class_dir, root, normalize_label, "class folder ")
        if label is None:
            continue
        if (known := closest_known_class(label)) is not None:
            logger.warning("class %r (folder %s) looks like a typo of %r", label, class_dir, known)
        yield from _file_candidates(class_dir, label, source_split, prefix, root)


def _checked_name(path: Path, root: Path, clean: Callable[[str], str], what: str = ""
                  ) -> str | None:
    """``clean(path.name)``, or None (with a logged skip) for a link out of ``root`` or a name
    that cannot be made safe."""
    if _is_outside_link(path, root):
        logger.warning("skipping %s: a symbolic link pointing outside %s", path, root)
        return None
    try:
        return clean(path.name)
    except UnsafeNameError as error:
        logger.warning("skipping %s%s: %s", what, path, error)
        return None


def _file_candidates(class_dir: Path, label: str, source_split: str, prefix: str, root: Path
                     ) -> Iterator[Candidate]:
    for path in sorted(class_dir.rglob("*")):
        if not path.is_file() or path.name.startswith("._") or path.name in IGNORED_NAMES \
                or "__MACOSX" in path.parts:
            continue
        name = _checked_name(path, root, safe_name)
        if name is not None:
            yield Candidate(path, label, source_split, f"{prefix}{label}/{name}")


def scan_layout(root: Path) -> tuple[list[Candidate], str]:
    """List every candidate image of the layout found under ``root`` and the layout's kind."""
    folder, layout = find_layout(root)
    if layout != "split":
        candidates = list(_class_candidates(folder, "", root, nested=layout == "nested"))
    else:
        candidates = []
        for split_dir in _visible_dirs(folder):
            split = SPLIT_FOLDERS.get(split_dir.name.lower())
            if split is None:
                logger.warning("ignoring %s: not a TRAIN or TEST folder", split_dir)
                continue
            candidates.extend(_class_candidates(split_dir, split, root))
    return _unique_relatives(candidates), layout


def labelled_files(location: Path) -> list[Candidate]:
    """The images of a labelled set: a folder in either layout, or a ``manifest.csv`` beside its
    ``images/`` folder (what ``evaluate.external`` scores and ``data.exclude`` holds out)."""
    if location.suffix == ".csv":
        rows = read_csv(location, dtype=str)
        root = location.parent / "images"
        return [Candidate(root / path, normalize_label(label), "", path)
                for path, label in zip(rows["path"], rows["label"], strict=True)]
    return scan_layout(location)[0]


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
