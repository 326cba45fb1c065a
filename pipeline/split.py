"""Leakage-safe stratified train/val/test split.

Images that must not straddle parts are grouped first: identical bytes (same sha256), perceptual
near-duplicates (pHash Hamming distance within a bound), and augmentations of one original image
(a file-name pattern such as BCCD's ``_<original>_<n>.jpeg``). Whole groups are then dealt out to
the parts, class by class, so every part keeps the class proportions.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline.errors import PipelineError, process_pool
from pipeline.leakage import phash_hex

logger = logging.getLogger(__name__)

PARTS = ("train", "val", "test")


class SplitError(PipelineError, ValueError):
    """The data cannot be split as asked; the message names the class and the counts."""


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = np.arange(size)

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return int(root)

    def union(self, first: int, second: int) -> None:
        self.parent[self.find(first)] = self.find(second)


def _phash(path: Path) -> int:
    with Image.open(path) as image:
        return int(str(imagehash.phash(image)), 16)


def perceptual_hashes(paths: list[Path], workers: int | None = None) -> np.ndarray:
    """64-bit pHash of every image, as uint64."""
    with process_pool(workers) as pool:
        hashes = list(tqdm(pool.map(_phash, paths, chunksize=64), total=len(paths),
                           desc="phash", unit="img"))
    return np.array(hashes, dtype=np.uint64)


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int]]:
    """Index pairs whose pHash Hamming distance is at most ``max_distance`` (row-wise, O(n^2))."""
    pairs = []
    for index in range(len(hashes) - 1):
        distance = np.bitwise_count(hashes[index + 1:] ^ hashes[index])
        pairs.extend((index, index + 1 + int(j)) for j in np.nonzero(distance <= max_distance)[0])
    return pairs


def find_groups(manifest: pd.DataFrame, hashes: np.ndarray | None, max_distance: int,
                original_pattern: str | None) -> tuple[np.ndarray, dict[str, int]]:
    """Group rows that must stay together; return a group id per row and counts of each link."""
    manifest = manifest.reset_index(drop=True)
    sets = _UnionFind(len(manifest))
    links = {"identical": 0, "near_duplicate": 0, "same_original": 0}

    def link(first: int, second: int, kind: str) -> None:
        if sets.find(first) != sets.find(second):
            links[kind] += 1
            sets.union(first, second)

    def link_equal(keys: pd.Series, kind: str) -> None:
        keys = keys.dropna()
        for first, *others in keys.groupby(keys).groups.values():
            for other in others:
                link(first, other, kind)

    link_equal(manifest["sha256"], "identical")
    if hashes is not None and max_distance >= 0:
        for first, second in near_duplicate_pairs(hashes, max_distance):
            link(first, second, "near_duplicate")
    if original_pattern:
        originals = manifest["path"].map(lambda p: _original_id(p, original_pattern))
        prefix = manifest["source_split"].fillna("") + "/" + manifest["label"] + "/"
        link_equal((prefix + originals.fillna("")).where(originals.notna()), "same_original")
    return np.array([sets.find(i) for i in range(len(manifest))]), links


def _original_id(path: str, pattern: str) -> str | None:
    match = re.search(pattern, Path(path).name)
    return match.group(1) if match else None


def _deal_groups(manifest: pd.DataFrame, groups: np.ndarray, fractions: dict[str, float],
                 seed: int) -> pd.Series:
    """Assign whole groups to parts, class by class, always to the part furthest below target."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"label": manifest["label"].to_numpy(), "group": groups})
    group_label = frame.groupby("group")["label"].agg(lambda s: s.value_counts().index[0])
    group_size = frame.groupby("group").size()
    part_of_group: dict[int, str] = {}
    for label in sorted(group_label.unique()):
        members = group_label.index[group_label == label].to_numpy()
        members = members[rng.permutation(len(members))]
        total = group_size[members].sum()
        filled = dict.fromkeys(fractions, 0)
        for group in members:
            target = max(fractions, key=lambda p: fractions[p] * total - filled[p])
            filled[target] += group_size[group]
            part_of_group[group] = target
    return pd.Series(frame["group"].map(part_of_group).to_numpy(), index=manifest.index)


def assign_parts(manifest: pd.DataFrame, groups: np.ndarray, val: float, test: float,
                 seed: int) -> pd.Series:
    """Return the part (train/val/test) of every row.

    A source with a predefined test split keeps it; val is then carved out of its train part.
    """
    predefined = manifest["source_split"].fillna("").eq("test")
    if predefined.any():
        part = pd.Series("test", index=manifest.index)
        train_rows = ~predefined
        part[train_rows] = _deal_groups(manifest[train_rows], groups[train_rows.to_numpy()],
                                        {"train": 1 - val, "val": val}, seed)
    else:
        part = _deal_groups(manifest, groups, {"train": 1 - val - test, "val": val, "test": test},
                            seed)
    _check_every_part(manifest, part)
    return part


def assign_folds(manifest: pd.DataFrame, groups: np.ndarray, folds: int, val: float, seed: int
                 ) -> list[pd.Series]:
    """Parts (train/val/test) of every row for each of ``folds`` cross-validation folds.

    Whole groups are dealt into ``folds`` stratified folds; fold k is the test part of the k-th
    split, and ``val`` (a share of all images) is carved out of the other folds, again by group.
    Rows of a predefined test split take no part: their part is ``""`` in every fold.
    """
    if folds < 2:
        raise SplitError(f"cross-validation needs at least 2 folds, not {folds}")
    pool = ~manifest["source_split"].fillna("").eq("test")
    fold_of_row = _deal_groups(manifest[pool], groups[pool.to_numpy()],
                               dict.fromkeys(range(folds), 1 / folds), seed)
    val_of_rest = val / (1 - 1 / folds)
    parts = []
    for fold in range(folds):
        part = pd.Series("", index=manifest.index)
        part[fold_of_row[fold_of_row == fold].index] = "test"
        rest = fold_of_row.index[fold_of_row != fold]
        part[rest] = _deal_groups(manifest.loc[rest], groups[manifest.index.get_indexer(rest)],
                                  {"train": 1 - val_of_rest, "val": val_of_rest}, seed + fold)
        _check_every_part(manifest[pool], part[pool], f"fold {fold}: ")
        parts.append(part)
    return parts


def _check_every_part(manifest: pd.DataFrame, part: pd.Series, context: str = "") -> None:
    counts = pd.crosstab(manifest["label"], part).reindex(columns=PARTS, fill_value=0)
    for label, row in counts.iterrows():
        missing = [p for p in PARTS if row[p] == 0]
        if missing:
            raise SplitError(
                f"{context}class {label!r} has {row.sum()} images ({dict(row)}), too few to "
                f"appear in every part (missing: {', '.join(missing)}); add images or change "
                "split ratios"
            )


@dataclass(frozen=True)
class SplitResult:
    """The split's parts (each image with its leakage ``group``) and a summary."""

    parts: dict[str, pd.DataFrame]
    summary: dict[str, Any]


def fold_count(fold_ids: list[int] | None) -> int:
    """Number of cross-validation folds that ``split.folds`` asks for (0: off).

    The param lists the fold ids, ``[0, 1, ..., K-1]``, because DVC's ``matrix:`` runs one
    train and evaluate stage per listed fold.
    """
    ids = list(fold_ids or [])
    if ids != list(range(len(ids))):
        raise SplitError(f"split.folds must list the fold ids 0..K-1, e.g. [0, 1, 2, 3, 4], "
                         f"not {ids}")
    return len(ids)


def _counts(parts: dict[str, pd.DataFrame]) -> dict[str, dict[str, int]]:
    return {name: frame["label"].value_counts().sort_index().to_dict()
            for name, frame in parts.items()}


@dataclass(frozen=True)
class SplitConfig:
    """How to split (``params.yaml: split``)."""

    folds: tuple[int, ...] = ()  # cross-validation fold ids 0..K-1; () off (fold_dataset's)
    val: float = 0.15
    test: float = 0.15
    seed: int = 42
    near_duplicate_distance: int = 4  # pHash Hamming distance grouping near-duplicates; -1 off
    original_id_pattern: str = r"^_(\d+)_\d+\."

    def __post_init__(self) -> None:
        object.__setattr__(self, "folds", tuple(self.folds))  # a YAML list
        fold_count(list(self.folds))


def split_dataset(manifest: pd.DataFrame, images_dir: Path, config: SplitConfig) -> SplitResult:
    """Split a manifest as ``config`` says (its ``folds`` are :func:`fold_dataset`'s). Every row
    keeps its leakage group, in a ``group`` column, so that folds deal out the same groups."""
    max_distance = int(config.near_duplicate_distance)
    hashes = None
    if max_distance >= 0:
        hashes = perceptual_hashes([images_dir / p for p in manifest["path"]])
    groups, links = find_groups(manifest, hashes, max_distance, config.original_id_pattern)
    manifest = manifest.reset_index(drop=True).assign(group=groups)
    if hashes is not None:  # a trained model records them (pipeline.leakage)
        manifest = manifest.assign(phash=[phash_hex(h) for h in hashes])
    part = assign_parts(manifest, groups, config.val, config.test, config.seed)
    parts = {name: manifest[part == name].sort_values("path") for name in PARTS}
    group_sizes = pd.Series(groups).value_counts()
    summary = {
        "images": len(manifest),
        "groups": int(group_sizes.size),
        "groups_of_several": int((group_sizes > 1).sum()),
        "links": links,
        "counts": _counts(parts),
    }
    logger.info("split: %s", {name: len(frame) for name, frame in parts.items()})
    return SplitResult(parts, summary)


def fold_dataset(parts: dict[str, pd.DataFrame], config: SplitConfig
                 ) -> list[dict[str, pd.DataFrame]]:
    """The cross-validation folds that ``config.folds`` asks for (none when off) of the split's
    images: ``parts`` as :func:`split_dataset` made them, whose ``group`` column keeps every
    group of duplicates, near-duplicates and augmentations inside one part of each fold.

    Its own stage (``folds``, into data/folds), so that turning cross-validation on or off
    leaves data/split, and every model trained on it, untouched."""
    folds = len(config.folds)  # checked by SplitConfig
    if not folds:
        return []
    rows = pd.concat(parts.values(), ignore_index=True)
    if "group" not in rows.columns or rows["group"].isna().any():
        raise SplitError("the split has no leakage group for every image (a split made before "
                         "folds were a stage of their own?): run the split stage again")
    rows = rows.sort_values("path", ignore_index=True)
    groups = rows["group"].to_numpy(dtype=np.int64)
    fold_parts = [{name: rows[fold_part == name] for name in PARTS}
                  for fold_part in assign_folds(rows, groups, folds, config.val, config.seed)]
    logger.info("%d cross-validation folds", folds)
    return fold_parts


def fold_summary(fold_parts: list[dict[str, pd.DataFrame]]) -> dict[str, Any]:
    """Images per class in each part of each fold."""
    return {"folds": [_counts(fold) for fold in fold_parts]}
