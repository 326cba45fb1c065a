r"""What differs between laboratories: cell scale, image size and stain, measured per data set.

```
python bench/transfer.py [--per-class 15] [--out bench/transfer.json] \
    [--figure figures/transfer.png]
```

For a sample of each set (default: ../shared/datasets pbc-1560, pbc-external, bccd-sample TRAIN
and TEST) it computes the pipeline's GrabCut mask (``pipeline.masks.compute_mask``, default
params) and prints the medians of: image size, the mask's status, the cell's diameter in pixels
and as a fraction of the image's short side, the black fill left by rotation, the background's
colour, the optical density and the haematoxylin/eosin densities inside the mask, the lamp
and optical density of the slide around the cell (the stain normalisation's input), the red
cells' diameter and the white cell's in red-cell diameters (the scale of ``red_cell_crop``),
and the 90th percentile of the cell's optical density once the slide is normalised (the input
of ``cell_stain_normalise``, whose reference is pbc-1560's). The figure
shows crops of each set as the model sees them with the default preprocessing, with
``train.transfer`` (scale and stain normalised), and with the red cells' scale and the white
cell's stain (``train.red_cell_crop``, ``train.cell_stain_normalise``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import Preprocess, prepare_image  # noqa: E402
from pipeline.io import decode_image  # noqa: E402
from pipeline.masks import MaskParams, compute_mask  # noqa: E402
from pipeline.transfer import (  # noqa: E402
    CELL_PERCENTILE,
    TRANSFER_SETTINGS,
    cell_diameter,
    lamp_density,
    normalise_stain,
    optical_density,
    red_cell_diameter,
    rgb_to_hed,
    slide_statistics,
)

DATASETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
SETS = {"pbc-1560": "pbc-1560", "pbc-external": "pbc-external",
        "bccd TRAIN": "bccd-sample/TRAIN", "bccd TEST": "bccd-sample/TEST"}


def sample(folder: Path, per_class: int, seed: int = 0) -> list[tuple[str, Path]]:
    """``per_class`` random images of each class folder, as (label, path)."""
    rng = np.random.default_rng(seed)
    picked = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(class_dir.iterdir())
        chosen = rng.choice(len(files), min(per_class, len(files)), replace=False)
        picked += [(class_dir.name.lower(), files[i]) for i in sorted(chosen)]
    return picked


def measure(path: Path) -> dict[str, float | str]:
    """Size, mask, scale and stain figures of one image."""
    rgb = decode_image(path)
    mask, info = compute_mask(rgb, MaskParams())
    inside = mask > 0
    black = rgb.max(axis=2) < 20
    background = ~inside & ~black
    density = optical_density(rgb)
    hed = rgb_to_hed(rgb)
    diameter = cell_diameter(mask)
    row: dict[str, float | str] = {
        "height": rgb.shape[0], "width": rgb.shape[1], "status": info.status,
        "diameter_px": diameter, "diameter_fraction": diameter / min(rgb.shape[:2]),
        "black_fill": float(black.mean()),
    }
    for i, channel in enumerate("RGB"):
        row[f"background_{channel}"] = float(rgb[..., i][background].mean())
        row[f"cell_od_{channel}"] = float(density[..., i][inside].mean()) if inside.any() else 0.0
    row["cell_H"] = float(hed[..., 0][inside].mean()) if inside.any() else 0.0
    row["cell_E"] = float(hed[..., 1][inside].mean()) if inside.any() else 0.0
    lamp, slide_density = slide_statistics(rgb, mask)
    row |= {f"lamp_{c}": float(v) for c, v in zip("RGB", lamp, strict=True)}
    row |= {f"slide_od_{c}": float(v) for c, v in zip("RGB", slide_density, strict=True)}
    red_cell = red_cell_diameter(rgb, mask)
    row["red_cell_px"] = red_cell if red_cell is not None else np.nan
    row["cell_in_red_cells"] = diameter / red_cell if red_cell else np.nan
    row |= {f"cell_od90_{c}": float(v) for c, v in zip("RGB", cell_density_90(rgb, mask),
                                                       strict=True)}
    return row


def cell_density_90(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """After the slide's stain is normalised: the 90th percentile of each channel's optical
    density (relative to the lamp) inside the mask, the input of ``normalise_cell_stain``."""
    if not mask.any():
        return np.full(3, np.nan)
    _, density = lamp_density(normalise_stain(rgb, mask), mask)
    return np.percentile(density[mask > 0], CELL_PERCENTILE, axis=0)


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Medians per set, and the share of each mask status."""
    numeric = table.select_dtypes("number").groupby(table["set"]).median()
    status = pd.crosstab(table["set"], table["status"], normalize="index").add_prefix("mask_")
    return numeric.join(status).loc[list(dict.fromkeys(table["set"]))]


def crops(paths: list[Path], prep: Preprocess) -> np.ndarray:
    """One row of the images as the model sees them (masks computed on the fly)."""
    tiles = []
    for path in paths:
        rgb = decode_image(path)
        tiles.append(prepare_image(rgb, compute_mask(rgb, MaskParams())[0], prep))
    return np.hstack(tiles)


def figure_settings() -> dict[str, Preprocess]:
    """The preprocessing of each figure row: the default, ``train.transfer``, and the transfer
    with the red cells' scale and the white cell's stain (augmentation off: as evaluated)."""
    base = {"image_size": 128, "mean": (0.5,) * 3, "std": (0.5,) * 3, "mask_mode": "crop",
            "mask_margin": 0.3}
    transfer = {k: v for k, v in TRANSFER_SETTINGS.items() if k not in ("stain_jitter",
                                                                        "blur_sigma")}
    red_cells = {k: v for k, v in transfer.items() if k != "cell_fraction"} | {
        "red_cell_crop": 3.5, "cell_stain_normalise": True}
    return {"default": Preprocess(**base), "transfer": Preprocess(**base, **transfer),
            "transfer, red cells 3.5, cell stain": Preprocess(**base, **red_cells)}


def draw_figure(samples: dict[str, list[tuple[str, Path]]], out_path: Path, per_row: int) -> None:
    """Rows: each set with each of ``figure_settings``."""
    rows = []
    for name, picked in samples.items():
        shared = [p for label, p in picked if label in ("eosinophil", "lymphocyte", "monocyte",
                                                        "neutrophil")]
        chosen = shared[:: max(1, len(shared) // per_row)][:per_row]
        for title, prep in figure_settings().items():
            row = crops(chosen, prep)
            label = np.full((20, row.shape[1], 3), 255, np.uint8)
            cv2.putText(label, f"{name}: {title}", (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                        (0, 0, 0), 1, cv2.LINE_AA)
            rows.append(np.vstack([label, row]))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_path), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=Path, default=DATASETS)
    parser.add_argument("--per-class", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("bench/transfer.json"))
    parser.add_argument("--figure", type=Path, default=Path("figures/transfer.png"))
    args = parser.parse_args()
    samples = {name: sample(args.datasets / folder, args.per_class)
               for name, folder in SETS.items()}
    rows = [{"set": name, "label": label, **measure(path)}
            for name, picked in samples.items() for label, path in picked]
    table = pd.DataFrame(rows)
    summary = summarise(table)
    with pd.option_context("display.width", 200, "display.max_columns", 40,
                           "display.float_format", "{:.3f}".format):
        print(summary.T)
    args.out.write_text(json.dumps(summary.T.to_dict(), indent=1) + "\n")
    draw_figure(samples, args.figure, per_row=8)
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
