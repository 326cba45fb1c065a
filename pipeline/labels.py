"""Canonical white-blood-cell class names and the aliases found in public datasets."""

from __future__ import annotations

import re

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


def normalize_label(name: str) -> str:
    """Map a folder name such as ``EOSINOPHIL`` or ``Immature Granulocytes`` to its canonical form.

    Unknown names are kept, lower-cased with separators unified, so new classes still work.
    """
    key = re.sub(r"[\s\-]+", "_", name.strip().lower())
    return _ALIASES.get(key, key)
