"""Adapting a model to another laboratory without labels: batch-norm statistics re-estimated
on its images (pipeline.models.reestimate_batchnorm, pipeline.adapt)."""

from __future__ import annotations

import numpy as np
import torch
from small_cnn import fit, small_cnn
from torch import nn

from pipeline.data import Preprocess, eval_transform, prepare_image
from pipeline.models import reestimate_batchnorm
from pipeline.sources.synthetic import Lab, render_example

CLASSES = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
# BCCD's stain as measured against pbc-1560 (tests/test_transfer.py), at the same magnification
STAINED = Lab(tint=(1.3, 1.0, 0.65), stain_strength=0.6)


def test_reestimated_batchnorm_statistics_match_the_data():
    """Stale running statistics are replaced by the data's own: eval-mode outputs are
    normalised again, the momentum is kept and the model is left in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    batches = [torch.randn(8, 3, 12, 12) * 3 + 5 for _ in range(4)]
    model.eval()
    assert model(batches[0]).std() > 1.5  # stale statistics (initial mean 0, variance 1)
    weights = model[0].weight.detach().clone()
    reestimate_batchnorm(model, batches, torch.device("cpu"), channels_last=False)
    assert not model.training and not model[1].training
    with torch.no_grad():
        out = torch.cat([model(images) for images in batches])
    assert out.mean().abs() < 0.05 and (out.std() - 1).abs() < 0.05
    assert model[1].momentum == 0.1 and torch.equal(model[0].weight, weights)


def _tensors(lab: Lab, first: int, count: int, prep: Preprocess):
    items = [(render_example(label, index, seed=7, size=(120, 120), lab=lab), target)
             for target, label in enumerate(CLASSES) for index in range(first, first + count)]
    images = [prepare_image(rgb, mask.astype(np.uint8) * 255, prep) for (rgb, mask), _ in items]
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
            torch.tensor([target for _, target in items]))


def test_adapting_to_a_stained_lab_recovers_its_accuracy():
    """A small CNN with batch norm learns the home lab; a lab with BCCD's weaker, bluer-less
    stain defeats it; re-estimating its statistics on 40 unlabelled images of that lab (not the
    ones scored) brings it back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prep = Preprocess(32, (0.5,) * 3, (0.25,) * 3, mask_mode="crop", mask_margin=0.3)
        images, labels = _tensors(Lab(), 0, 20, prep)
        away, away_labels = _tensors(STAINED, 100, 15, prep)
        unlabelled, _ = _tensors(STAINED, 200, 10, prep)
        torch.manual_seed(0)
        model = small_cnn(len(CLASSES), batch_norm=True)
        fit(model, images, labels, prep)
        normalise = eval_transform(prep)

        def accuracy() -> float:
            model.eval()
            with torch.no_grad():
                return float((model(normalise(away)).argmax(1) == away_labels).float().mean())

        before = accuracy()
        reestimate_batchnorm(model, [normalise(unlabelled)], torch.device("cpu"),
                             channels_last=False)
        after = accuracy()
    finally:
        torch.set_num_threads(threads)
    assert before <= 0.7  # chance is 0.25
    assert after >= 0.85 and after - before >= 0.25
