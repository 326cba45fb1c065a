"""Data ingest: fetch or generate a data source and turn it into one manifest (``data/raw``).

The modules, in the order data flows through them:

- :mod:`~pipeline.sources.download`: HTTP download with resume, retries and a checksum.
- :mod:`~pipeline.sources.archive`: safe extraction of zip and tar archives.
- :mod:`~pipeline.sources.labels`: class names, their aliases and safe file names.
- :mod:`~pipeline.sources.layout`: finding the images and their labels in a folder.
- :mod:`~pipeline.sources.synthetic`: the synthetic stand-in data set.
- :mod:`~pipeline.sources.ingest`: a source (synthetic, PBC, BCCD, a folder or zip) to data/raw.

The names below are the public surface; they are imported on first use, so importing one module
(``pipeline.sources.labels`` for a class name) does not load the others.
"""

from __future__ import annotations

import importlib
from typing import Any

# submodule -> the names it exports through ``pipeline.sources`` (read statically by the
# dependency checker in tests/pipeline_checks.py: keep it a literal)
_EXPORTS: dict[str, tuple[str, ...]] = {
    "download": ("sha256_file",),
    "labels": ("PBC_CLASSES", "normalize_label"),
    "layout": ("collect_inputs", "is_image_file", "labelled_files", "scan_layout"),
    "synthetic": ("generate_dataset", "render_example"),
    "ingest": ("REMOTE_SOURCES", "DataConfig", "SourceError", "build_raw_dataset",
               "exclude_path", "local_source"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (PEP 562)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
