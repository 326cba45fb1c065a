"""Across laboratories: scale and stain normalisation, stain augmentation, and transfer between
two synthetic labs that differ in stain and magnification."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from small_cnn import fit, small_cnn

from pipeline.data import Preprocess, eval_transform, prepare_image, prepare_mask
from pipeline.sources.synthetic import Lab, render_example
from pipeline.train import TrainConfig
from pipeline.transfer import (
    CELL_PERCENTILE,
    CELL_STAIN_REFERENCE,
    STAIN_REFERENCE,
    TRANSFER_SETTINGS,
    WHITE_CELL_IN_RED_CELLS,
    HedJitter,
    cell_diameter,
    crop_to_cell_scale,
    crop_to_red_cell_scale,
    normalise_cell_stain,
    normalise_stain,
    optical_density,
    red_cell_diameter,
    slide_statistics,
)

ROOT = Path(__file__).resolve().parents[1]

CLASSES = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")  # the classes BCCD holds
HOME = Lab()
# Measured between pbc-1560 and bccd-sample (bench/transfer.py): a weaker stain, blue absorbed
# least, and cells spanning fewer pixels.
AWAY = Lab(magnification=0.6, tint=(1.3, 1.0, 0.65), stain_strength=0.6)
HOME_SIZE, AWAY_SIZE = (120, 120), (200, 200)  # the same cell spans as many pixels in both


def _disc_image(radius: int, centre: tuple[int, int], shape=(200, 300),
                background: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A purple disc (the white cell) and its mask, on grey or on ``background``."""
    image = np.full((*shape, 3), 230, np.uint8) if background is None else background
    mask = np.zeros(shape, np.uint8)
    cv2.circle(mask, centre, radius, 255, -1)
    image[mask > 0] = (90, 40, 140)
    return image, mask


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_a_cell_of_known_size_ends_at_the_target_fraction(fraction):
    image, mask = _disc_image(radius=30, centre=(210, 80))  # off centre, near an edge
    prep = Preprocess(96, (0.5,) * 3, (0.5,) * 3, mask_mode="crop", cell_fraction=fraction)
    out = prepare_image(image, mask, prep)
    cell = out[..., 1] < 100  # the disc's green is 40, the background's 230
    assert cell_diameter(cell) == pytest.approx(fraction * 96, rel=0.05)
    ys, xs = np.nonzero(cell)
    assert abs(ys.mean() - 47.5) < 2 and abs(xs.mean() - 47.5) < 2  # centred


def test_the_same_cell_at_two_magnifications_fills_the_same_fraction():
    prep = Preprocess(64, (0.5,) * 3, (0.5,) * 3, mask_mode="crop", cell_fraction=0.6)
    sizes = []
    for radius in (20, 60):
        image, mask = _disc_image(radius, (150, 100))
        sizes.append(cell_diameter(prepare_image(image, mask, prep)[..., 1] < 100))
    assert sizes[0] == pytest.approx(sizes[1], rel=0.05)


def test_an_empty_mask_leaves_the_image_whole():
    image, _ = _disc_image(20, (150, 100))
    assert crop_to_cell_scale(image, np.zeros(image.shape[:2], np.uint8), 0.5) is image


def _smear(red_radius: int, white_radius: int, white_centre: tuple[int, int],
           shape=(240, 320)) -> tuple[np.ndarray, np.ndarray]:
    """Plasma with a grid of red cells (pale centres) of ``red_radius`` and one white cell."""
    image = np.full((*shape, 3), (240, 225, 205), np.uint8)
    step = int(2.6 * red_radius)
    for y in range(red_radius, shape[0], step):
        for x in range(red_radius + (y // step % 2) * step // 2, shape[1], step):
            cv2.circle(image, (x, y), red_radius, (200, 140, 140), -1)
            cv2.circle(image, (x, y), red_radius // 2, (222, 180, 175), -1)
    return _disc_image(white_radius, white_centre, shape, background=image)


@pytest.mark.parametrize("red_radius", [10, 18, 30])
def test_the_red_cells_give_their_diameter(red_radius):
    image, mask = _smear(red_radius, 2 * red_radius, (160, 120), shape=(400, 480))
    assert red_cell_diameter(image, mask) == pytest.approx(2 * red_radius, rel=0.12)


@pytest.mark.parametrize("magnification", [1.0, 0.6])
def test_the_red_cells_of_the_synthetic_smears_scale_with_the_magnification(magnification):
    diameters = [red_cell_diameter(rgb, mask.astype(np.uint8) * 255)
                 for rgb, mask in (render_example(label, 0, seed=1, lab=Lab(magnification=m))
                                   for label in CLASSES for m in (1.0, magnification))]
    ratios = np.array(diameters[1::2]) / np.array(diameters[::2])
    assert np.median(ratios) == pytest.approx(magnification, rel=0.1)


def test_without_red_cells_the_white_cell_sets_the_scale():
    image, mask = _disc_image(radius=30, centre=(150, 100))  # plain background, no red cell
    assert red_cell_diameter(image, mask) is None
    out = crop_to_red_cell_scale(image, mask, red_cells=4.0)
    assert out.shape[0] == pytest.approx(4.0 * 60 / WHITE_CELL_IN_RED_CELLS, abs=2)


def test_the_red_cell_crop_keeps_the_white_cells_true_size():
    prep = Preprocess(96, (0.5,) * 3, (0.5,) * 3, mask_mode="crop", red_cell_crop=4.0)
    sizes = {}
    for red_radius, white_radius in ((12, 20), (12, 30), (24, 40)):  # (24, 40): (12, 20) x2
        image, mask = _smear(red_radius, white_radius, (180, 180), shape=(360, 360))
        cell = prepare_image(image, mask, prep)[..., 1] < 60  # the white cell's green is 40
        sizes[red_radius, white_radius] = cell_diameter(cell)
    # one magnification: a larger white cell stays larger (the mask's scale would equalise them)
    assert sizes[12, 30] / sizes[12, 20] == pytest.approx(1.5, rel=0.1)
    # twice the magnification: the same cell fills the same share of the crop
    assert sizes[24, 40] == pytest.approx(sizes[12, 20], rel=0.1)
    assert sizes[12, 20] == pytest.approx(96 * 40 / (4.0 * 24), rel=0.12)


def test_the_mask_is_cropped_where_its_image_is():
    image, mask = _smear(12, 20, (60, 200))
    prep = Preprocess(64, (0.5,) * 3, (0.5,) * 3, mask_mode="crop", red_cell_crop=5.0)
    cell = prepare_image(image, mask, prep)[..., 1] < 60
    assert (prepare_mask(mask, prep, image) == cell).mean() > 0.98
    with pytest.raises(ValueError, match="red_cell_crop measures the red cells"):
        prepare_mask(mask, prep)


def test_the_red_cell_crop_pads_with_the_slide_not_a_mirror_image():
    image, mask = _smear(12, 20, (22, 22))  # the white cell in a corner
    out = crop_to_red_cell_scale(image, mask, red_cells=6.0)
    assert np.count_nonzero(out[..., 1] < 60) == pytest.approx(np.count_nonzero(mask), rel=0.05)
    ys, xs = np.nonzero(out[..., 1] < 60)
    assert abs(ys.mean() - out.shape[0] / 2) < 2 and abs(xs.mean() - out.shape[1] / 2) < 2
    corner = out[:out.shape[0] // 4, :out.shape[1] // 4].reshape(-1, 3)
    assert np.isin(corner, np.median(image[mask == 0], axis=0)).all()  # the slide's median


def _cell_colour(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return rgb[mask > 0].astype(float).mean(0)


def test_two_stains_map_to_near_identical_colours():
    stained_away = Lab(tint=AWAY.tint, stain_strength=AWAY.stain_strength)
    before, after = [], []
    for label in CLASSES:
        home, home_mask = render_example(label, 0, seed=1, size=HOME_SIZE, lab=HOME)
        away, away_mask = render_example(label, 0, seed=1, size=HOME_SIZE, lab=stained_away)
        before.append(np.abs(_cell_colour(home, home_mask) - _cell_colour(away, away_mask)).max())
        home_n = normalise_stain(home, home_mask.astype(np.uint8))
        away_n = normalise_stain(away, away_mask.astype(np.uint8))
        after.append(np.abs(_cell_colour(home_n, home_mask)
                            - _cell_colour(away_n, away_mask)).max())
    assert np.mean(before) > 40  # 8-bit levels, the worst channel of the cell's mean colour
    assert np.mean(after) < min(12, np.mean(before) / 4)
    lamp, density = slide_statistics(away_n, away_mask.astype(np.uint8))
    assert lamp == pytest.approx(STAIN_REFERENCE[0], abs=3)
    assert density == pytest.approx(STAIN_REFERENCE[1], abs=0.01)


def test_a_pale_white_cell_takes_the_reference_stain_and_the_slide_stays():
    image, mask = _smear(12, 30, (100, 120))
    image[mask > 0] = (110, 60, 150)  # weaker than PBC's nuclei relative to the same slide
    out = normalise_cell_stain(image, mask)
    lamp = slide_statistics(out, mask)[0]
    cell = np.percentile(optical_density(out, lamp)[mask > 0], CELL_PERCENTILE, axis=0)
    assert cell == pytest.approx(CELL_STAIN_REFERENCE, rel=0.05)
    assert (out[:, 200:] == image[:, 200:]).all()  # red cells and plasma away from the cell
    assert normalise_cell_stain(image, np.zeros_like(mask)) is image


def test_black_fill_from_a_rotation_becomes_the_reference_plasma():
    image, mask = _disc_image(30, (150, 100))
    image[:40, :60] = 0
    out = normalise_stain(image, mask)
    assert np.abs(out[:40, :60].astype(int) - STAIN_REFERENCE[0]).max() <= 1


def test_hed_jitter_varies_the_stain_and_keeps_the_image():
    image = torch.from_numpy(render_example("eosinophil", 0, seed=2, size=(64, 64))[0]
                             ).permute(2, 0, 1).contiguous()
    torch.manual_seed(0)
    still = HedJitter(0.0)(image)
    assert (still.int() - image.int()).abs().max() <= 1
    jittered = HedJitter(0.3)(image)
    assert jittered.dtype == torch.uint8 and jittered.shape == image.shape
    assert (jittered.float() - image.float()).abs().mean() > 2


def test_the_transfer_settings_are_train_keys_used_as_written():
    """No switch rewrites the recipe (issue 42): the transfer settings are ``train`` keys that
    recipes/transfer.yaml sets, and each is used as written, ``stain_jitter: 0`` beside the
    others too."""
    recipe = yaml.safe_load((ROOT / "recipes" / "transfer.yaml").read_text())
    assert recipe["params"]["train"] == TRANSFER_SETTINGS
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-3, **TRANSFER_SETTINGS)
    assert config.preprocess_settings().items() >= TRANSFER_SETTINGS.items()
    without_jitter = replace(config, stain_jitter=0.0).preprocess_settings()
    assert without_jitter == config.preprocess_settings() | {"stain_jitter": 0.0}
    assert set(TrainConfig.__dataclass_fields__) >= set(TRANSFER_SETTINGS)
    Preprocess(64, (0.5,) * 3, (0.5,) * 3, **config.preprocess_settings())
    assert "transfer" not in TrainConfig.__dataclass_fields__


@pytest.mark.parametrize("settings", [{"cell_fraction": 0.0, "mask_mode": "crop"},
                                      {"cell_fraction": 1.5, "mask_mode": "crop"},
                                      {"red_cell_crop": 0.0}, {"red_cell_crop": float("nan")},
                                      {"cell_fraction": 0.6, "red_cell_crop": 3.0},
                                      {"stain_jitter": 1.0}])
def test_bad_transfer_settings_are_refused(settings):
    with pytest.raises(ValueError, match="cell_fraction|red_cell_crop|stain_jitter"):
        Preprocess(64, (0.5,) * 3, (0.5,) * 3, **settings)


def test_a_lab_with_lower_magnification_draws_smaller_cells():
    _, near = render_example("lymphocyte", 0, seed=0, size=HOME_SIZE)
    _, far = render_example("lymphocyte", 0, seed=0, size=HOME_SIZE, lab=Lab(magnification=0.5))
    assert far.sum() / near.sum() == pytest.approx(0.25, rel=0.2)


def _render(lab: Lab, size: tuple[int, int], first: int, count: int) -> list[tuple]:
    return [(*render_example(label, index, seed=7, size=size, lab=lab), target)
            for target, label in enumerate(CLASSES) for index in range(first, first + count)]


def _train_and_score(train, tests, settings) -> list[float]:
    """A small CNN trained on ``train`` through the pipeline's preprocessing and augmentation;
    its accuracy on each of ``tests``."""
    prep = Preprocess(32, (0.5,) * 3, (0.25,) * 3, mask_mode="crop", mask_margin=0.3, **settings)

    def tensors(items):
        images = [prepare_image(rgb, mask.astype(np.uint8) * 255, prep) for rgb, mask, _ in items]
        return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                torch.tensor([target for *_, target in items]))

    images, labels = tensors(train)
    torch.manual_seed(0)
    model = small_cnn(len(CLASSES))
    fit(model, images, labels, prep)
    normalise = eval_transform(prep)
    scores = []
    with torch.no_grad():
        for items in tests:
            test_images, test_labels = tensors(items)
            logits = model(torch.stack([normalise(image) for image in test_images]))
            scores.append(float((logits.argmax(1) == test_labels).float().mean()))
    return scores


def test_transfer_between_two_labs_fails_without_the_fix_and_works_with_it():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = _render(HOME, HOME_SIZE, 0, 20)
        tests = [_render(HOME, HOME_SIZE, 100, 15), _render(AWAY, AWAY_SIZE, 100, 15)]
        home_plain, away_plain = _train_and_score(train, tests, {})
        home_fixed, away_fixed = _train_and_score(train, tests, TRANSFER_SETTINGS)
    finally:
        torch.set_num_threads(threads)
    assert home_plain >= 0.8 and home_fixed >= 0.75  # both learn the home lab (60 images)
    assert away_plain <= 0.45  # chance is 0.25: the other lab's cells look like another class
    assert away_fixed >= 0.65 and away_fixed - away_plain >= 0.25
