"""The identity of the input data, recomputed on every run by the ``source`` stage.

DVC cannot watch a folder outside the repository, so the ``source`` stage is ``always_changed``
and writes a small JSON that the ``download`` stage depends on: when the data did not change the
JSON does not either, and nothing downstream reruns. The identity is

- a local folder or archive: every file's relative path, size and sha256. Hashes are reused
  from ``<cache_dir>/fingerprints.json`` while a file's size, modification time, change time
  and inode are the same (the change time cannot be set back: a file replaced by another of
  the same size with the old modification time put back is hashed again), so an unchanged
  folder costs a directory walk, not a read of every image;
- a remote archive: its URL and pinned sha256 (the download verifies it);
- generated data: the generator's settings.

The ``external`` stage does the same for the sets that evaluations score (``evaluate.external``,
``evaluate.dataset`` and the folders of ``evaluate.adapt``): an edited set reruns the evaluations
and nothing upstream of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.io import read_json, write_json
from pipeline.sources import (
    REMOTE_SOURCES,
    DataConfig,
    exclude_path,
    local_source,
    sha256_file,
)


class EvaluationSetError(PipelineError, ValueError):
    """An evaluation set's location that cannot be fingerprinted (it holds the project)."""


def _file_hashes(root: Path, cache_file: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {bytes, sha256}}`` of every file under ``root`` (or of ``root``)."""
    cache = _read_cache(cache_file)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    found = {}
    for path in tqdm(files, desc="fingerprint", unit="file", leave=False):
        stat = path.stat()
        key = str(path.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]
        entry = cache.get(key)
        if not isinstance(entry, dict) or entry.get("stamp") != stamp or "sha256" not in entry:
            cache[key] = {"stamp": stamp, "sha256": sha256_file(path)}
        name = path.relative_to(root).as_posix() if root.is_dir() else path.name
        found[name] = {"bytes": stat.st_size, "sha256": cache[key]["sha256"]}
    write_json(cache_file, cache)
    return found


def _read_cache(cache_file: Path) -> dict[str, Any]:
    """The hash cache; an unreadable or damaged one is only a cache: start afresh."""
    try:
        cache = read_json(cache_file)
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def source_fingerprint(config: DataConfig, cache_dir: Path) -> dict[str, Any]:
    """What identifies ``data.source``'s content (see the module docstring)."""
    source = str(config.source)
    subset = {"per_class": config.per_class, "seed": config.seed,  # which images are ingested
              **_exclude_identity(config.exclude, cache_dir)}
    if source == "synthetic":
        return {"source": source, "synthetic": asdict(config.synthetic), **subset}
    if source in REMOTE_SOURCES:
        remote = REMOTE_SOURCES[source]
        return {"source": source, "url": remote.url, "sha256": remote.sha256, **subset}
    path = local_source(source)
    return {"source": str(path.resolve()), **_content_identity(path, cache_dir), **subset}


def _content_identity(path: Path, cache_dir: Path) -> dict[str, Any]:
    """Files, bytes and one sha256 over every file's path, size and sha256 under ``path``."""
    files = _file_hashes(path, cache_dir / "fingerprints.json")
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"files": len(files), "bytes": sum(f["bytes"] for f in files.values()),
            "sha256": digest}


def _set_identity(path: Path, cache_dir: Path) -> dict[str, Any]:
    """The content of a set: a folder's, or a ``manifest.csv``'s folder's (its ``images/``)."""
    return _content_identity(path.parent if path.suffix == ".csv" else path, cache_dir)


def _exclude_identity(locations: tuple[str, ...], cache_dir: Path) -> dict[str, Any]:
    """The content of the ``data.exclude`` sets (a manifest's: its folder's), nothing when there
    are none."""
    if not locations:
        return {}
    return {"exclude": {location: _set_identity(exclude_path(location), cache_dir)
                        for location in locations}}


def _evaluation_set_identity(key: str, location: str, cache_dir: Path) -> dict[str, Any]:
    """A set's content, or ``{"found": false}`` for anything but a folder or a ``.csv`` file
    (the evaluation that reads it says what is wrong; a pipe is never opened)."""
    path = Path(location).expanduser()
    if location.strip() and Path.cwd().resolve().is_relative_to(path.resolve()):
        raise EvaluationSetError(f"{key} {location!r} is the project folder or holds it: its "
                                 "outputs are no data set; name the images' own folder")
    if not location.strip() or not (path.is_dir() or (path.suffix == ".csv" and path.is_file())):
        return {"found": False}
    return _set_identity(path, cache_dir)


def evaluation_sets_fingerprint(external: Iterable[str], dataset: str | None,
                                adapt: Mapping[str, str], cache_dir: Path) -> dict[str, Any]:
    """What identifies the content of every set an evaluation reads besides the pipeline's own
    split: ``evaluate.external``, ``evaluate.dataset`` and ``evaluate.adapt``'s folders, hashed
    as ``data.source`` is (see the module docstring)."""
    return {
        "external": {location: _evaluation_set_identity("evaluate.external", location, cache_dir)
                     for location in external},
        "dataset": (_evaluation_set_identity("evaluate.dataset", dataset, cache_dir)
                    if dataset else None),
        "adapt": {name: _evaluation_set_identity(f"evaluate.adapt.{name}", folder, cache_dir)
                  for name, folder in adapt.items()},
    }
