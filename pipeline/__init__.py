"""White-blood-cell classification pipeline: the library behind the DVC stages and ``wbc``.

Importing it changes nothing outside the package: no environment variable, no library setting,
no matplotlib backend. Process-wide settings belong to the entry points (``stages``, ``wbc``).
"""

from typing import Any

__all__ = ["predict"]


def __getattr__(name: str) -> Any:
    """``pipeline.predict(...)`` without importing torch for every ``import pipeline.x``."""
    if name == "predict":
        from pipeline.predict import predict

        return predict
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
