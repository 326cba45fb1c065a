"""Seconds per training step of one attention model, on random inputs, in this process.

Usage::

    python -m bench.train_step [--backbone efficientnet_lite0] [--image-size 160]
                               [--batch-size 32] [--steps 12] [--warmup 3]
                               [--contiguous]

Prints one JSON line: the median, minimum and maximum seconds of a forward + backward + AdamW
step after ``--warmup`` uncounted steps, with the thread count and torch version. Run it in fresh
processes, alternating the variants you compare (for example two checkouts), and compare the
medians pair by pair: a shared machine drifts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from pipeline.models import AttentionClassifier, ModelConfig

NUM_CLASSES = 8


def step_seconds(backbone: str, image_size: int, batch_size: int, steps: int, warmup: int,
                 channels_last: bool = True) -> list[float]:
    """Wall seconds of each counted training step (fp32, AdamW; channels-last unless not
    ``channels_last``, as ``train.channels_last``)."""
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = AttentionClassifier(ModelConfig(backbone=backbone, image_size=image_size),
                                NUM_CLASSES).to(memory_format=layout).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, image_size, image_size).to(memory_format=layout)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,))
    criterion = nn.CrossEntropyLoss()
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        logits = model(images)
        logits = logits[0] if isinstance(logits, tuple) else logits
        criterion(logits, targets).backward()
        optimiser.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--contiguous", action="store_true",
                        help="NCHW tensors instead of channels-last (train.channels_last: false)")
    args = parser.parse_args()
    if min(args.image_size, args.batch_size, args.steps) < 1 or args.warmup < 0:
        parser.error("--image-size, --batch-size and --steps must be >= 1, --warmup >= 0")
    times = step_seconds(args.backbone, args.image_size, args.batch_size, args.steps,
                         args.warmup, channels_last=not args.contiguous)
    print(json.dumps({"backbone": args.backbone, "image_size": args.image_size,
                      "channels_last": not args.contiguous,
                      "batch_size": args.batch_size, "median_s": statistics.median(times),
                      "min_s": min(times), "max_s": max(times),
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
