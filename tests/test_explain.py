"""Localisation scores, the crop-aligned mask, Grad-CAM per backbone and the explain figure."""

from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cli import main as wbc
from pipeline.data import Preprocess, prepare_image, prepare_mask
from pipeline.explain import (
    explain_png,
    gradcam_layer,
    gradcam_maps,
    localisation_scores,
    mass_in_mask,
    sample_for_figure,
)
from pipeline.masks import MaskParams
from pipeline.model_files import write_spec
from pipeline.models import ModelConfig, build_model
from pipeline.train import TrainConfig, train_model

PREP = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def centre_mask(size: int = 32, half: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[size // 2 - half: size // 2 + half, size // 2 - half: size // 2 + half] = True
    return mask


def test_scores_of_constructed_maps():
    mask = centre_mask()
    inside, outside = mask.astype(float), (~mask).astype(float)
    assert mass_in_mask(inside, mask) == pytest.approx(1.0)
    assert mass_in_mask(outside, mask) == pytest.approx(0.0)
    assert mass_in_mask(np.ones((32, 32)), mask) == pytest.approx(mask.mean())
    # A coarse token grid: each token counts by the share of its block inside the mask.
    assert mass_in_mask(np.ones((4, 4)), mask) == pytest.approx(mask.mean())
    corners = np.zeros((4, 4))
    corners[[0, 0, 3, 3], [0, 3, 0, 3]] = 1
    assert mass_in_mask(corners, mask) == pytest.approx(0.0)
    assert np.isnan(mass_in_mask(np.zeros((4, 4)), mask))
    with pytest.raises(ValueError, match="non-negative"):
        mass_in_mask(-inside, mask)


def test_localisation_scores_per_image():
    masks = np.stack([centre_mask(), centre_mask(half=4)])
    scores = localisation_scores(np.ones((2, 4, 4)), None, masks)
    assert np.allclose(scores["cell_area"], [0.25, 1 / 16])
    assert np.allclose(scores["attention_in_cell"], scores["cell_area"])
    assert np.isnan(scores["gradcam_in_cell"]).all()


def test_prepared_mask_follows_the_crop():
    """The mask is cropped, padded and resized exactly as the image is."""
    image = np.zeros((60, 90, 3), np.uint8)
    mask = np.zeros((60, 90), np.uint8)
    mask[20:40, 50:70] = 255
    image[mask > 0] = 200
    for mode in ("crop", "none", "suppress"):
        prep = Preprocess(32, PREP.mean, PREP.std, mask_mode=mode, mask_margin=0.25)
        on_input = prepare_mask(mask, prep)
        bright = prepare_image(image, mask, prep)[..., 0] > 100
        assert on_input.shape == (32, 32)
        assert (on_input == bright).mean() > 0.97, mode
    crop = Preprocess(32, PREP.mean, PREP.std, mask_mode="crop", mask_margin=0.25)
    assert prepare_mask(mask, crop).mean() == pytest.approx(1 / 1.5 ** 2, abs=0.05)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "mobilenetv2_100"])
def test_gradcam_for_timm_backbones(backbone):
    model, _ = build_model(ModelConfig(backbone, image_size=64, embed_dim=16, heads=2),
                           num_classes=3)
    assert gradcam_layer(model) is model.backbone.get_submodule(
        model.backbone.feature_info[-1]["module"])
    images = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8)
    maps = gradcam_maps(model, images, PREP, batch_size=2)
    assert maps.shape == (3, 64, 64)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    targeted = gradcam_maps(model, images, PREP, targets=np.array([0, 1, 2]))
    assert targeted.shape == (3, 64, 64)


def test_gradcam_leaves_no_model_behind():
    """Grad-CAM keeps its backward graph, whose hooks reach the model: the model must not hold
    that graph (through its attention maps), or every scored model stays in memory for good."""
    model, _ = build_model(ModelConfig("efficientnet_lite0", image_size=64, embed_dim=16,
                                       heads=2), 3)
    gradcam_maps(model, torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8), PREP)
    assert model.last_attention.grad_fn is None
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    trained = build_model(ModelConfig("efficientnet_lite0", image_size=64, embed_dim=16,
                                      heads=2), 3)[0].train()
    trained(torch.randn(2, 3, 64, 64))
    assert trained.last_attention.grad_fn is not None  # mask guidance trains through it


def test_gradcam_per_ensemble_member():
    """Each member of an ensemble (different backbones) gets its own map."""
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    members = [build_model(ModelConfig(b, image_size=64, embed_dim=16, heads=2), 3)[0]
               for b in ("mobilenetv2_100", "efficientnet_lite0")]
    maps = [gradcam_maps(member, images, PREP) for member in members]
    assert all(m.shape == (2, 64, 64) for m in maps)
    assert not np.allclose(maps[0], maps[1])


def test_sample_and_figure(tmp_path):
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 0, 1, 1, 0])
    picks = sample_for_figure(labels, predicted, ["a", "b", "c"], seed=1)
    assert len(picks) == 4  # a: right and wrong, b: right, c: wrong
    assert labels[picks[1]] != predicted[picks[1]] and labels[picks[0]] == predicted[picks[0]]
    assert picks == sample_for_figure(labels, predicted, ["a", "b", "c"], seed=1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (len(picks), 32, 32, 3), dtype=np.uint8)
    masks = np.stack([centre_mask()] * len(picks))
    path = tmp_path / "figures" / "explain.png"
    explain_png(images, masks, rng.random((len(picks), 4, 4)), rng.random((len(picks), 32, 32)),
                [f"true {labels[i]}" for i in picks], [labels[i] != predicted[i] for i in picks],
                "test", path)
    assert path.stat().st_size > 10_000


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("explain-model")
    train_model("tiny", ModelConfig("mobilenetv2_100", 48, embed_dim=16, heads=2),
                TrainConfig(epochs=1, batch_size=16, lr=1e-3, mask_mode="crop", patience=5,
                            ema_decay=0.0, backbone_lr_scale=0.1, mask_margin=0.25), MaskParams(),
                prepared / "split", prepared / "raw" / "images", prepared / "masks",
                out / "tiny", out / "tiny.json", out / "live")
    return out / "tiny" / "model.safetensors"


def test_wbc_explain_single_model_and_ensemble(checkpoint, synthetic_folder, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for label in ("lymphocyte", "neutrophil"):
        for source in sorted((synthetic_folder / label).iterdir())[:2]:
            shutil.copy(source, inputs / f"{label}-{source.name}")
    (inputs / "broken.jpg").write_bytes(b"not an image")
    assert wbc(["explain", str(checkpoint), str(inputs), "-o", str(tmp_path / "out")]) == 0
    assert "skipped" in capsys.readouterr().err
    table = pd.read_csv(tmp_path / "out" / "scores.csv", keep_default_na=False)
    assert len(table) == 5 and table["error"].astype(bool).sum() == 1
    good = table[~table["error"].astype(bool)]
    for score in ("attention_in_cell", "gradcam_in_cell", "cell_area"):
        assert good[score].astype(float).between(0, 1).all()
    assert (tmp_path / "out" / "explain.png").stat().st_size > 20_000
    spec = tmp_path / "ensemble.json"
    write_spec(spec, {"a": checkpoint, "b": checkpoint}, {"a": 0.5, "b": 0.5})
    assert wbc(["explain", str(spec), str(inputs), "-o", str(tmp_path / "ens")]) == 0
    assert len(pd.read_csv(tmp_path / "ens" / "scores.csv")) == 5  # one checkpoint, explained once
    assert (tmp_path / "ens" / "member1" / "explain.png").is_file()
    assert not (tmp_path / "ens" / "member2").exists()
    assert wbc(["explain", str(checkpoint), str(tmp_path / "nothing"), "-o",
                str(tmp_path / "x")]) == 1  # nothing readable


class ReadsOneLocation(torch.nn.Module):
    """A classifier whose scores read the feature map at its top-left location only, as an
    attention head that attends to one token does."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1),
                                            torch.nn.ReLU())
        self.backbone.feature_info = [{"module": "1"}]
        self.head = torch.nn.Linear(8, 3)
        with torch.no_grad():
            self.head.weight.abs_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images)[:, :, 0, 0])


def test_the_gradient_map_shows_only_what_the_score_reads():
    """Grad-CAM's averaged gradient spread such a model's map over the whole image (its mass in
    the read block was chance, 1/16); the map must sit on the one location the score reads."""
    torch.manual_seed(0)
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    maps = gradcam_maps(ReadsOneLocation(), images, PREP, targets=np.zeros(4, int))
    read = np.zeros((32, 32), bool)
    read[:8, :8] = True  # the read token's block (4 x 4 px), and the upsampling's reach
    assert all(mass_in_mask(heat, read) > 0.95 for heat in maps)
