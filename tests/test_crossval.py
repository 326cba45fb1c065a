"""Cross-validation aggregation and bootstrap intervals, on predictions built here."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from pipeline.crossval import aggregate_folds, average_predictions
from pipeline.errors import USER_ERROR_EXIT, run_entry_point
from pipeline.io import read_json

CLASSES = ["a", "b", "c"]


def refusal(main, args: list[str], capsys) -> str:
    """What a command-line tool prints when it refuses ``args``, run in this process as its
    ``__main__`` runs it: exit code 2 and one line on stderr (each tool's real command line is
    checked once as a subprocess)."""
    assert run_entry_point(main, args) == USER_ERROR_EXIT
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    return stderr


def _fold(tmp_path, fold: int, paths: list[str], labels: list[str], predicted: list[str]):
    folder = tmp_path / f"fold{fold}"
    folder.mkdir()
    probabilities = {f"p_{name}": [0.8 if p == name else 0.1 for p in predicted]
                     for name in CLASSES}
    pd.DataFrame({"path": paths, "label": labels, "predicted": predicted,
                  **probabilities}).to_csv(folder / "predictions.csv", index=False)
    return folder


def test_aggregate_pools_folds_and_reports_the_spread(tmp_path):
    folds = [
        _fold(tmp_path, 0, ["x0", "x1", "x2", "x3"], ["a", "b", "c", "a"], ["a", "b", "c", "a"]),
        _fold(tmp_path, 1, ["y0", "y1", "y2", "y3"], ["a", "b", "c", "c"], ["a", "b", "c", "a"]),
    ]
    summary = aggregate_folds("m", folds, tmp_path / "out", tmp_path / "cv.json")
    assert summary["mean"]["accuracy"] == pytest.approx((1.0 + 0.75) / 2)
    assert summary["std"]["accuracy"] == pytest.approx(np.std([1.0, 0.75], ddof=1))
    assert summary["out_of_fold"]["accuracy"] == pytest.approx(7 / 8)
    assert summary["out_of_fold"]["images"] == 8
    low, high = summary["out_of_fold_ci95"]["accuracy"]
    assert low <= 7 / 8 <= high < 1.0 + 1e-9
    assert read_json(tmp_path / "out" / "summary.json") == summary
    metrics = read_json(tmp_path / "cv.json")  # what dvc metrics show compares: quality only
    assert metrics["fold_mean"] == summary["mean"] and metrics["external"] == {}
    assert metrics["out_of_fold"]["accuracy"] == pytest.approx(7 / 8)
    assert "images" not in metrics["out_of_fold"] and "std" not in metrics
    assert (tmp_path / "out" / "confusion.png").stat().st_size > 10_000
    assert len(pd.read_csv(tmp_path / "out" / "out_of_fold_predictions.csv")) == 8


def _external(fold_dir, name: str, predicted: list[str], labels=("a", "b", "c", "c")):
    """A fold model's predictions on an external set of four images (``a`` is 0.8 sure)."""
    folder = fold_dir / "external" / name
    folder.mkdir(parents=True)
    probabilities = {f"p_{c}": [0.8 if p == c else 0.1 for p in predicted] for c in CLASSES}
    pd.DataFrame({"path": [f"e{i}" for i in range(4)], "label": list(labels),
                  **probabilities}).to_csv(folder / "predictions.csv", index=False)
    index = fold_dir / "external" / "index.json"
    index.write_text(json.dumps({**(json.loads(index.read_text()) if index.is_file() else {}),
                                 name: f"/data/{name}"}))


def test_external_sets_scored_by_every_fold_model_are_averaged(tmp_path):
    folds = [_fold(tmp_path, k, [f"x{k}"], ["a"], ["a"]) for k in range(3)]
    # every fold model misses at most one image, a different one: the average misses none
    for folder, predicted in zip(folds, (["a", "b", "c", "c"], ["a", "b", "c", "a"],
                                         ["a", "b", "b", "c"]), strict=True):
        _external(folder, "lab-b", predicted)
    summary = aggregate_folds("m", folds, tmp_path / "out", tmp_path / "cv.json")
    lab = summary["external"]["lab-b"]
    assert lab["mean"]["accuracy"] == pytest.approx((1.0 + 0.75 + 0.75) / 3)
    assert lab["std"]["accuracy"] == pytest.approx(np.std([1.0, 0.75, 0.75], ddof=1))
    assert lab["fold_average"]["accuracy"] == 1.0 and lab["fold_average"]["images"] == 4
    averaged = pd.read_csv(tmp_path / "out" / "external" / "lab-b" / "fold_average_predictions.csv")
    assert averaged.loc[2, "p_c"] == pytest.approx((0.8 + 0.8 + 0.1) / 3)
    assert (tmp_path / "out" / "external" / "lab-b" / "confusion.png").stat().st_size > 10_000
    assert read_json(tmp_path / "out" / "summary.json")["external"]["lab-b"] == lab
    assert read_json(tmp_path / "cv.json")["external"]["lab-b"]["accuracy"] == 1.0
    _external(folds[0], "lab-c", ["a", "b", "c", "c"])  # one fold scored a set the others did not
    with pytest.raises(ValueError, match="different external sets"):
        aggregate_folds("m", folds, tmp_path / "out", tmp_path / "cv.json")


def test_fold_models_that_disagree_on_an_external_label_are_an_error(tmp_path):
    folds = [_fold(tmp_path, k, [f"x{k}"], ["a"], ["a"]) for k in range(2)]
    _external(folds[0], "lab-b", ["a", "b", "c", "c"])
    _external(folds[1], "lab-b", ["a", "b", "c", "c"], labels=("a", "b", "c", "a"))
    with pytest.raises(ValueError, match="m on lab-b: the members disagree on an image's label"):
        aggregate_folds("m", folds, tmp_path / "out", tmp_path / "cv.json")
    assert not (tmp_path / "out" / "external" / "lab-b").exists()


def test_average_predictions_aligns_images_and_refuses_what_differs():
    first = pd.DataFrame({"path": ["x", "y"], "label": ["a", "b"], "fold": [0, 1],
                          "p_a": [0.9, 0.2], "p_b": [0.1, 0.8]})
    second = first.iloc[::-1].assign(p_a=[0.4, 0.5], p_b=[0.6, 0.5])  # rows y, x
    averaged = average_predictions([first, second], "both")
    assert list(averaged.columns) == ["path", "label", "fold", "p_a", "p_b"]
    assert list(averaged["path"]) == ["x", "y"] and list(averaged["fold"]) == [0, 1]
    assert averaged["p_a"].tolist() == pytest.approx([0.7, 0.3])
    assert averaged["p_b"].tolist() == pytest.approx([0.3, 0.7])
    for other, message in (
            (first.assign(path=["x", "z"]), "not scored on the same images"),
            (pd.concat([first, first.iloc[:1]]), "not scored on the same images"),
            (first.rename(columns={"p_b": "p_c"}), "not scored on the same images"),
            (first.assign(label=["a", "a"]), "disagree on an image's label or fold"),
            (first.assign(fold=[1, 1]), "disagree on an image's label or fold")):
        with pytest.raises(ValueError, match=f"both: .*{message}"):
            average_predictions([first, other], "both")


def test_no_external_set_leaves_an_empty_entry(tmp_path):
    folds = [_fold(tmp_path, k, [f"x{k}"], ["a"], ["a"]) for k in range(2)]
    assert aggregate_folds("m", folds, tmp_path / "out", tmp_path / "cv.json")["external"] == {}


def test_an_image_tested_twice_is_an_error(tmp_path):
    folds = [_fold(tmp_path, 0, ["x0", "x1"], ["a", "b"], ["a", "b"]),
             _fold(tmp_path, 1, ["x1", "x2"], ["b", "c"], ["b", "c"])]
    with pytest.raises(ValueError, match="more than one fold, e.g. x1"):
        aggregate_folds("m", folds, tmp_path / "out", tmp_path / "cv.json")


def test_vectorised_statistics_agree_with_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from pipeline.metrics_ci import _balanced_accuracy, _macro_f1

    rng = np.random.default_rng(1)
    labels, predicted = rng.integers(0, 4, 60), rng.integers(0, 5, 60)
    labels[labels == 2] = 3  # a class that is never true, only predicted
    assert _balanced_accuracy(labels, predicted) == pytest.approx(
        balanced_accuracy_score(labels, predicted))
    assert _macro_f1(labels, predicted) == pytest.approx(
        f1_score(labels, predicted, average="macro", zero_division=0))


def test_paired_difference_of_two_models_on_the_same_images():
    from pipeline.metrics_ci import paired_difference

    rng = np.random.default_rng(0)
    second = rng.random(400) < 0.9
    first = second.copy()
    first[np.flatnonzero(~second)[:30]] = True  # 30 images only the first gets right
    first[np.flatnonzero(second)[:2]] = False  # 2 only the second gets right
    result = paired_difference(first, second)
    assert result["difference"] == pytest.approx(28 / 400)
    assert (result["only_first_right"], result["only_second_right"]) == (30, 2)
    low, high = result["ci95"]
    assert 0 < low < 28 / 400 < high  # a real gain: the interval excludes 0
    swapped = paired_difference(second, first)
    assert swapped["difference"] == pytest.approx(-28 / 400) and swapped["ci95"][1] < 0
    assert paired_difference(second, second)["ci95"] == [0.0, 0.0]
    coin = paired_difference(rng.random(400) < 0.9, second)  # unrelated, same accuracy
    assert coin["ci95"][0] < 0 < coin["ci95"][1]
    with pytest.raises(ValueError, match="same non-empty list of images"):
        paired_difference(first, second[:-1])
    shares = np.full(400, 0.5)  # a recipe's two runs, each right on half the images
    assert paired_difference(shares, second)["difference"] == pytest.approx(0.5 - second.mean())
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        paired_difference(shares * 3, second)


def _recipe(tmp_path, name: str, second_fold: list[str], external: list[list[str]]):
    """A crossval output of two folds (four images each) and an external set of four images."""
    root = tmp_path / name
    root.mkdir()
    folds = [_fold(root, 0, ["x0", "x1", "x2", "x3"], ["a", "b", "c", "a"], ["a", "b", "c", "a"]),
             _fold(root, 1, ["y0", "y1", "y2", "y3"], ["a", "b", "c", "c"], second_fold)]
    for folder, predicted in zip(folds, external, strict=True):
        _external(folder, "lab-b", predicted)
    aggregate_folds(name, folds, root / "crossval", root / "cv.json")
    return root / "crossval"


def _reference_and_other(tmp_path):
    """Two recipes on the same images: out of fold the reference misses y3 and the other y2; on
    the external set the reference misses e2 and the other nothing."""
    return (_recipe(tmp_path, "reference", ["a", "b", "c", "a"],
                    [["a", "b", "b", "c"], ["a", "b", "b", "c"]]),
            _recipe(tmp_path, "other", ["a", "b", "a", "c"],
                    [["a", "b", "c", "c"], ["a", "b", "c", "c"]]))


def test_cv_compare_pairs_recipes_on_the_same_images(tmp_path):
    from bench.cv_compare import main

    reference, other = _reference_and_other(tmp_path)
    out = tmp_path / "compare.json"
    main([f"reference={reference}", f"other={other}", "--json", str(out)])
    result = read_json(out)
    assert result["recipes"]["reference"]["out_of_fold"]["right"] == 7
    assert result["recipes"]["reference"]["out_of_fold"]["recall"] == pytest.approx(
        {"a": 1.0, "b": 1.0, "c": 2 / 3})
    assert result["recipes"]["other"]["external"]["lab-b"]["accuracy"] == 1.0
    paired = result["paired_with_first"]["other"]
    assert paired["out_of_fold"]["difference"] == 0.0  # one image won, one lost
    assert (paired["out_of_fold"]["only_this_right"],
            paired["out_of_fold"]["only_reference_right"]) == (1, 1)
    assert paired["lab-b"]["difference"] == pytest.approx(1 / 4)
    assert (paired["lab-b"]["only_this_right"], paired["lab-b"]["only_reference_right"]) == (1, 0)
    assert "reference" not in result["paired_with_first"]


def test_cv_compare_writes_no_file_unless_asked(tmp_path, monkeypatch, capsys):
    from bench.cv_compare import main

    reference, other = _reference_and_other(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    main([f"reference={reference}", f"other={other}"])
    assert "| other |" in capsys.readouterr().out
    assert list(work.rglob("*")) == []  # kept figures elsewhere are never overwritten


def test_cv_compare_scores_an_equal_weight_ensemble_of_recipes(tmp_path):
    from bench.cv_compare import main

    # out of fold, y3 (a c): the reference says a, the two others c; y2 (a c): only "other"
    # says a. Averaged, the three are right on all eight images; the reference on seven.
    reference, other = _reference_and_other(tmp_path)
    third = _recipe(tmp_path, "third", ["a", "b", "c", "c"],
                    [["a", "b", "c", "c"], ["a", "b", "c", "c"]])
    out = tmp_path / "compare.json"
    main([f"reference={reference}", f"same={reference}+{reference}",
          f"three={reference}+{other}+{third}", "--json", str(out)])
    result = read_json(out)
    same, three = result["recipes"]["same"], result["recipes"]["three"]
    assert same["out_of_fold"] == result["recipes"]["reference"]["out_of_fold"]
    assert same["fold_accuracy"] == result["recipes"]["reference"]["fold_accuracy"]
    assert three["folder"] == f"{reference}+{other}+{third}"
    assert three["out_of_fold"]["right"] == 8
    assert three["fold_accuracy"] == {"mean": 1.0, "std": 0.0}
    assert three["external"]["lab-b"]["accuracy"] == 1.0  # e2: b, c, c
    paired = result["paired_with_first"]["three"]["out_of_fold"]
    assert (paired["only_this_right"], paired["only_reference_right"]) == (1, 0)


def test_cv_compare_scores_a_recipe_run_twice_by_the_share_of_runs_right(tmp_path, capsys):
    from bench.cv_compare import main

    # reference: run 1 misses y3, run 2 misses y2, both miss the external e2; other: run 1 right
    # on every image, run 2 misses y3. Out of fold, the reference gets y2 and y3 half right
    # (7 of 8), the other y3 half right (7.5 of 8): it gets y2 right more often, nothing less.
    runs = {name: _recipe(tmp_path, name, second, [external, external])
            for name, second, external in (
                ("r1", ["a", "b", "c", "a"], ["a", "b", "b", "c"]),
                ("r2", ["a", "b", "a", "c"], ["a", "b", "b", "c"]),
                ("o1", ["a", "b", "c", "c"], ["a", "b", "c", "c"]),
                ("o2", ["a", "b", "c", "a"], ["a", "b", "c", "c"]))}
    out = tmp_path / "compare.json"
    main([f"reference={runs['r1']},{runs['r2']}", f"other={runs['o1']},{runs['o2']}",
          f"single={runs['o1']}",
          f"self_ensembles={runs['r1']}+{runs['r1']},{runs['r2']}+{runs['r2']}",
          "--json", str(out)])
    result = read_json(out)
    reference = result["recipes"]["reference"]
    assert reference["runs"] == 2 and reference["folder"] == f"{runs['r1']},{runs['r2']}"
    assert reference["out_of_fold"]["accuracy"] == pytest.approx(7 / 8)
    assert reference["out_of_fold"]["right"] == pytest.approx(7.0)
    assert reference["out_of_fold"]["run_accuracy"] == pytest.approx([7 / 8, 7 / 8])
    assert reference["out_of_fold"]["recall"] == pytest.approx({"a": 1.0, "b": 1.0, "c": 2 / 3})
    assert reference["out_of_fold"]["balanced_accuracy"] == pytest.approx(8 / 9)
    assert reference["fold_accuracy"]["mean"] == pytest.approx(7 / 8)  # folds 1.0 and 0.75
    assert reference["external"]["lab-b"]["accuracy"] == pytest.approx(3 / 4)
    low, high = reference["out_of_fold"]["ci95"]["accuracy"]
    assert low < 7 / 8 < high
    paired = result["paired_with_first"]["other"]["out_of_fold"]
    assert paired["difference"] == pytest.approx(1 / 16)  # y2: +1/2 on one image of 8
    assert (paired["only_this_right"], paired["only_reference_right"]) == (1, 0)
    assert result["paired_with_first"]["other"]["lab-b"]["difference"] == pytest.approx(1 / 4)
    assert result["paired_with_first"]["single"]["out_of_fold"]["difference"] == pytest.approx(
        1 / 8)  # one run, right on all: shares 1 against 1/2 on y2 and y3
    assert "runs" not in result["recipes"]["single"]
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()}
    assert "(7/8)" in rows["reference"] and "(7.5/8)" in rows["other"]  # the runs' mean count
    # each run an ensemble (here of a run with itself: that run's probabilities)
    assert result["recipes"]["self_ensembles"]["out_of_fold"] == reference["out_of_fold"]


def test_cv_compare_gives_the_interval_a_rule_decides_at(tmp_path, capsys):
    import subprocess
    import sys
    from pathlib import Path

    from bench.cv_compare import main

    rng = np.random.default_rng(1)
    labels = [str(name) for name in rng.choice(CLASSES, 120)]
    wrong = {i: CLASSES[(CLASSES.index(labels[i]) + 1) % 3] for i in range(20)}
    def recipe(name: str, misses: range) -> Path:  # right on every image but ``misses``
        root = tmp_path / name
        root.mkdir()
        predicted = [wrong[i] if i in misses else labels[i] for i in range(120)]
        folds = [_fold(root, k, [f"x{i}" for i in range(60 * k, 60 * k + 60)],
                       labels[60 * k:60 * k + 60], predicted[60 * k:60 * k + 60]) for k in (0, 1)]
        aggregate_folds(name, folds, root / "crossval", root / "cv.json")
        return root / "crossval"
    reference, other = recipe("reference", range(20)), recipe("other", range(10, 20))
    out = tmp_path / "compare.json"
    main([f"reference={reference}", f"other={other}", "--level", "0.9875", "--json", str(out)])
    paired = read_json(out)["paired_with_first"]["other"]["out_of_fold"]
    assert paired["difference"] == pytest.approx(10 / 120)
    assert paired["ci_level"]["level"] == 0.9875
    (low95, high95), (low, high) = paired["ci95"], paired["ci_level"]["interval"]
    assert low <= low95 < 10 / 120 < high95 <= high and (low, high) != (low95, high95)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| other"))
    assert f"98.75%: [{low:+.3f}, {high:+.3f}]" in row
    main([f"reference={reference}", f"other={other}", "--json", str(out)])
    assert "ci_level" not in read_json(out)["paired_with_first"]["other"]["out_of_fold"]
    out.unlink()
    for level in ("1.5", "0", "1", "-0.95", "nan", "inf"):
        run = subprocess.run([sys.executable, "-m", "bench.cv_compare", f"r={reference}",
                              f"o={other}", f"--level={level}", "--json", str(out)],
                             capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert run.returncode == 2 and "between 0 and 1" in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and not out.exists()


def test_power_gives_the_difference_a_comparison_could_detect(tmp_path, capsys):
    import subprocess
    import sys
    from pathlib import Path

    from bench.cv_compare import main as compare
    from bench.power import detectable, main

    pair = {"difference": 0.004, "ci95": [-0.001, 0.011]}  # standard error 0.012 / 3.92
    found = detectable(pair, 1560)
    assert found["standard_error"] == pytest.approx(0.012 / 3.919928)
    assert found["detectable_difference"] == pytest.approx(2.801585 * 0.012 / 3.919928)
    at_threshold = detectable(pair | {"difference": found["detectable_difference"]}, 1560)
    assert at_threshold["images_needed"] == pytest.approx(1560)  # detectable here, no more
    half = detectable(pair | {"difference": found["detectable_difference"] / 2}, 1560)
    assert half["images_needed"] == pytest.approx(4 * 1560)  # half the gain: four times the data
    assert detectable(pair | {"difference": 0.0}, 1560)["images_needed"] == float("inf")

    reference, other = _reference_and_other(tmp_path)
    out = tmp_path / "compare.json"
    compare([f"reference={reference}", f"other={other}", "--json", str(out)])
    capsys.readouterr()
    main([str(out), "--set", "lab-b"])
    row = capsys.readouterr().out.splitlines()[-1].split("|")
    assert [cell.strip() for cell in row[1:6]] == [
        "compare", "other − reference", "+0.2500", "[+0.000, +0.750]", "4"]
    not_compare = tmp_path / "other.json"
    for text in ("{", "[]", '{"recipes": {}, "paired_with_first": {}}',
                 '{"recipes": {"r": {}}, "paired_with_first": {"o": {"out_of_fold": {}}}}',
                 _spoiled_pairing(out, difference=float("nan")),
                 _spoiled_pairing(out, ci95=[0.5, -0.5])):
        not_compare.write_text(text)
        run = subprocess.run([sys.executable, "-m", "bench.power", str(not_compare)],
                             capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "not a bench/cv_compare JSON" in run.stderr or "no pairing" in run.stderr


def _spoiled_pairing(compare_json, **values) -> str:
    """A ``cv_compare`` JSON file's text, its first out-of-fold pairing given ``values``."""
    result = json.loads(compare_json.read_text())
    next(iter(result["paired_with_first"].values()))["out_of_fold"].update(values)
    return json.dumps(result)


def _spoil_p_c(header: str, row: str) -> str:
    """``row`` (a CSV line under ``header``) with ``abc`` for its ``p_c`` value."""
    cells = row.split(",")
    cells[header.split(",").index("p_c")] = "abc"
    return ",".join(cells)


def test_cv_compare_gives_no_recall_to_a_class_with_no_images(tmp_path, capsys):
    from bench.cv_compare import main

    root = tmp_path / "no-c"  # out of fold, no image is labelled c (one is predicted c)
    root.mkdir()
    folds = [_fold(root, 0, ["x0", "x1"], ["a", "b"], ["a", "c"]),
             _fold(root, 1, ["y0", "y1"], ["a", "b"], ["a", "b"])]
    aggregate_folds("no-c", folds, root / "crossval", root / "cv.json")
    out = tmp_path / "compare.json"
    main([f"no_c={root / 'crossval'}", "--json", str(out)])
    summary = read_json(out)["recipes"]["no_c"]["out_of_fold"]
    assert summary["recall"] == {"a": 1.0, "b": 0.5, "c": None}  # not a recall of 0.000
    assert summary["balanced_accuracy"] == pytest.approx(0.75)  # over a and b, as recall is
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| no_c"))
    assert [cell.strip() for cell in row.split("|")[5:8]] == ["1.000", "0.500", "-"]


def test_recipes_give_no_recall_to_a_class_with_no_images(tmp_path):
    from bench.recipes import markdown, recalls

    report = tmp_path / "report.csv"  # a test split without platelets
    report.write_text("class,precision,recall,f1,support\nbasophil,1.0,0.95,0.97,20\n"
                      "platelet,0.0,0.0,0.0,0\n")
    by_class = recalls(report)
    assert by_class == {"basophil": 0.95, "platelet": None}  # not a recall of 0.0
    scores = {"accuracy": 0.95, "balanced_accuracy": 0.95, "accuracy_ci95_low": 0.9,
              "accuracy_ci95_high": 1.0}
    table = markdown([{"backbone": "lite0", "image_size": 160, "epochs_run": 20, "best_epoch": 12,
                       "wall_seconds": 60.0, "test": scores, "external": scores,
                       "test_recall": by_class,
                       "external_recall": {"basophil": 0.9, "platelet": 1.0}}])
    assert table.splitlines()[-1] == "| lite0 | 0.95 / 0.90 | - / 1.00 |"


def test_cv_compare_refuses_recipes_scored_on_other_images(tmp_path, capsys):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from bench.cv_compare import main

    reference = _recipe(tmp_path, "reference", ["a", "b", "c", "a"],
                        [["a", "b", "b", "c"], ["a", "b", "b", "c"]])
    elsewhere = tmp_path / "elsewhere"  # a recipe cross-validated on other images
    elsewhere.mkdir()
    other = tmp_path / "other"
    aggregate_folds("other", [_fold(elsewhere, k, [f"z{k}"], ["a"], ["a"]) for k in range(2)],
                    other, tmp_path / "other.json")
    broken = {}  # the reference's folder with its out-of-fold predictions spoiled
    lines = (reference / "out_of_fold_predictions.csv").read_text().splitlines()
    for name, text in (("empty", ""), ("header-only", lines[0] + "\n"),
                       ("unknown-label", "\n".join([lines[0], lines[1].replace(",a,", ",zebra,", 1),
                                                     *lines[2:]])),
                       ("not-a-number", "\n".join([lines[0], _spoil_p_c(lines[0], lines[1]),
                                                    *lines[2:]])),
                       ("twice", "\n".join([*lines, lines[1]]))):
        broken[name] = tmp_path / name
        shutil.copytree(reference, broken[name])
        (broken[name] / "out_of_fold_predictions.csv").write_text(text)
    no_folds = tmp_path / "no-folds"  # the reference's predictions without their fold column
    shutil.copytree(reference, no_folds)
    oof = pd.read_csv(no_folds / "out_of_fold_predictions.csv")
    oof.drop(columns="fold").to_csv(no_folds / "out_of_fold_predictions.csv", index=False)
    refolded = tmp_path / "refolded"  # the same predictions, each image in the other fold
    shutil.copytree(reference, refolded)
    oof.assign(fold=1 - oof["fold"]).to_csv(refolded / "out_of_fold_predictions.csv", index=False)
    for recipes, message in (
            ([f"r={reference}", f"o={other}"], "not scored on the same images"),
            ([f"r={reference}", f"o={tmp_path / 'nowhere'}"], "folds.csv is missing"),
            ([f"r={reference}", str(other)], "NAME=FOLDER"),
            ([f"r={reference}", f"r={other}"], "two recipes share a name"),
            ([f"r={reference}", f"o={broken['empty']}"], "not a readable CSV"),
            ([f"r={reference}", f"o={broken['header-only']}"], "at least one row"),
            ([f"r={reference}", f"o={broken['unknown-label']}"], "column: zebra"),
            ([f"r={reference}", f"o={broken['not-a-number']}"], "is not a number"),
            ([f"r={reference}", f"o={broken['twice']}"], "an image is listed twice"),
            ([f"r={broken['twice']}", f"o={reference}"], "an image is listed twice"),
            ([f"r={reference}", f"e={reference}+{other}"], "not scored on the same images"),
            ([f"r={reference}", f"e={reference}+"], "NAME=FOLDER+FOLDER"),
            ([f"r={reference}", f"e={reference}+{no_folds}"], "label or fold"),
            ([f"r={reference}", f"o={reference},{other}"], "its runs were not scored on the same"),
            ([f"r={reference},{refolded}"], "its runs put the images in other folds"),
            ([f"r={reference},{no_folds}"], "without a fold column"),
            ([f"r={no_folds},{reference}"], "without a fold column"),
            ([f"r={reference},"], "NAME=RUN,RUN")):
        assert message in refusal(main, [*recipes, "--json", str(tmp_path / "c.json")], capsys)
        assert not (tmp_path / "c.json").exists()
    run = subprocess.run([sys.executable, "-m", "bench.cv_compare", f"r={reference}",
                          f"o={other}", "--json", str(tmp_path / "c.json")],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "not scored on the same images" in run.stderr and not (tmp_path / "c.json").exists()


def test_cv_ensemble_refuses_what_it_cannot_ensemble(tmp_path, capsys, monkeypatch):
    """Members that were not cross-validated, a lone member, folds off or a recipe to pair with
    that is not a predictions table: a one-line error before anything is written."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from bench.cv_ensemble import main

    root = Path(__file__).parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)

    def arguments(members: list[str], folds: list[int], *extra: str) -> list[str]:
        params["split"]["folds"] = folds
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        return [*members, *extra, "--out", "out", "--json", "out.json"]

    for name in ("a", "b"):  # two members' folds, each with what the ensemble reads first
        for fold in (0, 1):
            for needed in ("train/train.json", "eval/predictions.csv"):
                (tmp_path / "data/cv" / name / str(fold) / needed).parent.mkdir(parents=True,
                                                                               exist_ok=True)
                (tmp_path / "data/cv" / name / str(fold) / needed).write_text("{}")
        oof = tmp_path / "data/crossval" / name / "out_of_fold_predictions.csv"
        oof.parent.mkdir(parents=True)
        oof.write_text("path,label,p_x,p_y\nx/1.png,x,0.9,0.1\ny/2.png,y,0.2,0.8\n")
    (tmp_path / "spoiled.csv").write_text("path,label,p_x,p_y\nx/1.png,x,abc,0.1\n")
    (tmp_path / "elsewhere.csv").write_text("path,label,p_x,p_y\nz/9.png,x,0.9,0.1\n")
    for members, folds, extra, message in (
            (["a"], [0, 1], [], "two different members or more"),
            (["a", "a"], [0, 1], [], "two different members or more"),
            (["a", "b"], [], [], "split.folds is empty"),
            (["a", "c"], [0, 1], [], "data/cv/c/0/train/train.json is missing"),
            (["a", "b"], [0, 1, 2], [], "data/cv/a/2/train/train.json is missing"),
            (["a", "b"], [0, 1], ["--pair-with", "nowhere.csv"], "nowhere.csv is missing"),
            (["a", "b"], [0, 1], ["--pair-with", "spoiled.csv"], "is not a number"),
            (["a", "b"], [0, 1], ["--pair-with", "elsewhere.csv"], "not scored on the same")):
        assert message in refusal(main, arguments(members, folds, *extra), capsys)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.json").exists()
    result = subprocess.run([sys.executable, "-m", "bench.cv_ensemble",
                             *arguments(["a", "b"], [])], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "split.folds is empty" in result.stderr and not (tmp_path / "out.json").exists()
