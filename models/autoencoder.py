"""The stage-1 autoencoders (diffusers `AutoencoderKL` and `VQModel`, or a pretrained
`AutoencoderTiny`): built from the config, loaded from a folder, and the operations every
stage applies to them (deterministic encoding, folding a latent shift into the weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from core import storage
from core.config import ExperimentConfig
from core.errors import LdmError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, AutoencoderTiny, VQModel


def build_autoencoder(config: ExperimentConfig) -> AutoencoderKL | VQModel:
    """A fresh stage-1 autoencoder with downsampling factor f from the config: an
    `AutoencoderKL`, or a `VQModel` with `autoencoder.regularization=vq`."""
    from diffusers import AutoencoderKL, VQModel

    ae = config.autoencoder
    levels = len(ae.block_out_channels)
    shape = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(ae.block_out_channels),
        layers_per_block=ae.layers_per_block,
        latent_channels=ae.latent_channels,
        norm_num_groups=min(32, min(ae.block_out_channels)),
        sample_size=config.data.resolution,
    )
    if ae.regularization == "vq":
        # The codebook vectors have the latent's width (vq_embed_dim unset), so the latents
        # diffusion sees are the encoder's output before quantisation, as in the paper.
        return VQModel(**shape, num_vq_embeddings=ae.num_vq_embeddings)
    return AutoencoderKL(**shape)


def autoencoder_config(folder: str | Path) -> dict:
    """A diffusers autoencoder folder's (or object-store prefix's) config.json, read without
    loading any weights."""
    config_file = storage.join(folder, "config.json")
    if not storage.exists(config_file):
        raise LdmError(
            f"no autoencoder at {folder}: run `ldm autoencoder CONFIG` first, or set "
            "autoencoder.pretrained to a diffusers AutoencoderKL, VQModel or AutoencoderTiny "
            "folder (a path, or an object-store URI)"
        )
    return json.loads(storage.read_bytes(config_file))


def load_autoencoder(folder: str | Path) -> AutoencoderKL | VQModel | AutoencoderTiny:
    """A trained or pretrained diffusers autoencoder folder (or object-store prefix, copied to
    this machine once), frozen, in eval mode.

    A VQModel's `decode` quantises its input (the paper's VQ-regularised decoder), so code
    that decodes latents works with either kind; its `encode` gives `.latents`, not a
    `.latent_dist`.
    """
    from diffusers import AutoencoderKL, AutoencoderTiny, VQModel

    class_name = autoencoder_config(folder).get("_class_name", "AutoencoderKL")
    cls = {"AutoencoderTiny": AutoencoderTiny, "VQModel": VQModel}.get(class_name, AutoencoderKL)
    return cls.from_pretrained(storage.local_folder(folder)).eval().requires_grad_(False)


def encode_latents(vae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The deterministic latent of `x`: a KL posterior's mean, or a VQModel's (or
    AutoencoderTiny's) encoder output, before quantisation."""
    encoded = vae.encode(x)
    dist = getattr(encoded, "latent_dist", None)
    return dist.mode() if dist is not None else encoded.latents


@torch.no_grad()
def fold_vq_shift(vae: torch.nn.Module, shift: float) -> None:
    """Make a VQModel encode to `z - shift` and decode exactly as before.

    diffusers' VQModel has no `shift_factor` setting, so the latent offset goes into the
    weights: the encoder's 1x1 `quant_conv` subtracts it, the codebook moves with it (the
    nearest entry to z - shift among e - shift is the nearest to z among e, so the same
    codes are picked) and `post_quant_conv` adds it back. The published model's latents are
    then zero-mean by construction, for every consumer (precompute, sampling, diffusers).
    """
    vae.quant_conv.bias -= shift
    vae.quantize.embedding.weight -= shift
    post = vae.post_quant_conv
    post.bias += shift * post.weight.sum(dim=(1, 2, 3))


def fold_latent_shift(vae: torch.nn.Module) -> torch.nn.Module:
    """Make `vae` encode to `z - shift` and decode `z'` as the original decodes `z' + shift`."""
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    if shift == 0.0:
        return vae
    quant, post_quant = getattr(vae, "quant_conv", None), getattr(vae, "post_quant_conv", None)
    if quant is None or post_quant is None:
        raise LdmError(
            f"autoencoder {type(vae).__name__} has shift_factor={shift} but no 1x1 quant_conv "
            "and post_quant_conv to fold it into; StableDiffusionPipeline would decode it wrong"
        )
    channels = vae.config.latent_channels
    with torch.no_grad():
        quant.bias[:channels] -= shift  # the first half of the moments is the posterior mean
        post_quant.bias += shift * post_quant.weight.sum(dim=(1, 2, 3))
    vae.register_to_config(shift_factor=0.0)
    return vae
