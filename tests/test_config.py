"""The experiment config: YAML + overrides, validation naming the key, derived DeepSpeed JSON."""

import pytest
import yaml

from core.config import ExperimentConfig
from core.errors import LdmError
from core.loader import build_config, load_config
from core.presets import PRESETS, get_preset


def test_yaml_with_preset_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("preset: tiny\ntrain:\n  num_steps: 11\nrun:\n  root: out\n")
    config = load_config(path, ["train.learning_rate=3e-4", "sample.prompts=[a, b]"])
    assert config.train.num_steps == 11
    assert config.train.learning_rate == pytest.approx(3e-4)
    assert config.sample.prompts == ["a", "b"]
    assert config.unet.block_out_channels == get_preset("tiny").unet.block_out_channels
    assert config.run.root.endswith("/out") and config.run.root.startswith("/")  # made absolute


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=1", "config key train.lr: unknown key"),
        ("trian.num_steps=1", "config key trian: unknown key"),
        ("train.num_steps=abc", "config key train.num_steps: Input should be a valid integer"),
        (
            "train.num_steps=0",
            "config key train.num_steps: Input should be greater than or equal to 1",
        ),
        ("train.zero_stage=5", "config key train.zero_stage"),
        ("train.global_batch_size=12", "config key train.global_batch_size: 12 is not a multiple"),
        ("data.resolution=30", "config key data.resolution"),
        ("autoencoder.block_out_channels=[32,32]", "config key autoencoder.block_out_channels"),
        ("train.resume=/nonexistent/tag", "config key train.resume"),
        ("text_encoder.name_or_path=ldmbert", "config key text_encoder.trainable: ldmbert has"),
        ("text_encoder.num_layers=2", "config key text_encoder.num_layers: sizes only the"),
        ("num_steps=3", "the key must be section.key"),
        ("train.num_steps", "expected section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(LdmError) as err:
        build_config({"preset": "tiny"}, [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(LdmError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(LdmError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("preset: nope\n")
    with pytest.raises(LdmError, match="unknown preset 'nope'"):
        load_config(unknown)


def test_every_field_is_documented():
    for name, section in ExperimentConfig.model_fields.items():
        for key, field in section.annotation.model_fields.items():
            assert field.description, f"{name}.{key} has no docstring"


def test_presets_are_valid_and_demo_yaml_matches_preset():
    for make in PRESETS.values():
        assert isinstance(make(), ExperimentConfig)
    from tests.conftest import ROOT

    demo_yaml = load_config(ROOT / "configs" / "demo.yaml")
    assert demo_yaml.train == get_preset("demo").train


def test_deepspeed_json_is_derived():
    from training.engine import deepspeed_config

    config = build_config({"preset": "tiny"}, ["train.global_batch_size=16", "train.zero_stage=3"])
    ds = deepspeed_config(config, world_size=2)
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is False
    # train.grad_clip=0 means off, which DeepSpeed must be told (its default clips at 1.0).
    off = build_config({"preset": "tiny"}, ["train.grad_clip=0"])
    assert deepspeed_config(off, world_size=2)["gradient_clipping"] == 0.0


def test_checkpoints_written_with_retired_keys_still_load(tmp_path):
    from core.loader import load_saved_config

    old = build_config({"preset": "tiny"}, absolute_paths=False).to_dict()
    old["precompute"]["text"] = "token_ids"  # before text_encoder.trainable replaced it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert load_saved_config(tmp_path).text_encoder.trainable
    old["precompute"]["text"] = "hidden_states"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert not load_saved_config(tmp_path).text_encoder.trainable
    with pytest.raises(LdmError, match="precompute.text: unknown key"):  # not in new YAMLs
        build_config(old)
