"""White-blood-cell classification pipeline: the library behind the DVC stages and ``wbc``."""

from typing import Any

from pipeline.cpu_kernels import pin_cpu_kernels

# Before NumPy, OpenCV or torch loads: the same kernels on every x86-64 CPU (cpu_kernels.py).
pin_cpu_kernels()

__all__ = ["predict"]


def __getattr__(name: str) -> Any:
    """``pipeline.predict(...)`` without importing torch for every ``import pipeline.x``."""
    if name == "predict":
        from pipeline.predict import predict

        return predict
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
