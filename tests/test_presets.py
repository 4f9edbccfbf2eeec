"""Presets build at their published sizes: every model on the meta device, no memory used."""

import pytest
import torch

from core.presets import PRESETS, get_preset
from models.autoencoder import build_autoencoder
from models.text_encoders import build_text_encoder_meta
from models.unet import build_unet

# Published parameter counts: the diffusers/transformers checkpoints of each model.
PUBLISHED = {
    "sd1": {"unet": 859_520_964, "autoencoder": 83_653_863, "text_encoder": 123_060_480},
    "sd2_base": {"unet": 865_910_724, "autoencoder": 83_653_863, "text_encoder": 340_387_840},
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_stable_diffusion_presets_match_published_parameter_counts(name):
    config = get_preset(name)
    with torch.device("meta"):
        unet = build_unet(config, latent_channels=config.autoencoder.latent_channels)
        autoencoder = build_autoencoder(config)
    text = build_text_encoder_meta(config.text_encoder)
    assert next(unet.parameters()).device.type == "meta"
    sizes = {"unet": count(unet), "autoencoder": count(autoencoder), "text_encoder": count(text)}
    assert sizes == PUBLISHED[name]
    assert unet.config.cross_attention_dim == text.config.hidden_size


def test_the_papers_text_to_image_model_is_1_45_billion_parameters():
    config = get_preset("ldm_kl8_txt2img")
    with torch.device("meta"):
        unet = build_unet(config, latent_channels=config.autoencoder.latent_channels)
    text = build_text_encoder_meta(config.text_encoder)
    assert count(unet) == 872_300_484  # CompVis/ldm-text2im-large-256's UNet
    assert len(text.model.layers if hasattr(text, "model") else text.encoder.layers) == 32
    assert abs(count(unet) + count(text) - 1.45e9) / 1.45e9 < 0.02  # the paper's 1.45 B
    assert unet.config.cross_attention_dim == text.config.d_model == 1280
    assert config.autoencoder.downsample_factor == 8 and config.data.resolution == 256


def test_sd2_base_is_v_prediction_with_64_dim_heads():
    config = get_preset("sd2_base")
    assert config.diffusion.prediction_type == "v_prediction"
    widths, heads = config.unet.block_out_channels, config.unet.num_attention_heads
    assert [w // h for w, h in zip(widths, heads, strict=True)] == [64, 64, 64, 64]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_builds(name):
    config = get_preset(name)
    with torch.device("meta"):
        unet = build_unet(config, latent_channels=config.autoencoder.latent_channels)
    latent = config.data.resolution // config.autoencoder.downsample_factor
    assert unet.config.sample_size == latent
