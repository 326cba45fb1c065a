"""Shared fixtures: small synthetic data sets that the project generates itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.masks import MaskParams, build_masks
from pipeline.sources.ingest import ingest
from pipeline.sources.synthetic import generate_dataset
from pipeline.split import SplitConfig, split_dataset

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
for role in ("AUTHOR", "COMMITTER"):  # tests commit into throw-away repositories
    os.environ.setdefault(f"GIT_{role}_NAME", "tests")
    os.environ.setdefault(f"GIT_{role}_EMAIL", "tests@wbc.local")

SPLIT_CONFIG = SplitConfig(val=0.2, test=0.2, seed=0)


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory) -> Path:
    """10 generated images per PBC class, in the class-per-folder layout."""
    root = tmp_path_factory.mktemp("synthetic") / "cells"
    generate_dataset(root, images_per_class=10, seed=3)
    return root


@pytest.fixture(scope="session")
def unseen_folder(tmp_path_factory) -> Path:
    """10 images per class generated with another seed: another laboratory's cells, which no
    model trained on ``prepared`` has seen (scoring refuses images a model has seen)."""
    root = tmp_path_factory.mktemp("unseen") / "cells"
    generate_dataset(root, images_per_class=10, seed=4)
    return root


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, synthetic_folder) -> Path:
    """A data/ folder as the pipeline's first three stages leave it: raw, masks, split."""
    data = tmp_path_factory.mktemp("data")
    manifest = ingest(synthetic_folder, data / "raw", {"source": "test"})
    build_masks(manifest, data / "raw" / "images", data / "masks", MaskParams(),
                gallery_per_class=2)
    parts = split_dataset(manifest, data / "raw" / "images", SPLIT_CONFIG).parts
    (data / "split").mkdir()
    for name, rows in parts.items():
        rows.to_csv(data / "split" / f"{name}.csv", index=False)
    return data

