"""Importing the library changes nothing outside it (issue: a library that behaves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Imports every module of the package and the stages, then reports what process-wide state
# looks like; the same snapshot is taken before, after importing only the third-party libraries.
SNAPSHOT = """
import importlib, json, os, pkgutil, sys
import cv2, matplotlib, numpy, PIL.Image, torch
# third-party libraries the pipeline uses, imported first: what they set is theirs, not ours
import imagehash, onnx, onnxruntime, pandas, pytorch_grad_cam, safetensors, scipy, sklearn
import timm, torch._inductor.config, yaml
def snapshot():
    return {"environ": dict(os.environ), "backend": matplotlib.rcParams["backend"],
            "rc": {k: str(v) for k, v in matplotlib.rcParams.items()},
            "torch_threads": torch.get_num_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "cv2_threads": cv2.getNumThreads(), "pil_max_pixels": PIL.Image.MAX_IMAGE_PIXELS,
            "numpy_err": numpy.geterr()}
before = snapshot()
import pipeline, stages
names = [m.name for m in pkgutil.walk_packages(pipeline.__path__, "pipeline.")]
names += [m.name for m in pkgutil.iter_modules(stages.__path__, "stages.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"before": before, "after": snapshot(), "modules": len(names)}))
"""


def test_importing_every_module_changes_no_process_wide_state():
    environ = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    done = subprocess.run([sys.executable, "-c", SNAPSHOT], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["modules"] > 30
    before, after = report["before"], report["after"]
    changed = {key for key in before if before[key] != after[key]}
    assert not changed, {key: (before[key], after[key]) for key in changed if key != "environ"} \
        or sorted(set(after["environ"].items()) ^ set(before["environ"].items()))
