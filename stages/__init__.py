"""The DVC stages: each parses ``params.yaml``, calls the library and writes the outputs.

``pipeline`` is imported first so that its CPU-kernel pin (``pipeline/cpu_kernels.py``) is in
place before pandas, NumPy, OpenCV or torch loads in a stage's process.
"""

import pipeline  # noqa: F401
