"""Fingerprints of the pipeline's arithmetic on this machine, to compare across machines.

```
python -m bench.kernels [--variants pinned,native,one-thread] [--out FILE.json]
```

Each variant runs in a fresh process, from an environment without the cap's variables (the cap
is set when ``pipeline`` is imported), and hashes three things the pipeline computes:

- ``images``: the JPEG bytes of 16 synthetic cells (``render_example``, two per class, seed 0):
  NumPy and OpenCV;
- ``masks``: the GrabCut masks of those images (``compute_mask``, default ``MaskParams``): OpenCV;
- ``weights``: the EfficientNet-Lite0 attention model (packaged ImageNet weights) after three
  AdamW steps on a seeded batch of 16 at 128 px, channels-last, as training runs: torch (ATen,
  oneDNN, MKL).

Two machines whose ``pinned`` rows agree compute these probes identically (necessary for the
pipeline to, not sufficient: one model, one shape, no augmentation); a row that differs says
where they part. Variants: ``pinned`` (the default), ``native`` (``WBC_NATIVE_CPU_KERNELS=1``:
each library's widest kernels), ``one-thread`` (pinned, ``torch.set_num_threads(1)``). The
table is printed; ``--out`` also writes it as JSON, only when every variant ran.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pipeline  # noqa: F401  (caps the CPU kernels before NumPy, OpenCV and torch load)
from pipeline.cpu_kernels import MARKER, OPT_OUT, cpu_flags, cpu_kernel_pins, cpu_model

THREADS = "BENCH_KERNELS_THREADS"
VARIANTS = {"pinned": {}, "native": {OPT_OUT: "1"}, "one-thread": {THREADS: "1"}}
# what a variant's process must not inherit: every variable the cap may set, and the knobs
CLEARED = {*cpu_kernel_pins({"avx512f", "avx512cd"}), MARKER, OPT_OUT, THREADS}


def _digest(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:16]


def fingerprint() -> dict[str, object]:
    """Run in the variant's process: the three hashes and what decided them."""
    import cv2
    import numpy as np
    import torch

    from pipeline.device import kernels
    from pipeline.masks import MaskParams, compute_mask
    from pipeline.models import ModelConfig, build_model
    from pipeline.sources.labels import PBC_CLASSES
    from pipeline.sources.synthetic import _encode_jpeg, render_example

    torch.set_num_threads(int(os.environ.get(THREADS, os.cpu_count() or 1)))
    images = [render_example(label, index, seed=0)[0] for label in PBC_CLASSES for index in (0, 1)]
    masks = [compute_mask(image, MaskParams())[0] for image in images]
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig("efficientnet_lite0", 128, pretrained=True), 8)
    model = model.to(memory_format=torch.channels_last).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    batch = torch.rand(16, 3, 128, 128, generator=generator)
    labels = torch.randint(0, 8, (16,), generator=generator)
    started = time.perf_counter()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(
            model(batch.contiguous(memory_format=torch.channels_last)), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return {
        "images": _digest(_encode_jpeg(image) for image in images),
        "masks": _digest(np.ascontiguousarray(mask).tobytes() for mask in masks),
        "weights": _digest(tensor.detach().contiguous().numpy().tobytes()
                           for tensor in model.state_dict().values()),
        "last_loss": loss.item(),
        "train_seconds": round(time.perf_counter() - started, 2),
        "kernels": kernels(torch.device("cpu")),
        "opencv_ipp": cv2.ipp.getIppVersion(),
        "versions": {"numpy": np.__version__, "opencv": cv2.__version__,
                     "torch": torch.__version__},
    }


def run_variant(name: str) -> dict[str, object]:
    """One variant in a fresh process (the cap acts at import)."""
    env = {key: value for key, value in os.environ.items() if key not in CLEARED}
    done = subprocess.run([sys.executable, "-m", "bench.kernels", "--child"],
                          env={**env, **VARIANTS[name]}, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, help="also write the table here as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(fingerprint()))
        return
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if not names or unknown:
        sys.exit(f"bench.kernels: unknown or no variant ({', '.join(unknown)}); "
                 f"choose from {', '.join(VARIANTS)}")
    flags = cpu_flags()
    result = {"cpu": cpu_model(),
              "cores": os.cpu_count(),
              "vector_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
              "variants": {}}
    print(f"{result['cpu']}, {result['cores']} cores: {' '.join(result['vector_flags'])}")
    for name in names:
        row = result["variants"][name] = run_variant(name)
        print(f"{name:11s} " + "  ".join(f"{key}={row[key]}" for key in
                                          ("images", "masks", "weights", "train_seconds",
                                           "kernels", "error") if key in row))
    if any("error" in row for row in result["variants"].values()):
        sys.exit("bench.kernels: a variant failed (its error is above); nothing written")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
