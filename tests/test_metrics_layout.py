"""What a DVC user reads: metrics files hold a screen of quality figures per model and per
external set; records (intervals, counts, settings, resources) go to a plain file; every figure
of a model trained from random weights says so, with counts and shares in its confusion matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.figure import Figure

from pipeline.evaluate import EvalSet, EvaluateConfig, Scored, ScoredValidation, write_evaluation
from pipeline.io import read_json
from pipeline.metrics import QUALITY_KEYS

CLASSES = ["lymphocyte", "monocyte", "neutrophil"]
SETTINGS = EvaluateConfig(tta=False, mistakes=2, abstain_target_accuracy=0.8)
RECORD_WORDS = ("ci95", "images", "temperature", "tta", "device", "per_second", "skipped",
                "classes", "threshold", "near_duplicates", "cell_area")


def _scored(paths: list[Path], present: int, weight_source: str, seed: int = 0) -> Scored:
    """A scored set over ``paths`` whose labels use only the first ``present`` classes (fewer
    than the model's: restricted scores appear too), with validation for the abstention."""
    rng = np.random.default_rng(seed)
    labels, val_labels = rng.integers(0, present, len(paths)), rng.integers(0, 3, 200)

    def probabilities(truth: np.ndarray) -> np.ndarray:
        guessed = np.where(rng.random(len(truth)) < 0.2, (truth + 1) % 3, truth)
        noise = rng.dirichlet([1, 1, 1], len(truth)) * 0.3
        noise[np.arange(len(truth)), guessed] += 0.7
        return noise

    return Scored(
        name="demo", classes=CLASSES,
        data=EvalSet(paths, [CLASSES[i] for i in labels], [p.name for p in paths]),
        probabilities=probabilities(labels), uncalibrated=probabilities(labels),
        temperature=1.37, images_per_second=50.0, device="cpu",
        training={"backbone": "mobilenetv2_100", "weight_source": weight_source},
        validation=ScoredValidation([], [CLASSES[i] for i in val_labels],
                                    probabilities(val_labels)))


@pytest.fixture()
def images(synthetic_folder) -> list[Path]:
    return sorted((synthetic_folder / "lymphocyte").iterdir())[:12]


@pytest.mark.parametrize("present", [3, 2])
def test_metrics_file_holds_at_most_15_quality_keys_per_set(images, tmp_path, present):
    external_dir = tmp_path / "lab-b"
    external_headline = write_evaluation(_scored(images, 2, "imagenet", seed=1), external_dir,
                                         external_dir / "eval.json", SETTINGS)
    external = {"lab-b": read_json(external_dir / "summary.json")}
    headline = write_evaluation(_scored(images, present, "imagenet"), tmp_path / "eval",
                                tmp_path / "eval.json", SETTINGS, external=external)
    metrics, record = read_json(tmp_path / "eval.json"), read_json(tmp_path / "eval_record.json")
    sets = {"test": {k: v for k, v in metrics.items() if k != "external"},
            **metrics["external"]}
    assert set(sets) == {"test", "lab-b"}
    for name, keys in sets.items():
        assert 0 < len(keys) <= 15, name
        assert set(keys) <= set(QUALITY_KEYS), name
        assert not [k for k in keys if any(word in k for word in RECORD_WORDS)], name
        assert all(isinstance(v, float) for v in keys.values()), name
    assert ("restricted_accuracy" in sets["test"]) == (present == 2)
    assert "restricted_accuracy" in sets["lab-b"]
    assert sets["lab-b"]["accuracy"] == external_headline["accuracy"]
    # nothing is lost: every headline figure is in exactly one of the two files
    assert set(sets["test"]) | set(record) == set(headline)
    assert not set(sets["test"]) & set(record)
    assert record["temperature"] == 1.37 and record["images"] == len(images)
    assert record["accuracy_ci95_low"] <= metrics["accuracy"] <= record["accuracy_ci95_high"]
    assert not (tmp_path / "external.json").exists()  # one metrics file per model


def _figure_texts(monkeypatch) -> dict[str, list[str]]:
    """Every title (and cell text) of each figure saved from now on, by file name."""
    texts: dict[str, list[str]] = {}
    original = Figure.savefig

    def recording(figure: Figure, path, *args, **kwargs):
        titles = [figure._suptitle.get_text()] if figure._suptitle is not None else []
        for ax in figure.axes:
            titles += [ax.get_title(), *(text.get_text() for text in ax.texts)]
        texts[Path(path).name] = titles
        return original(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return texts


@pytest.mark.parametrize(("weight_source", "marked"),
                         [("random-init (pretrained weights unavailable)", True),
                          ("imagenet (timm)", False)])
def test_every_figure_title_names_a_random_init_model(images, tmp_path, monkeypatch,
                                                      weight_source, marked):
    texts = _figure_texts(monkeypatch)
    write_evaluation(_scored(images, 2, weight_source), tmp_path / "eval",
                     tmp_path / "eval.json", SETTINGS)
    figures = {"confusion.png", "confusion_restricted.png", "roc_pr.png", "reliability.png",
               "mistakes.png", "risk_coverage.png"}
    assert figures <= set(texts)
    for name in figures:
        title = " ".join(texts[name])
        assert ("demo (random init)" in title) == marked, (name, title)
    assert "temperature 1.37" in " ".join(texts["reliability.png"])
    assert "accuracy vs share classified automatically" in " ".join(texts["risk_coverage.png"])


def test_confusion_matrix_cells_show_counts_and_row_shares(tmp_path, monkeypatch):
    from pipeline.plots import confusion_matrix_png

    texts = _figure_texts(monkeypatch)
    labels, predicted = np.array([0, 0, 0, 1, 2, 2]), np.array([0, 0, 1, 1, 2, 0])
    confusion_matrix_png(labels, predicted, ["a", "b$", "c"], "m", tmp_path / "c.png")
    cells = [t for t in texts["c.png"] if "\n" in t and "%" in t]
    assert len(cells) == 9
    assert "2\n67%" in cells and "1\n33%" in cells and "1\n100%" in cells and "0\n0%" in cells
    assert "1\n50%" in cells
    assert (tmp_path / "c.png").stat().st_size > 5_000


def test_model_title_marks_random_init_only():
    from pipeline.figures import model_title

    assert model_title("m", {"weight_source": "random-init (pretrained weights unavailable)"}
                       ) == "m (random init)"
    assert model_title("m", {"weight_source": "imagenet (timm)"}) == "m"
    assert model_title("m", {"members": {"a": 0.5}}) == "m"  # an ensemble's record


def test_top_level_plots_show_every_model():
    """dvc.yaml's top-level plots name their files one by one (DVC expands no ``foreach``
    there): every data-series plot must hold every model of params.yaml, and every model's
    figures must be listed, so a model added to params.yaml without its plots fails here."""
    root = Path(__file__).resolve().parent.parent
    plots = yaml.safe_load((root / "dvc.yaml").read_text())["plots"]
    models = list(yaml.safe_load((root / "params.yaml").read_text())["models"])
    images = [entry for entry in plots if isinstance(entry, str)]
    for entry in plots:
        if isinstance(entry, dict):
            (title, plot), = entry.items()
            for model in models:
                assert any(f"/{model}/" in path for path in plot["y"]), (title, model)
    for model in models:
        assert f"data/eval/{model}/figures/explain.png" in images, model
