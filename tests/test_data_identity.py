"""What identifies the input data (the source stage) and the per-class subset drawn at ingest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.fingerprint import (
    EvaluationSetError,
    evaluation_sets_fingerprint,
    source_fingerprint,
)
from pipeline.io import read_json
from pipeline.sources import DataConfig, SourceError, build_raw_dataset
from pipeline.sources.download import sha256_file
from pipeline.sources.ingest import SyntheticConfig
from pipeline.sources.synthetic import generate_dataset


def test_per_class_subset_is_seeded(synthetic_folder, tmp_path):
    def draw(seed: int, name: str) -> pd.DataFrame:
        settings = DataConfig(source=str(synthetic_folder), per_class=4, seed=seed)
        return build_raw_dataset(settings, tmp_path / name, tmp_path / "cache")

    first, again, other = draw(0, "a"), draw(0, "b"), draw(1, "c")
    assert first["label"].value_counts().to_dict() == {c: 4 for c in first["label"].unique()}
    assert first["label"].nunique() == 8
    assert first["path"].tolist() == again["path"].tolist()
    assert first["path"].tolist() != other["path"].tolist()
    drawn = first.groupby("label")["path"].apply(lambda paths: sorted(Path(p).name for p in paths))
    assert any(names != sorted(f.name for f in (synthetic_folder / label).iterdir())[:4]
               for label, names in drawn.items())  # not simply the first files
    everything = build_raw_dataset(DataConfig(source=str(synthetic_folder), per_class=1000),
                                   tmp_path / "all", tmp_path / "cache")
    assert len(everything) == 80  # fewer than asked: the whole class


def test_fingerprint_follows_the_folder_content(synthetic_folder, tmp_path):
    folder = tmp_path / "cells"
    shutil.copytree(synthetic_folder, folder)
    settings, cache = DataConfig(source=str(folder)), tmp_path / "cache"
    first = source_fingerprint(settings, cache)
    assert first["files"] == 80 and source_fingerprint(settings, cache) == first
    image = sorted((folder / "monocyte").iterdir())[0]
    image.write_bytes(sorted((folder / "platelet").iterdir())[0].read_bytes())
    edited = source_fingerprint(settings, cache)
    assert edited["sha256"] != first["sha256"] and edited["files"] == 80
    image.unlink()
    assert source_fingerprint(settings, cache)["files"] == 79
    assert source_fingerprint(replace(settings, per_class=5), cache)["per_class"] == 5


def test_fingerprint_of_remote_and_generated_sources(tmp_path):
    pbc = source_fingerprint(DataConfig(source="pbc"), tmp_path)
    assert pbc["url"].startswith("https://") and "sha256" in pbc
    generated = DataConfig(synthetic=SyntheticConfig(images_per_class=5, seed=1))
    assert source_fingerprint(generated, tmp_path)["synthetic"] == {"images_per_class": 5,
                                                                     "seed": 1}
    with pytest.raises(SourceError, match="neither synthetic"):
        source_fingerprint(DataConfig(source=str(tmp_path / "missing")), tmp_path)


def test_exclude_keeps_another_sets_images_out(synthetic_folder, tmp_path, caplog):
    """``data.exclude``: files byte-identical to an excluded set's (whatever their names) are
    not ingested, before the per-class draw; they are listed and counted; a set sharing no file
    is named in a warning; the fingerprint follows the excluded set's content; a string is one
    set; a missing set, or one that leaves nothing, is refused in one line."""
    external, unrelated = tmp_path / "external", tmp_path / "unrelated"
    for label in ("mono", "lympho"):
        (external / label).mkdir(parents=True)
    monocytes = sorted((synthetic_folder / "monocyte").iterdir())
    for image in monocytes[:3]:
        shutil.copy(image, external / "mono" / f"renamed-{image.name}")
    generate_dataset(unrelated, images_per_class=2, seed=9)
    shutil.copy(next((unrelated / "lymphocyte").iterdir()), external / "lympho" / "x.jpg")
    settings, cache = DataConfig(source=str(synthetic_folder), per_class=8,
                                 exclude=[str(external), str(unrelated)]), tmp_path / "cache"
    with caplog.at_level("WARNING"):
        manifest = build_raw_dataset(settings, tmp_path / "raw", cache)
    assert f"no file of the data source has the bytes of an image in {unrelated}" in caplog.text
    counts = manifest["label"].value_counts()
    assert counts["monocyte"] == 7 and counts["platelet"] == 8  # excluded before the draw
    assert not set(manifest["sha256"]) & {sha256_file(p) for p in monocytes[:3]}
    excluded = pd.read_csv(tmp_path / "raw" / "excluded.csv")
    assert excluded["file"].tolist() == [f"monocyte/{p.name}" for p in monocytes[:3]]
    assert set(excluded["excluded_by"]) == {str(external)}
    assert read_json(tmp_path / "raw" / "source.json")["excluded"] == {str(external): 3,
                                                                       str(unrelated): 0}
    first = source_fingerprint(settings, cache)
    assert first["exclude"][str(external)]["files"] == 4
    (external / "mono" / f"renamed-{monocytes[0].name}").unlink()
    assert source_fingerprint(settings, cache)["exclude"] != first["exclude"]
    assert "exclude" not in source_fingerprint(replace(settings, exclude=()), cache)
    assert DataConfig(exclude=str(external)).exclude == (str(external),)
    os.mkfifo(tmp_path / "pipe.csv")
    for wrong in (tmp_path / "missing", monocytes[0], tmp_path / "pipe.csv", ""):
        bad = replace(settings, exclude=(str(wrong),))
        for step in (lambda: source_fingerprint(bad, cache),  # noqa: B023 - called at once
                     lambda: build_raw_dataset(bad, tmp_path / "raw2", cache)):  # noqa: B023
            with pytest.raises(PipelineError, match=r"data.exclude: '.*' is not a folder or "
                                                    r"manifest.csv"):
                step()
    listed = tmp_path / "listed"  # a manifest.csv naming a pipe: one line, not a hang
    (listed / "images").mkdir(parents=True)
    os.mkfifo(listed / "images" / "pipe.jpg")
    (listed / "manifest.csv").write_text("path,label\npipe.jpg,monocyte\n")
    with pytest.raises(PipelineError, match="data.exclude: cannot read .*pipe.jpg .*not a "
                                            "regular file"):
        build_raw_dataset(replace(settings, exclude=(str(listed / "manifest.csv"),)),
                          tmp_path / "raw2", cache)
    everything = replace(settings, exclude=(str(synthetic_folder),))
    with pytest.raises(PipelineError, match="all 80 files under .* are images of the "
                                            "data.exclude sets"):
        build_raw_dataset(everything, tmp_path / "raw2", cache)
    assert not (tmp_path / "raw2").exists()


def test_evaluation_sets_fingerprint_follows_each_sets_content(synthetic_folder, tmp_path):
    """The external stage's identity of evaluate.external, .dataset and .adapt: the same for an
    untouched set, changed by an edited image in any of them; a manifest is its folder."""
    external, unlabelled = tmp_path / "external", tmp_path / "unlabelled"
    shutil.copytree(synthetic_folder, external)
    shutil.copytree(synthetic_folder / "monocyte", unlabelled)
    manifest = tmp_path / "listed" / "manifest.csv"
    (manifest.parent / "images").mkdir(parents=True)
    shutil.copy(next(unlabelled.iterdir()), manifest.parent / "images" / "a.png")
    manifest.write_text("path,label\na.png,monocyte\n")
    cache = tmp_path / "cache"

    def fingerprint() -> dict:
        return evaluation_sets_fingerprint((str(external),), str(manifest),
                                           {"lab": str(unlabelled)}, cache)

    first = fingerprint()
    assert first["external"][str(external)]["files"] == 80 and fingerprint() == first
    assert first["dataset"]["files"] == 2  # the manifest and its images/
    donor = sorted((synthetic_folder / "platelet").iterdir())[0].read_bytes()
    for edited_set, image in (("external", sorted((external / "monocyte").iterdir())[0]),
                              ("adapt", sorted(unlabelled.iterdir())[0]),
                              ("dataset", manifest.parent / "images" / "a.png")):
        before = fingerprint()
        image.write_bytes(donor)  # same name, other bytes
        after = fingerprint()
        assert after[edited_set] != before[edited_set], edited_set
        assert {k: v for k, v in after.items() if k != edited_set} == {
            k: v for k, v in before.items() if k != edited_set}
    assert evaluation_sets_fingerprint((), None, {}, cache) == {
        "external": {}, "dataset": None, "adapt": {}}


def test_evaluation_sets_fingerprint_of_bad_locations(tmp_path, monkeypatch):
    """A missing set, a pipe or a plain file are recorded as not found (never opened: the
    evaluation names the problem); the project folder or one holding it is refused."""
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "notes.txt").write_text("not a set")
    odd = (str(tmp_path / "nowhere"), str(tmp_path / "pipe"), str(tmp_path / "notes.txt"), " ")
    found = evaluation_sets_fingerprint(odd, str(tmp_path / "pipe"), {"lab": ""}, tmp_path / "c")
    assert found == {"external": dict.fromkeys(odd, {"found": False}),
                     "dataset": {"found": False}, "adapt": {"lab": {"found": False}}}
    for location in (".", str(tmp_path), str(project)):
        with pytest.raises(EvaluationSetError, match=r"^evaluate.adapt.lab .* holds it"):
            evaluation_sets_fingerprint((), None, {"lab": location}, tmp_path / "c")


def test_external_stage_writes_the_fingerprint_or_one_line(synthetic_folder, tmp_path):
    """``python -m stages.external``: data/external_fingerprint.json for a set; for the project
    folder as a set, exit 2 with one line and nothing written."""
    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())

    def external_stage(sets: list[str]) -> subprocess.CompletedProcess:
        params["evaluate"]["external"] = sets
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        return subprocess.run([sys.executable, "-m", "stages.external"], cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True,
                              text=True, timeout=300)

    refused = external_stage(["."])
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("error: evaluate.external '.' is the project folder")
    assert not (tmp_path / "data").exists()
    assert external_stage([str(synthetic_folder)]).returncode == 0
    written = read_json(tmp_path / "data" / "external_fingerprint.json")
    assert written["external"][str(synthetic_folder)]["files"] == 80
