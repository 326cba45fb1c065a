"""Figures a person would rather look at than read: matplotlib (object-oriented, no pyplot),
saved as PNG; names from the data are drawn as plain text (:mod:`pipeline.figures`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import auc, confusion_matrix

from pipeline.figures import new_figure, plain_text, save_figure


def _save(fig: Figure, path: Path) -> None:
    save_figure(fig, path)


def confusion_matrix_png(labels: np.ndarray, predicted: np.ndarray, classes: list[str],
                         title: str, path: Path) -> None:
    """Confusion matrix with class names: each cell holds its count of images and its share of
    the row (the true class), shaded by that share."""
    counts = confusion_matrix(labels, predicted, labels=np.arange(len(classes)))
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig = new_figure((1.0 * len(classes) + 3, 1.0 * len(classes) + 2.5))
    ax = fig.subplots()
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(counts):
        ax.text(column, row, f"{count}\n{shares[row, column]:.0%}", ha="center", va="center",
                fontsize=8, color="white" if shares[row, column] > 0.5 else "black")
    names = [plain_text(name) for name in classes]
    ax.set_xticks(np.arange(len(classes)), names, rotation=45, ha="right")
    ax.set_yticks(np.arange(len(classes)), names)
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(plain_text(f"{title}\nconfusion matrix: images and share of the true class"))
    _save(fig, path)


def curves_png(roc: pd.DataFrame, pr: pd.DataFrame, classes: list[str], title: str,
               path: Path) -> None:
    """One-vs-rest ROC and precision-recall curves per class, side by side, from the points
    ``evaluate`` writes (``class``, ``fpr``, ``tpr``; ``class``, ``recall``, ``precision``)."""
    fig = new_figure((13, 5.5))
    roc_ax, pr_ax = fig.subplots(1, 2)
    colours = matplotlib.colormaps["tab10"]
    for index, name in enumerate(classes):
        roc_points, pr_points = roc[roc["class"] == name], pr[pr["class"] == name]
        if roc_points.empty:
            continue
        colour = colours(index % 10)
        fpr, tpr = roc_points["fpr"].to_numpy(), roc_points["tpr"].to_numpy()
        roc_ax.plot(fpr, tpr, color=colour,
                    label=plain_text(f"{name} (AUC {auc(fpr, tpr):.3f})"))
        recall, precision = pr_points["recall"].to_numpy(), pr_points["precision"].to_numpy()
        average_precision = max(0.0, -np.sum(np.diff(recall) * precision[:-1]))  # as sklearn's
        pr_ax.plot(recall, precision, color=colour,
                   label=plain_text(f"{name} (AP {average_precision:.3f})"))
    roc_ax.plot([0, 1], [0, 1], ls=":", color="grey")
    roc_ax.set(title="ROC, one vs rest", xlabel="false positive rate", ylabel="true positive rate")
    pr_ax.set(title="Precision-recall, one vs rest", xlabel="recall", ylabel="precision")
    for ax in (roc_ax, pr_ax):
        ax.legend(fontsize=8, loc="lower right" if ax is roc_ax else "lower left")
    fig.suptitle(plain_text(title))
    _save(fig, path)


def reliability_png(bins: pd.DataFrame, bin_count: int, ece: float, title: str, path: Path
                    ) -> None:
    """Reliability diagram from ``metrics.calibration_bins`` (the ``bin_count`` bins the ECE is
    computed over), with the number of images in each bin below."""
    fig = new_figure((5.5, 6.5))
    ax, hist = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
    ax.plot(bins["confidence"], bins["accuracy"], marker="o",
            label=f"model (ECE {ece:.3f}, {bin_count} bins)")
    ax.set_ylabel("accuracy")
    ax.set_title(plain_text(f"{title}\nreliability diagram"))
    ax.legend(loc="upper left")
    hist.bar(bins["bin"] / bin_count, bins["images"], width=1 / bin_count, align="edge",
             color="tab:blue", alpha=0.7)
    hist.set_xlim(0, 1)
    hist.set_xlabel("confidence of the predicted class")
    hist.set_ylabel("images")
    _save(fig, path)


def image_grid_png(images: list[np.ndarray], captions: list[str], title: str, path: Path,
                   columns: int = 6, caption_colours: list[str] | None = None) -> None:
    """A grid of RGB images with a caption under each."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig = new_figure((2.3 * columns, 2.6 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    colours = caption_colours or ["black"] * len(images)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption, colour in zip(axes.flat, images, captions, colours, strict=False):
        ax.imshow(image)
        ax.set_title(plain_text(caption), fontsize=8, color=colour)
    if not images:
        axes.flat[0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    fig.suptitle(plain_text(title))
    _save(fig, path)


Interval = tuple[float, float] | None  # a 95% interval (low, high); None: not computed


def _interval_whiskers(ax: Axes, positions: np.ndarray, intervals: list[Interval] | None
                       ) -> None:
    """Black whiskers spanning each bar's interval (as computed, whether or not it holds the
    bar's value: a percentile bootstrap interval of macro-F1 need not)."""
    known = [(x, *interval) for x, interval in
             zip(positions, intervals or [None] * len(positions), strict=True)
             if interval is not None]
    if known:
        x, low, high = map(np.array, zip(*known, strict=True))
        ax.errorbar(x, (low + high) / 2, yerr=(high - low) / 2, fmt="none", ecolor="black",
                    elinewidth=1, capsize=3)


def bar_chart_png(names: list[str], series: dict[str, list[float]], title: str, path: Path,
                  references: dict[str, float] | None = None,
                  intervals: dict[str, list[Interval]] | None = None) -> None:
    """Grouped bars (one group per model), each with its 95% interval where ``intervals`` has
    one for it (same keys and order as ``series``), reference accuracies as dashed lines."""
    fig = new_figure((max(7, 1.6 * len(names) + 3), 5))
    ax = fig.subplots()
    width = 0.8 / max(len(series), 1)
    positions = np.arange(len(names))
    for offset, (metric, values) in enumerate(series.items()):
        bars = ax.bar(positions + offset * width, values, width, label=plain_text(metric))
        ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, label_type="center",
                     color="white")
        _interval_whiskers(ax, positions + offset * width, (intervals or {}).get(metric))
    for (label, value), style in zip((references or {}).items(), ("--", ":", "-."),
                                     strict=False):
        ax.axhline(value, ls=style, color="grey", lw=1, label=plain_text(f"{label}: {value:g}"))
    ax.set_xticks(positions + width * (len(series) - 1) / 2,
                  [plain_text(name) for name in names], rotation=20, ha="right")
    ax.set_ylim(0, 1.12)
    ax.set_title(plain_text(title))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    _save(fig, path)
