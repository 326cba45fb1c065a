"""Stratification, duplicate grouping, predefined splits and too-small classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.errors import USER_ERROR_EXIT, run_entry_point
from pipeline.io import read_split, write_csv
from pipeline.split import (
    PARTS,
    SplitConfig,
    SplitError,
    assign_folds,
    assign_parts,
    find_groups,
    fold_count,
    fold_dataset,
    split_dataset,
)


def _manifest(per_class: int = 20, classes=("a", "b", "c"), source_split: str = "") -> pd.DataFrame:
    rows = [{"path": f"{c}/{i}.jpg", "label": c, "source_split": source_split,
             "sha256": f"{c}{i}"} for c in classes for i in range(per_class)]
    return pd.DataFrame(rows)


def test_stratified_parts():
    manifest = _manifest()
    groups, _ = find_groups(manifest, None, -1, None)
    part = assign_parts(manifest, groups, 0.2, 0.2, seed=0)
    counts = pd.crosstab(manifest["label"], part)
    assert (counts["test"] == 4).all() and (counts["val"] == 4).all()
    assert (counts["train"] == 12).all()
    again = assign_parts(manifest, groups, 0.2, 0.2, seed=0)
    assert part.equals(again)


def test_identical_bytes_and_near_duplicates_stay_together():
    manifest = _manifest()
    manifest.loc[5, "sha256"] = manifest.loc[17, "sha256"]
    hashes = np.random.default_rng(0).integers(0, 2**63, len(manifest)).astype(np.uint64)
    hashes[30] = hashes[41] ^ np.uint64(0b111)  # 3 bits apart
    groups, links = find_groups(manifest, hashes, 4, None)
    assert links["identical"] == 1 and links["near_duplicate"] == 1
    for seed in range(5):
        part = assign_parts(manifest, groups, 0.2, 0.2, seed=seed)
        assert part[5] == part[17] and part[30] == part[41]


def test_predefined_test_kept_and_augmentations_grouped():
    train = _manifest(24, source_split="train")
    train["path"] = [f"train/{label}/_{i // 4}_{i}.jpeg" for label, i in
                     zip(train["label"], list(range(24)) * 3, strict=True)]
    test = _manifest(5, source_split="test")
    manifest = pd.concat([train, test], ignore_index=True)
    groups, links = find_groups(manifest, None, -1, r"^_(\d+)_\d+\.")
    assert links["same_original"] == 3 * 6 * 3
    part = assign_parts(manifest, groups, 0.25, 0.0, seed=1)
    assert (part[manifest["source_split"] == "test"] == "test").all()
    assert set(part[manifest["source_split"] == "train"]) == {"train", "val"}
    originals = manifest["path"].str.extract(r"/(\w+)/_(\d+)_")
    for _, members in part.groupby([originals[0], originals[1]]):
        assert members.nunique() == 1


def test_class_too_small_fails_clearly():
    manifest = pd.concat([_manifest(20, ("a", "b")), _manifest(2, ("tiny",))], ignore_index=True)
    groups, _ = find_groups(manifest, None, -1, None)
    with pytest.raises(SplitError, match="'tiny'.*missing"):
        assign_parts(manifest, groups, 0.2, 0.2, seed=0)


def test_cross_validation_folds_cover_every_image_once_and_keep_groups():
    manifest = _manifest(25)
    manifest.loc[3, "sha256"] = manifest.loc[9, "sha256"]  # identical bytes: one group
    groups, _ = find_groups(manifest, None, -1, None)
    folds = assign_folds(manifest, groups, 5, val=0.15, seed=0)
    assert len(folds) == 5
    tested = pd.concat([part[part == "test"] for part in folds])
    assert sorted(tested.index) == list(manifest.index)  # each image is test data exactly once
    for part in folds:
        counts = pd.crosstab(manifest["label"], part)
        assert (counts["test"] == 5).all()  # stratified
        assert counts["val"].between(3, 5).all()
        assert part[3] == part[9]
    assert all(a.equals(b) for a, b in zip(folds, assign_folds(manifest, groups, 5, 0.15, 0),
                                           strict=True))


def test_cross_validation_leaves_a_predefined_test_split_out():
    manifest = pd.concat([_manifest(20, source_split="train"), _manifest(4, source_split="test")],
                         ignore_index=True)
    groups, _ = find_groups(manifest, None, -1, None)
    for part in assign_folds(manifest, groups, 4, val=0.1, seed=0):
        assert (part[manifest["source_split"] == "test"] == "").all()
        assert set(part[manifest["source_split"] == "train"]) == {"train", "val", "test"}


@pytest.mark.parametrize("folds", [[1, 2], [0, 0], "3"])
def test_fold_ids_must_be_a_range(folds):
    with pytest.raises(SplitError, match="0..K-1"):
        fold_count(folds)


def test_one_fold_is_refused():
    manifest = _manifest()
    groups, _ = find_groups(manifest, None, -1, None)
    with pytest.raises(SplitError, match="at least 2 folds"):
        assign_folds(manifest, groups, 1, val=0.1, seed=0)


def _split_parts(tmp_path, manifest: pd.DataFrame, config: SplitConfig) -> dict[str, pd.DataFrame]:
    """``manifest`` split, written and read back as the split and folds stages do."""
    for name, rows in split_dataset(manifest, tmp_path / "images", config).parts.items():
        write_csv(tmp_path / "split" / f"{name}.csv", rows)
    return {name: read_split(tmp_path / "split", name) for name in PARTS}


@pytest.mark.parametrize("seed", [0, 7])
def test_folds_come_from_the_split_and_leave_it_alone(tmp_path, seed):
    """The split is the same with folds on or off; the folds stage deals its images out by the
    groups it recorded (identical bytes stay in one part of every fold)."""
    manifest = _manifest(25)
    manifest.loc[3, "sha256"] = manifest.loc[9, "sha256"]
    off = SplitConfig(seed=seed, near_duplicate_distance=-1)
    on = SplitConfig(folds=(0, 1, 2, 3, 4), seed=seed, near_duplicate_distance=-1)
    parts = _split_parts(tmp_path, manifest, off)
    assert all(parts[name].equals(_split_parts(tmp_path / "on", manifest, on)[name])
               for name in PARTS)
    assert fold_dataset(parts, off) == []
    folds = fold_dataset(parts, on)
    assert len(folds) == 5
    tested = pd.concat([fold["test"] for fold in folds])
    assert sorted(tested["path"]) == sorted(manifest["path"])  # each image tested exactly once
    twins = set(manifest.loc[[3, 9], "path"])
    for fold in folds:
        assert [name for name in PARTS if twins & set(fold[name]["path"])] in (
            ["train"], ["val"], ["test"])
        assert all((fold[name]["label"].value_counts() > 0).all() for name in PARTS)
    again = fold_dataset(parts, on)
    assert all(a[name].equals(b[name]) for a, b in zip(folds, again, strict=True)
               for name in PARTS)


def test_folds_of_a_split_without_groups_are_refused(tmp_path):
    parts = _split_parts(tmp_path, _manifest(), SplitConfig(near_duplicate_distance=-1))
    config = SplitConfig(folds=(0, 1, 2), near_duplicate_distance=-1)
    for damaged in ({name: rows.drop(columns="group") for name, rows in parts.items()},
                    {**parts, "val": parts["val"].assign(group=None)}):
        with pytest.raises(SplitError, match="run the split stage again"):
            fold_dataset(damaged, config)


def test_folds_stage_on_a_split_without_groups_exits_2_with_one_line(tmp_path, monkeypatch,
                                                                    capsys):
    """The folds stage on a split made before groups were recorded: one line, exit 2, nothing
    written; on the split as the split stage now writes it, the folds and a summary."""
    from stages import folds as folds_stage

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["split"]["folds"] = [0, 1, 2]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    parts = _split_parts(tmp_path / "data", _manifest(), SplitConfig(near_duplicate_distance=-1))
    for name, rows in parts.items():
        write_csv(tmp_path / "data" / "split" / f"{name}.csv", rows.drop(columns="group"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert run_entry_point(folds_stage.main) == USER_ERROR_EXIT
    refused = capsys.readouterr().err
    assert refused.count("\n") == 1 and refused.startswith("error: "), refused
    assert "run the split stage again" in refused
    assert not (tmp_path / "data" / "folds").exists()

    for name, rows in parts.items():
        write_csv(tmp_path / "data" / "split" / f"{name}.csv", rows)
    assert run_entry_point(folds_stage.main) == 0
    written = sorted(p.relative_to(tmp_path / "data" / "folds").as_posix()
                     for p in (tmp_path / "data" / "folds").rglob("*.csv"))
    assert written == [f"{fold}/{name}.csv" for fold in range(3) for name in sorted(PARTS)]
