"""Ablation of the attention head's design: does the class token look at the cell?

Cheap by design (a shared 2-core CPU): the ImageNet EfficientNet-Lite0 backbone is frozen, its
feature maps of the pipeline's prepared crops are computed once per output stride, and only the
attention head is trained on them (no augmentation; best epoch on validation macro-F1). Scored on
the split's test part: accuracy, attention_in_cell, gradcam_in_cell (full model), cell_area.

Run from the repository root after the download, masks and split stages:
    python -m bench.attention_ablation [--epochs 30] [--image-size 128]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from sklearn.metrics import f1_score
from torch import nn
from tqdm import tqdm

from pipeline.data import Preprocess, eval_transform, load_masks, load_prepared
from pipeline.evaluate import held_out_set
from pipeline.explain import (
    figure_for,
    gradcam_maps,
    localisation_scores,
    mean_scores,
    sample_for_figure,
)
from pipeline.io import read_split
from pipeline.masks import MaskParams
from pipeline.models import (
    ModelConfig,
    attention_outside_cell_loss,
    build_model,
    data_config,
    token_cover,
)

VARIANTS = {
    "baseline (stride 32)": {},
    "stride 16": {"output_stride": 16},
    "stride 16 + 4 registers": {"output_stride": 16, "registers": 4},
    "stride 16 + mask guidance": {"output_stride": 16, "guidance": 1.0},
}


def load_part(part: str, prep: Preprocess
              ) -> tuple[torch.Tensor, list[str], list[Path], list[Path]]:
    data = held_out_set(Path("data/split"), Path("data/raw/images"), Path("data/masks"), part)
    images = load_prepared(data.paths, prep, data.mask_files, desc=part)
    return images, data.labels, data.paths, data.mask_files


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    normalise = eval_transform(prep)
    return torch.cat([model.backbone.forward_features(normalise(images[i:i + 64]))
                      for i in tqdm(range(0, len(images), 64), desc="features", unit="batch")])


def train_head(model: nn.Module, train: tuple, val: tuple, epochs: int,
               guidance: float = 0.0) -> float:
    """Train everything but the backbone on cached features; keep the best validation epoch.

    With ``guidance``, ``train[2]`` holds each token's cell cover and the loss adds
    ``guidance * attention_outside_cell_loss``.
    """
    _, head_params = model.parameter_groups()
    optimiser = torch.optim.AdamW(head_params, lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    generator = torch.Generator().manual_seed(0)
    best, best_state, started = -1.0, None, time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(train[0]), generator=generator).split(32):
            loss = loss_fn(model.classify(train[0][batch]), train[1][batch])
            if guidance:
                loss = loss + guidance * attention_outside_cell_loss(model.last_attention,
                                                                     train[2][batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()
        model.eval()
        with torch.no_grad():
            score = f1_score(val[1], model.classify(val[0]).argmax(1), average="macro")
        if score > best:
            best, best_state = score, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--only", default="", help="comma-separated variant names to run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--figures", type=Path, help="write an explain.png per variant here")
    parser.add_argument("--out", type=Path, default=Path("/tmp/attention_ablation.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # on a shared CPU, spinning OpenMP threads stall
    classes = sorted(read_split(Path("data/split"), "train")["label"].unique())
    probe, _ = build_model(ModelConfig("efficientnet_lite0", args.image_size), len(classes), False)
    prep = Preprocess(args.image_size, **data_config(probe), mask_mode="crop", mask_margin=0.3)
    parts = {part: load_part(part, prep) for part in ("train", "val", "test")}
    labels = {p: torch.tensor([classes.index(x) for x in v[1]]) for p, v in parts.items()}
    test_masks = load_masks(parts["test"][2], parts["test"][3], prep, MaskParams())
    train_masks = load_masks(parts["train"][2], parts["train"][3], prep, MaskParams())
    results, cache = {}, {}
    for name, options in VARIANTS.items():
        if args.only and name not in args.only.split(","):
            continue
        print(f"{name}: features, training", flush=True)
        torch.manual_seed(0)
        options = dict(options)
        guidance = options.pop("guidance", 0.0)
        config = ModelConfig("efficientnet_lite0", args.image_size, pretrained=True, **options)
        model, _ = build_model(config, len(classes))
        model.backbone.eval().requires_grad_(False)
        stride = options.get("output_stride", 32)
        if stride not in cache:
            cache[stride] = {p: features(model, v[0], prep) for p, v in parts.items()}
        cached = cache[stride]
        train_cover = torch.from_numpy(train_masks)[:, None]
        cover = token_cover(train_cover, model.grid) if guidance else None
        seconds = train_head(model, (cached["train"], labels["train"], cover),
                             (cached["val"], labels["val"]), args.epochs, guidance)
        print(f"{name}: head trained in {seconds:.0f} s; scoring", flush=True)
        model.eval()
        with torch.no_grad():
            logits = model.classify(cached["test"])
            predicted = logits.argmax(1)
        attention = model.last_attention.numpy()
        model.backbone.requires_grad_(True)
        gradcam = gradcam_maps(model, parts["test"][0], prep, targets=predicted.numpy())
        scores = mean_scores(localisation_scores(attention, gradcam, test_masks))
        if args.figures:
            true = labels["test"].numpy()
            figure_for(parts["test"][0], {"masks": test_masks, "gradcam": gradcam},
                       torch.from_numpy(attention), sample_for_figure(true, predicted.numpy(),
                                                                      classes),
                       [classes[i] for i in predicted], torch.softmax(logits, 1).amax(1).numpy(),
                       parts["test"][1], f"efficientnet_lite0, {name} (frozen backbone)",
                       args.figures / f"explain-{name.replace(' ', '_')}.png")
        results[name] = {"accuracy": float((predicted == labels["test"]).float().mean()),
                         **scores, "head_train_seconds": seconds, "grid": list(model.grid)}
        print(name, json.dumps(results[name]), flush=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
