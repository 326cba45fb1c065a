"""A small CNN trained through the pipeline's augmentation: the stand-in model of the transfer
and adaptation tests (a real backbone would take minutes to show the same effects)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.data import Preprocess, train_transform


def small_cnn(classes: int, batch_norm: bool = False) -> nn.Sequential:
    """Three 3x3 convolutions (16, 32, 32 channels), optionally batch-normalised, then a
    linear classifier on the pooled features."""
    layers: list[nn.Module] = []
    for index, (inputs, outputs) in enumerate(((3, 16), (16, 32), (32, 32))):
        layers += [nn.Conv2d(inputs, outputs, 3, padding=1),
                   *([nn.BatchNorm2d(outputs)] if batch_norm else []), nn.ReLU()]
        layers.append(nn.MaxPool2d(2) if index < 2 else nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32, classes))


def fit(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, prep: Preprocess,
        epochs: int = 30) -> None:
    """Adam at 3e-3, batches of 16 of the uint8 ``images`` through ``train_transform(prep)``."""
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    augment = train_transform(prep)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(images)).split(16):
            inputs = torch.stack([augment(images[i]) for i in batch])
            loss = nn.functional.cross_entropy(model(inputs), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
