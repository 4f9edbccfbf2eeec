"""Presets: plain functions returning a complete experiment config.

A YAML file can start from one with `preset: NAME` and override any key; `ldm config
--preset NAME` prints one in full.
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.config import ExperimentConfig, build_config
from orchestrator.errors import LdmError

# Prompts from large visual groups of the data (1,880 skin-tone variants, 275 flags, 207
# faces), so a model this small, trained this briefly, can show that the prompt matters.
DEMO_PROMPTS = [
    "an emoji of thumbs up sign, light skin tone",
    "an emoji of thumbs up sign, dark skin tone",
    "an emoji of flag of japan",
    "an emoji of grinning face",
]


def demo() -> ExperimentConfig:
    """The README demo: real emoji images at 64x64, f=4 latents, ~10 minutes on 2 CPU cores."""
    return build_config(
        {
            "run": {"name": "demo", "root": "runs", "seed": 0},
            # The last shard (202 images) is held out for the FID-style evaluation.
            "data": {
                "shards": "data/emoji-shards",
                "resolution": 64,
                "samples_per_shard": 256,
                "holdout_shards": 1,
            },
            "autoencoder": {
                "downsample_factor": 4,
                "block_out_channels": [32, 64, 64],
                "num_steps": 700,
                "batch_size": 16,
                "learning_rate": 4e-3,
                "train_crop": 32,
                "num_holdout": 64,
            },
            # No GPU: decoding is cheap, so two encoders share the cores (see `make bench`).
            "precompute": {
                "num_encoders": 2,
                "num_cpus_per_encoder": 0.75,
                "num_cpus_per_decoder": 0.5,
            },
            "unet": {"block_out_channels": [32, 64, 128], "cross_attention_levels": 2},
            "diffusion": {"snr_gamma": 5.0},
            "train": {
                "num_workers": 2,
                "num_steps": 1000,
                "global_batch_size": 32,
                "micro_batch_size": 16,
                "learning_rate": 2e-3,
                "warmup_steps": 50,
                "ema_decay": 0.995,
                "checkpoint_every": 500,
                "sample_every": 500,
                "eval_every": 500,
                "log_every": 20,
            },
            "sample": {
                "prompts": DEMO_PROMPTS,
                "num_inference_steps": 30,
                "images_per_prompt": 4,
                "guidance_scale": 6.0,
            },
        },
        absolute_paths=False,
    )


def tiny() -> ExperimentConfig:
    """CI-sized: every stage runs in seconds on the fixture shard."""
    return build_config(
        {
            "run": {"name": "tiny", "root": "runs", "seed": 0},
            "data": {"shards": "data/tiny-shards", "resolution": 32, "samples_per_shard": 16},
            "autoencoder": {
                "downsample_factor": 4,
                "block_out_channels": [32, 32, 32],
                "num_steps": 20,
                "batch_size": 8,
                "num_holdout": 4,
                "log_every": 10,
            },
            "text_encoder": {"max_length": 16},
            "precompute": {"batch_size": 16},
            "unet": {
                "block_out_channels": [32, 64],
                "cross_attention_levels": 1,
                "num_attention_heads": 2,
            },
            "train": {
                "num_workers": 2,
                "num_steps": 6,
                "global_batch_size": 8,
                "micro_batch_size": 4,
                "checkpoint_every": 3,
                "sample_every": 6,
                "log_every": 2,
                "num_loader_workers": 1,
            },
            "sample": {
                "prompts": DEMO_PROMPTS[:2],
                "num_inference_steps": 4,
                "images_per_prompt": 2,
            },
        },
        absolute_paths=False,
    )


PRESETS: dict[str, Callable[[], ExperimentConfig]] = {"demo": demo, "tiny": tiny}


def get_preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise LdmError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
