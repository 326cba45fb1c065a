"""params.yaml sections into config dataclasses: defaults agree, unknown keys are refused."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.compare import CompareConfig
from pipeline.config import ConfigError, from_params
from pipeline.ensemble import EnsembleConfig
from pipeline.errors import PipelineError
from pipeline.evaluate import EvaluateConfig
from pipeline.masks import MaskParams
from pipeline.models import ModelConfig
from pipeline.sources import DataConfig
from pipeline.split import SplitConfig
from pipeline.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
# every config built from one params.yaml section (models.<name> entries differ by design: below)
SECTIONS = {"data": DataConfig, "masks": MaskParams, "split": SplitConfig, "train": TrainConfig,
            "evaluate": EvaluateConfig, "ensemble": EnsembleConfig, "compare": CompareConfig}
# Content, not knobs: empty in code so that a library caller gets exactly what it passes (no
# hidden recipe overrides, no reference rows), filled in params.yaml for the pipeline's run.
CONTENT_FIELDS = {("train", "random_init"), ("compare", "references")}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_defaults_agree_with_params_yaml(section):
    """A config left at its defaults is the default run: the dataclass and params.yaml agree."""
    cls = SECTIONS[section]
    built = from_params(cls, PARAMS[section], section)
    differ = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            continue  # required: params.yaml must give it
        if (section, field.name) in CONTENT_FIELDS:
            continue
        if getattr(built, field.name) != default:
            differ[field.name] = (default, getattr(built, field.name))
    assert not differ, f"{cls.__name__} defaults vs params.yaml {section}: {differ}"


@pytest.mark.parametrize("cls", [*SECTIONS.values(), ModelConfig])
def test_configs_are_frozen(cls):
    assert cls.__dataclass_params__.frozen


def test_every_model_entry_builds():
    for name, entry in PARAMS["models"].items():
        assert from_params(ModelConfig, entry, f"models.{name}").backbone == entry["backbone"]


def test_unknown_key_is_a_one_line_error():
    with pytest.raises(ConfigError) as error:
        from_params(SplitConfig, {**PARAMS["split"], "tset": 0.2}, "split")
    assert str(error.value).startswith("params.yaml split: unknown key(s) tset; known: folds, ")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"^params.yaml data.synthetic: unknown key\(s\) size;"):
        from_params(DataConfig, {"synthetic": {"images_per_class": 3, "size": 9}}, "data")


def test_a_key_read_elsewhere_is_accepted_and_left_out():
    """``masks.gallery_per_class`` belongs to the masks stage's gallery, not to MaskParams."""
    assert "gallery_per_class" in PARAMS["masks"]
    params = from_params(MaskParams, PARAMS["masks"], "masks")
    assert "gallery_per_class" not in dataclasses.asdict(params)
    with pytest.raises(ConfigError, match="unknown key"):
        from_params(SplitConfig, {"gallery_per_class": 6}, "split")


def test_bad_values_and_missing_keys_are_config_errors():
    with pytest.raises(ConfigError, match=r"^params.yaml split: split.folds must list"):
        from_params(SplitConfig, {"folds": [1, 2]}, "split")
    with pytest.raises(ConfigError, match=r"^params.yaml train: .*'epochs'"):
        from_params(TrainConfig, {"batch_size": 8, "lr": 0.1}, "train")
    with pytest.raises(ConfigError, match=r"^params.yaml models.m: pretrained must be"):
        from_params(ModelConfig, {"backbone": "b", "image_size": 8, "pretrained": "yes"},
                    "models.m")
    with pytest.raises(ConfigError, match="must be a mapping"):
        from_params(MaskParams, [1, 2], "masks")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("mask_guidance", -1, "mask_guidance must be a number >= 0"),
    ("mask_guidance", float("nan"), "mask_guidance must be a number >= 0"),
    ("mask_guidance", "yes", "mask_guidance must be a number >= 0"),
    ("refit", "maybe", "refit must be true or false"),
    ("cell_fraction", 2, "cell_fraction must be in"),
    ("stain_jitter", -0.5, "stain_jitter must be in"),
    ("blur_sigma", -1, "blur_sigma must be a number >= 0"),
    ("optimizer", "lbfgs", "optimizer must be one of adamw, sgd"),
])
def test_bad_training_knobs_fail_when_the_config_is_built(key, value, message):
    """Not after minutes of set-up, and as one line: guidance and transfer settings."""
    with pytest.raises(ConfigError, match=rf"^params.yaml train: .*{message}"):
        from_params(TrainConfig, {**PARAMS["train"], key: value}, "train")


def test_nested_config_and_yaml_list():
    data = from_params(DataConfig, {"synthetic": {"images_per_class": 3}}, "data")
    assert data.synthetic.images_per_class == 3 and data.synthetic.seed == 0
    assert from_params(SplitConfig, {"folds": [0, 1, 2]}, "split").folds == (0, 1, 2)


@pytest.mark.parametrize("stage", ["source", "download", "masks", "split"])
def test_stage_with_an_unknown_key_exits_2_with_one_line(stage, tmp_path):
    section = {"source": "data", "download": "data", "masks": "masks", "split": "split"}[stage]
    params = {**PARAMS, section: {**PARAMS[section], "typo_key": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: params.yaml {section}: unknown key(s) typo_key; ")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "data").exists()


def test_a_bad_synthetic_size_stops_download_with_one_line(tmp_path):
    params = {**PARAMS, "data": {**PARAMS["data"], "synthetic": {"images_per_class": 0}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "stages.download"], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                            text=True)
    assert (result.returncode, result.stderr) == (  # refused as params.yaml is read
        2, "error: params.yaml data.synthetic.images_per_class: must be >= 1 (got 0)\n")


def test_train_stage_for_a_model_params_yaml_lacks_is_one_line(tmp_path, monkeypatch):
    """``python -m stages.train NAME`` for a name that is no ``models`` entry: one line."""
    from stages import train as train_stage

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError) as error:
        train_stage.main("resnet_attention")
    assert str(error.value) == "train: no model 'resnet_attention' in params.yaml models"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"]
