"""The cross-attention UNet of the paper (diffusers `UNet2DConditionModel`) sized by the
config, with its memory switches, and the denoiser training optimises: the UNet, or the UNet
and a text encoder trained with it as one module.

Only model code lives here: nothing knows about Ray, DeepSpeed or the data pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from core.config import ExperimentConfig
from models.text_encoders import build_trainable_text_encoder, text_hidden_size, text_model

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


def build_unet(config: ExperimentConfig, latent_channels: int) -> UNet2DConditionModel:
    """The cross-attention UNet of the paper, sized by the config."""
    from diffusers import UNet2DConditionModel

    u = config.unet
    levels = len(u.block_out_channels)
    attn = [i < u.cross_attention_levels for i in range(levels)]
    unet = UNet2DConditionModel(
        sample_size=config.data.resolution // config.autoencoder.downsample_factor,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        attention_head_dim=u.num_attention_heads
        if isinstance(u.num_attention_heads, int)
        else tuple(u.num_attention_heads),
        use_linear_projection=u.use_linear_projection,
        cross_attention_dim=u.cross_attention_dim or text_hidden_size(config),
    )
    apply_memory_options(unet, config)
    return unet


def apply_memory_options(unet: UNet2DConditionModel, config: ExperimentConfig) -> None:
    """The training-time switches that trade memory for speed; none changes the weights."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    t = config.train
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.set_attn_processor(AttnProcessor2_0() if t.attention == "sdpa" else AttnProcessor())


class TextConditionedUNet(torch.nn.Module):
    """The UNet and a text encoder trained with it, as one module: one DeepSpeed engine then
    shards both's optimizer state and reduces both's gradients.

    Called like the UNet, except that `encoder_hidden_states` are token ids: the encoder's
    hidden states are computed inside, masked exactly as the frozen encoder's are cached.
    """

    def __init__(self, unet: UNet2DConditionModel, text_encoder: torch.nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask):
        mask = encoder_attention_mask
        hidden = self.text_encoder(
            input_ids=encoder_hidden_states, attention_mask=mask.long(), return_dict=True
        ).last_hidden_state
        hidden = hidden * mask[..., None].to(hidden.dtype)
        return self.unet(
            sample, timestep, encoder_hidden_states=hidden, encoder_attention_mask=mask
        )


def build_denoiser(
    config: ExperimentConfig, latent_channels: int
) -> UNet2DConditionModel | TextConditionedUNet:
    """What training optimises: the UNet, or the UNet with its jointly trained text encoder."""
    unet = build_unet(config, latent_channels)
    if not config.text_encoder.trainable:
        return unet
    return TextConditionedUNet(unet, build_trainable_text_encoder(config))


def unet_of(model: torch.nn.Module) -> UNet2DConditionModel:
    return model.unet if isinstance(model, TextConditionedUNet) else model


def parts(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules a checkpoint stores separately, by file prefix."""
    if isinstance(model, TextConditionedUNet):
        return {"unet": model.unet, "text_encoder": model.text_encoder}
    return {"unet": model}


def split_by_part(model: torch.nn.Module, tensors: dict) -> dict[str, dict]:
    """A state dict of `model` (parameter names as `model` has them) cut into `parts`."""
    if not isinstance(model, TextConditionedUNet):
        return {"unet": dict(tensors)}
    out: dict[str, dict] = {name: {} for name in parts(model)}
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        out[part][rest] = value
    return out


def empty_like(model: torch.nn.Module) -> torch.nn.Module:
    """A model of the same architecture (fresh weights), e.g. to load EMA weights into."""
    if isinstance(model, TextConditionedUNet):
        encoder = text_model(model.text_encoder.config)
        return TextConditionedUNet(empty_like(model.unet), encoder)
    return type(model).from_config(model.config)
