"""Canonical white-blood-cell class names and the aliases found in public datasets."""

from __future__ import annotations

import difflib
import re
import unicodedata

from pipeline.errors import PipelineError

PBC_CLASSES: tuple[str, ...] = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)
BCCD_CLASSES: tuple[str, ...] = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")

_ALIASES: dict[str, str] = {
    "basophils": "basophil",
    "eosinophils": "eosinophil",
    "erythroblasts": "erythroblast",
    "nrbc": "erythroblast",
    "immature_granulocyte": "ig",
    "immature_granulocytes": "ig",
    "immaturegranulocytes": "ig",
    "lymphocytes": "lymphocyte",
    "monocytes": "monocyte",
    "neutrophils": "neutrophil",
    "platelets": "platelet",
    "thrombocyte": "platelet",
    "thrombocytes": "platelet",
}


_UNSAFE_CHARACTERS = re.compile(r"[/\\\x00-\x1f\x7f:]")


class UnsafeNameError(PipelineError, ValueError):
    """A file or folder name cannot be made into a safe path component."""


def safe_name(name: str) -> str:
    """``name`` as one safe path component, or UnsafeNameError saying why it cannot be one.

    The one place where names from data sets and archives are cleaned: Unicode NFKC (so a
    full-width solidus becomes ``/``), surrounding whitespace stripped; what is then empty,
    ``.``, ``..``, or holds a separator, a drive colon or a control character is refused.
    """
    clean = unicodedata.normalize("NFKC", name).strip()
    if not clean.isascii() and not _is_text(clean):
        raise UnsafeNameError(f"unsafe name {name!r}: its bytes are not UTF-8 text")
    if clean in ("", ".", ".."):
        raise UnsafeNameError(f"unsafe name {name!r}: it is {clean!r} once normalised")
    if _UNSAFE_CHARACTERS.search(clean):
        raise UnsafeNameError(f"unsafe name {name!r}: it holds a path separator, colon or "
                              "control character once normalised")
    return clean


def _is_text(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a file name (surrogate escapes)
        return False
    return True


def normalize_label(name: str) -> str:
    """Map a folder name such as ``EOSINOPHIL`` or ``Immature Granulocytes`` to its canonical form.

    Unknown names are kept, lower-cased with separators unified, so new classes still work;
    names that cannot be a safe folder name raise UnsafeNameError.
    """
    key = re.sub(r"[\s\-]+", "_", safe_name(name).lower())
    return _ALIASES.get(key, key)


def closest_known_class(label: str, known: tuple[str, ...] = PBC_CLASSES) -> str | None:
    """The known class ``label`` is probably a typo of (``neutrophills``), else None."""
    if label in known:
        return None
    matches = difflib.get_close_matches(label, known, n=1, cutoff=0.8)
    return matches[0] if matches else None
