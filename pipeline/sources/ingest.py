"""Data sources (synthetic, PBC, BCCD, a local folder or zip) and their ingest into one manifest.

Every source ends up as ``<out>/images/<relative path>`` plus ``<out>/manifest.csv`` with one row
per valid image, ``<out>/rejected.csv`` listing the files that were skipped and why, and
``<out>/source.json`` recording where the data came from and its label set.
"""

from __future__ import annotations

import hashlib
import logging
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from pipeline.config import as_tuple
from pipeline.errors import PipelineError, one_line, process_pool
from pipeline.io import (
    MAX_FILE_BYTES,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    ImageDecodeError,
    atomic_path,
    check_output,
    decode_image,
    ensure_inside,
    read_regular_file,
    write_csv,
    write_json,
)
from pipeline.sources.archive import ArchiveLimits, safe_extract
from pipeline.sources.download import DownloadError, download, sha256_file
from pipeline.sources.layout import Candidate, LayoutError, labelled_files, scan_layout
from pipeline.sources.synthetic import generate_dataset

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["path", "label", "source_split", "sha256", "width", "height", "bytes"]


class SourceError(PipelineError, RuntimeError):
    """A data source cannot be read; the message is one line saying what to do."""


@dataclass(frozen=True)
class RemoteSource:
    """A public archive: where it lives and what it is called in the download cache."""

    url: str
    filename: str
    sha256: str | None = None


REMOTE_SOURCES: dict[str, RemoteSource] = {
    "pbc": RemoteSource(
        url="https://data.mendeley.com/public-files/datasets/snkd93bnjr/files/"
        "2fc38728-2ae7-4a62-a857-032af82334c3/file_downloaded",
        filename="PBC_dataset_normal_DIB.zip",
    ),
    "bccd": RemoteSource(
        url="https://github.com/dhruvp/wbc-classification/archive/refs/heads/master.zip",
        filename="wbc-classification-master.zip",
    ),
}


@dataclass(frozen=True)
class ImageLimits:
    """What an image must satisfy to be ingested (``params.yaml: data``)."""

    max_pixels: int = MAX_IMAGE_PIXELS
    min_side: int = MIN_IMAGE_SIDE
    max_bytes: int = MAX_FILE_BYTES


@dataclass(frozen=True)
class SyntheticConfig:
    """The generated data set (``params.yaml: data.synthetic``)."""

    images_per_class: int = 60
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and what is let in (``params.yaml: data``)."""

    source: str = "synthetic"  # synthetic | a name in REMOTE_SOURCES | a folder or archive path
    cache_dir: str = ".cache/downloads"
    timeout_s: float = 60
    retries: int = 5
    max_image_pixels: int = ImageLimits.max_pixels
    min_image_side: int = ImageLimits.min_side
    max_file_bytes: int = ImageLimits.max_bytes  # larger files are skipped unread
    archive_max_total_bytes: int = ArchiveLimits.max_total_bytes
    archive_max_entries: int = ArchiveLimits.max_entries
    archive_max_entry_bytes: int = ArchiveLimits.max_entry_bytes
    synthetic: SyntheticConfig = SyntheticConfig()
    per_class: int | None = None  # ingest a random N images per class (the same for a seed)
    seed: int = 0  # of that draw
    # labelled sets (folders, or manifest.csv files, as evaluate.external takes them) whose
    # images must stay out: a file with the same bytes is not ingested
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(map(str, as_tuple(self.exclude))))

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_pixels, self.min_image_side, self.max_file_bytes)

    @property
    def archive_limits(self) -> ArchiveLimits:
        return ArchiveLimits(self.archive_max_total_bytes, self.archive_max_entries,
                             self.archive_max_entry_bytes)


def _ingest_one(job: tuple[Candidate, Path, Path, ImageLimits]) -> dict[str, Any]:
    """Validate one file by decoding it whole; copy it into place when it is a good image."""
    cand, root, images_dir, limits = job
    shown = cand.source.relative_to(root).as_posix()
    try:
        data = read_regular_file(cand.source, limits.max_bytes)
        pixels = decode_image(data, limits.max_pixels, limits.min_side, limits.max_bytes)
    except (ImageDecodeError, OSError) as error:
        reason = one_line(error).removeprefix("cannot decode <bytes>: ")
        return {"file": shown, "reason": reason}
    target = ensure_inside(images_dir / cand.relative, images_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    height, width = pixels.shape[:2]
    return {
        "path": cand.relative,
        "label": cand.label,
        "source_split": cand.source_split,
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": width,
        "height": height,
        "bytes": len(data),
    }


def draw_per_class(candidates: list[Candidate], per_class: int | None, seed: int
                   ) -> list[Candidate]:
    """At most ``per_class`` files of each class, drawn at random but the same for a seed."""
    if per_class is None:
        return candidates
    rng = random.Random(seed)
    kept = []
    for label in sorted({c.label for c in candidates}):
        files = sorted((c for c in candidates if c.label == label), key=lambda c: c.relative)
        kept += rng.sample(files, min(per_class, len(files)))
    return sorted(kept, key=lambda c: c.relative)


def exclude_path(location: str) -> Path:
    """A ``data.exclude`` entry as a path: an existing folder or ``.csv`` file (an empty entry,
    a plain file, a pipe or a device is refused before anything reads it)."""
    path = Path(location).expanduser()
    if not location.strip() or not (path.is_dir() or (path.suffix == ".csv" and path.is_file())):
        raise SourceError(f"data.exclude: {location!r} is not a folder or manifest.csv")
    return path


def held_out_digests(locations: tuple[str, ...]) -> dict[str, str]:
    """``{sha256: location}`` for every image of the ``data.exclude`` sets."""
    digests: dict[str, str] = {}
    for location in locations:
        try:
            files = [c.source for c in labelled_files(exclude_path(location))]
        except LayoutError as error:
            raise SourceError(f"data.exclude: {one_line(error)}") from error
        for file in tqdm(files, desc=f"exclude {Path(location).name}", unit="file", leave=False):
            try:
                digests.setdefault(sha256_file(file), location)
            except OSError as error:
                raise SourceError(f"data.exclude: cannot read {file} ({one_line(error)})"
                                  ) from error
    return digests


def _sha256_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:  # unreadable: ingest rejects it, with its reason
        return None


def drop_held_out(candidates: list[Candidate], held_out: dict[str, str], root: Path
                  ) -> tuple[list[Candidate], pd.DataFrame]:
    """The candidates whose bytes are not in ``held_out`` (``{sha256: location}``), and a table
    of the others: ``file`` (relative to ``root``) and ``excluded_by`` (the location). A location
    that leaves nothing out is named in a warning: its files are not the source's."""
    kept, dropped = [], []
    for cand in tqdm(candidates, desc="exclude", unit="file", disable=not held_out):
        location = held_out.get(_sha256_or_none(cand.source)) if held_out else None
        if location is None:
            kept.append(cand)
        else:
            dropped.append({"file": cand.source.relative_to(root).as_posix(),
                            "excluded_by": location})
    excluded = pd.DataFrame(dropped, columns=["file", "excluded_by"])
    for location in sorted(set(held_out.values()) - set(excluded["excluded_by"])):
        logger.warning("data.exclude: no file of the data source has the bytes of an image in "
                       "%s (a re-encoded copy is not recognised)", location)
    return kept, excluded


def ingest(root: Path, out_dir: Path, provenance: dict[str, Any], workers: int | None = None,
           per_class: int | None = None, seed: int = 0, limits: ImageLimits = ImageLimits(),
           held_out: dict[str, str] | None = None) -> pd.DataFrame:
    """Validate and copy every image under ``root`` into ``out_dir``, atomically.

    Corrupt, truncated, oversized, too small and non-image files are skipped with a warning and
    listed in ``rejected.csv`` (paths relative to ``root``, sorted: the same bytes every run);
    they never enter the manifest. Files whose bytes are in ``held_out`` (``{sha256: location}``,
    from ``data.exclude``) are left out before the per-class draw and listed in ``excluded.csv``.
    Every written file is checked to lie inside ``out_dir``.
    """
    candidates, layout = scan_layout(root)
    candidates, excluded = drop_held_out(candidates, held_out or {}, root)
    if len(excluded):
        logger.info("left out %d files byte-identical to images of %s (data.exclude)",
                    len(excluded), ", ".join(sorted(set(excluded["excluded_by"]))))
        if not candidates:
            raise SourceError(f"all {len(excluded)} files under {root} are images of the "
                              f"data.exclude sets: nothing is left to ingest")
    candidates = draw_per_class(candidates, per_class, seed)
    if not candidates:
        raise SourceError(f"no files found in the dataset under {root}")
    with atomic_path(out_dir) as tmp:
        images_dir = tmp / "images"
        images_dir.mkdir(parents=True)
        jobs = [(c, root, images_dir, limits) for c in candidates]
        with process_pool(workers) as pool:
            results = list(tqdm(pool.map(_ingest_one, jobs, chunksize=32),
                                total=len(candidates), desc="ingest", unit="img"))
        rows = [r for r in results if "path" in r]
        rejected = pd.DataFrame([r for r in results if "reason" in r], columns=["file", "reason"])
        rejected = rejected.sort_values("file", kind="stable")
        if not rows:
            raise SourceError(f"none of the {len(candidates)} files under {root} is an image")
        for written in images_dir.rglob("*"):
            ensure_inside(written, images_dir)
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values("path")
        for rej in rejected.itertuples():
            logger.warning("skipped %s: %s", rej.file, rej.reason)
        write_csv(tmp / "manifest.csv", manifest)
        write_csv(tmp / "rejected.csv", rejected)
        write_csv(tmp / "excluded.csv", excluded.sort_values("file", kind="stable"))
        write_json(tmp / "source.json", {
            **provenance,
            "layout": layout,
            "classes": sorted(manifest["label"].unique()),
            "images": len(manifest),
            "rejected": len(rejected),
            "excluded": {location: int((excluded["excluded_by"] == location).sum())
                         for location in sorted(set((held_out or {}).values()))},
            "per_class": manifest.groupby("label").size().to_dict(),
        })
    logger.info("ingested %d images (%d rejected) into %s", len(manifest), len(rejected), out_dir)
    return manifest


def _offline_hint(name: str, remote: RemoteSource, error: Exception) -> SourceError:
    return SourceError(
        f"cannot download the {name} dataset from {remote.url} ({error}); offline, use a local "
        "copy (`dvc exp run -S data.source=/path/to/folder_or.zip`) or generated data "
        "(`dvc exp run -S data.source=synthetic`)"
    )


def _fetch_remote(name: str, config: DataConfig, cache_dir: Path
                  ) -> tuple[Path, dict[str, Any]]:
    remote = REMOTE_SOURCES[name]
    archive = cache_dir / remote.filename
    try:
        digest = download(remote.url, archive, sha256=remote.sha256,
                          timeout=config.timeout_s, retries=config.retries)
    except DownloadError as error:
        raise _offline_hint(name, remote, error) from error
    extracted = cache_dir / f"{archive.stem}-{digest[:12]}"
    if not extracted.is_dir():
        safe_extract(archive, extracted, config.archive_limits)
    return extracted, {"source": name, "url": remote.url, "sha256": digest}


def local_source(source: str) -> Path:
    """``data.source`` naming a local folder or archive, as a path; SourceError, before anything
    is read, for an empty setting (an unset ``$DATA`` in ``-S data.source=$DATA``), the project
    folder itself or one holding it, and anything but a folder or a regular file (a pipe
    would block forever)."""
    if not source.strip():
        raise SourceError("data.source is empty (an unset variable in -S data.source=$DATA?): "
                          f"name synthetic, {', '.join(REMOTE_SOURCES)}, a folder or an archive")
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(
            f"data.source {source!r} is neither synthetic, {', '.join(REMOTE_SOURCES)} "
            "nor an existing folder or archive"
        )
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise SourceError(f"data.source {source!r} is the project folder or holds it: its data, "
                          "figures and reports are no data set; name the images' own folder")
    if not (path.is_dir() or path.is_file()):
        raise SourceError(f"data.source {source!r} is neither a folder nor an archive file "
                          "(a pipe, socket or device)")
    return path


def build_raw_dataset(config: DataConfig, out_dir: Path, cache_dir: Path) -> pd.DataFrame:
    """Resolve ``data.source`` to images and ingest them into ``out_dir`` (the download stage)."""
    source = str(config.source)
    limits = config.image_limits
    cache_dir.mkdir(parents=True, exist_ok=True)
    which = {"per_class": config.per_class, "seed": config.seed,  # the images let in
             "held_out": held_out_digests(config.exclude)}
    if source == "synthetic":
        settings = asdict(config.synthetic)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            root = Path(tmp) / "synthetic"
            generate_dataset(root, settings["images_per_class"], seed=settings["seed"])
            return ingest(root, out_dir, {"source": "synthetic", **settings}, limits=limits,
                          **which)
    if source in REMOTE_SOURCES:
        root, provenance = _fetch_remote(source, config, cache_dir)
        return ingest(root, out_dir, provenance, limits=limits, **which)
    path = local_source(source)
    check_output(out_dir, [path], folder=True)
    if path.is_dir():
        return ingest(path, out_dir, {"source": str(path.resolve())}, limits=limits, **which)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        root = safe_extract(path, Path(tmp) / "archive", config.archive_limits)
        provenance = {"source": str(path.resolve()), "sha256": sha256_file(path)}
        return ingest(root, out_dir, provenance, limits=limits, **which)

