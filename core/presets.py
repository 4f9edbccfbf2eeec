"""Presets: plain functions returning a complete, typed experiment config.

A YAML file can start from one with `preset: NAME` and override any key; `ldm config
--preset NAME` prints one in full. Each is built from the config's own section classes, so
a misspelt key or an impossible value fails when the preset is built, like a user's YAML.
"""

from __future__ import annotations

from collections.abc import Callable

from core.config import (
    AutoencoderConfig,
    ClusterConfig,
    DataConfig,
    DiffusionConfig,
    ExperimentConfig,
    PrecomputeConfig,
    RunConfig,
    SampleConfig,
    TextEncoderConfig,
    TrainConfig,
    UNetConfig,
)
from core.errors import LdmError

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
    return ExperimentConfig(
        run=RunConfig(name="demo", root="runs", seed=0),
        # The last shard (202 images) is held out for the FID-style evaluation.
        data=DataConfig(
            shards="data/emoji-shards", resolution=64, samples_per_shard=256, holdout_shards=1
        ),
        autoencoder=AutoencoderConfig(
            downsample_factor=4,
            block_out_channels=[32, 64, 64],
            num_steps=700,
            batch_size=16,
            learning_rate=4e-3,
            train_crop=32,
            num_holdout=64,
        ),
        # No GPU: decoding is cheap, so two encoders share the cores (see `make bench`).
        precompute=PrecomputeConfig(
            num_encoders=2, num_cpus_per_encoder=0.75, num_cpus_per_decoder=0.5
        ),
        unet=UNetConfig(block_out_channels=[32, 64, 128], cross_attention_levels=2),
        diffusion=DiffusionConfig(snr_gamma=5.0),
        train=TrainConfig(
            num_workers=2,
            num_steps=1000,
            global_batch_size=32,
            micro_batch_size=16,
            learning_rate=2e-3,
            warmup_steps=50,
            ema_decay=0.995,
            checkpoint_every=500,
            sample_every=500,
            eval_every=500,
            log_every=20,
        ),
        sample=SampleConfig(
            prompts=DEMO_PROMPTS, num_inference_steps=30, images_per_prompt=4, guidance_scale=6.0
        ),
    )


def tiny() -> ExperimentConfig:
    """CI-sized: every stage runs in seconds on the fixture shard."""
    return ExperimentConfig(
        run=RunConfig(name="tiny", root="runs", seed=0),
        data=DataConfig(shards="data/tiny-shards", resolution=32, samples_per_shard=16),
        autoencoder=AutoencoderConfig(
            downsample_factor=4,
            block_out_channels=[32, 32, 32],
            num_steps=20,
            batch_size=8,
            num_holdout=4,
            log_every=10,
        ),
        text_encoder=TextEncoderConfig(max_length=16),
        precompute=PrecomputeConfig(batch_size=16),
        unet=UNetConfig(
            block_out_channels=[32, 64], cross_attention_levels=1, num_attention_heads=2
        ),
        train=TrainConfig(
            num_workers=2,
            num_steps=6,
            global_batch_size=8,
            micro_batch_size=4,
            checkpoint_every=3,
            sample_every=6,
            log_every=2,
            num_loader_workers=1,
        ),
        sample=SampleConfig(prompts=DEMO_PROMPTS[:2], num_inference_steps=4, images_per_prompt=2),
    )


def _stable_diffusion(
    heads: int | list[int], context: int, text_encoder: str, linear: bool, prediction: str
) -> ExperimentConfig:
    """The Stable Diffusion family at 512 px: f=8 KL autoencoder, 4-level 320-wide UNet."""
    return ExperimentConfig(
        run=RunConfig(name="sd", root="runs", seed=0),
        data=DataConfig(shards="data/shards", resolution=512, samples_per_shard=1000),
        autoencoder=AutoencoderConfig(
            downsample_factor=8,
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            latent_channels=4,
        ),
        text_encoder=TextEncoderConfig(
            name_or_path=text_encoder,
            max_length=77,
            # The paper trains its text transformer with the UNet; SD's CLIP stays frozen.
            trainable=text_encoder == "ldmbert",
        ),
        unet=UNetConfig(
            block_out_channels=[320, 640, 1280, 1280],
            layers_per_block=2,
            num_attention_heads=heads,
            use_linear_projection=linear,
            cross_attention_levels=3,
            cross_attention_dim=context,
        ),
        diffusion=DiffusionConfig(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type=prediction,
        ),
        train=TrainConfig(
            num_workers=8,
            global_batch_size=2048,
            micro_batch_size=16,
            learning_rate=1e-4,
            precision="bf16",
            ema_decay=0.9999,
        ),
        cluster=ClusterConfig(use_gpu=True),
    )


def sd1() -> ExperimentConfig:
    """Stable Diffusion v1 (CompVis/runwayml): UNet 859,520,964 params, 8 heads, CLIP
    ViT-L/14 text encoder (768-d context, 123,060,480 params), epsilon prediction."""
    return _stable_diffusion(8, 768, "clip-vit-large-patch14", False, "epsilon")


def sd2_base() -> ExperimentConfig:
    """Stable Diffusion 2 base: 64-d heads ([5, 10, 20, 20]), linear projections, the
    OpenCLIP ViT-H/14 text tower (1024-d context, penultimate layer), v-prediction."""
    return _stable_diffusion([5, 10, 20, 20], 1024, "openclip-vit-h-14", True, "v_prediction")


def ldm_kl8_txt2img() -> ExperimentConfig:
    """The paper's LDM-KL-8-G text-to-image model at 256 px (Rombach et al. 2022, Tab. 2):
    f=8 KL autoencoder; UNet with 320 base channels, multipliers 1,2,4,4, 8 heads and 1280-d
    context (872,300,484 params, as CompVis' ldm-text2im-large-256); the 32-layer BERT-style
    text transformer (diffusers' LDMBertModel, 581,994,042 params) trained with it: 1.45 B."""
    config = _stable_diffusion(8, 1280, "ldmbert", False, "epsilon")
    config.run.name = "ldm-kl8"
    config.data.resolution = 256
    config.diffusion.beta_schedule = "linear"  # the paper's schedule
    return config


PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
    "ldm_kl8_txt2img": ldm_kl8_txt2img,
    "demo": demo,
    "tiny": tiny,
    "sd1": sd1,
    "sd2_base": sd2_base,
}


def get_preset(name: str) -> ExperimentConfig:
    """The preset called `name`; an `LdmError` naming the choices otherwise."""
    if name not in PRESETS:
        raise LdmError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
