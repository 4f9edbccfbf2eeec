"""Text-to-image sampling: a diffusers sampler (DDIM, PNDM, DPM-Solver++) with
classifier-free guidance and a negative prompt, decoded by the autoencoder.

Used for the sample grids logged during training and by `ldm sample`. Prompts are encoded by
the same frozen text encoder the cache was built with, padded with an attention mask just
as in training; with a text encoder trained jointly, they are only tokenized, and the model
(`models.unet.TextConditionedUNet`) encodes them with its own encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from core.config import ExperimentConfig, size_unit
from core.errors import LdmError
from data_pipeline.images import to_uint8
from models.autoencoder import load_autoencoder
from models.schedulers import build_sampling_scheduler
from models.text_encoders import load_text_encoder, load_tokenizer, text_model_from_config
from models.unet import TextConditionedUNet
from training.checkpoint import CONFIG_FILE, EMA_FILE, RAW_FILE, verify


class PromptEncoder:
    """Prompts -> (hidden states, mask) padded to the training length; (token ids, mask) when
    the text encoder is trained jointly and so lives inside the model being sampled."""

    def __init__(self, config: ExperimentConfig, device: torch.device | None = None):
        te = config.text_encoder
        self.device = device or torch.device("cpu")
        self.model = None
        if te.trainable:
            self.tokenizer = load_tokenizer(te.name_or_path)
        else:
            self.model, self.tokenizer = load_text_encoder(te.name_or_path)
            self.model.to(self.device)
        self.max_length = te.max_length

    @torch.inference_mode()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            prompts,
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        mask = tokens["attention_mask"].bool()
        if self.model is None:
            return tokens["input_ids"], mask
        hidden = self.model(**tokens).last_hidden_state
        return hidden * mask[..., None], mask


def image_size(
    config: ExperimentConfig, height: int | None = None, width: int | None = None
) -> tuple[int, int]:
    """(height, width) of sampled images: the arguments, else `sample.height`/`width`, else
    `data.resolution`; refused in one line when the model cannot make that size."""
    s, resolution = config.sample, config.data.resolution
    height = height or s.height or resolution
    width = width or s.width or resolution
    unit = size_unit(config)
    for name, side in (("height", height), ("width", width)):
        if side < unit or side % unit:
            raise LdmError(
                f"--{name} {side}: the model makes sizes in multiples of {unit} px "
                f"(autoencoder factor x UNet downsampling); try {max(unit, side // unit * unit)}"
            )
    return height, width


class Sampler:
    """Everything needed to turn prompts into images with a given UNet."""

    def __init__(
        self,
        config: ExperimentConfig,
        autoencoder_dir: str | Path,
        device: torch.device | None = None,
    ):
        """`device`: where the encoders and the UNet passed in run (default the CPU)."""
        self.config = config
        self.device = device or torch.device("cpu")
        self.encode = PromptEncoder(config, self.device)
        self.vae = load_autoencoder(autoencoder_dir).to(self.device)
        self.scheduler = build_sampling_scheduler(config)

    @torch.inference_mode()
    def __call__(
        self,
        unet: UNet2DConditionModel | TextConditionedUNet,
        prompts: list[str],
        seed: int,
        num_steps: int,
        guidance_scale: float,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> np.ndarray:
        """uint8 images (N, H, W, 3), one per prompt, with noise fixed by `seed`; the
        negative prompt and size default to the config's (`sample.negative_prompt`,
        `sample.height`/`width`, else `data.resolution`)."""
        if negative_prompt is None:
            negative_prompt = self.config.sample.negative_prompt
        rescale = self.config.sample.guidance_rescale
        unet.eval()
        context, mask = self.encode(prompts)
        neg_context, neg_mask = self.encode([negative_prompt] * len(prompts))
        height, width = image_size(self.config, height, width)
        factor = self.config.autoencoder.downsample_factor
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn(  # drawn on the CPU: the same images on any device
            len(prompts),
            self.vae.config.latent_channels,
            height // factor,
            width // factor,
            generator=generator,
        ).to(self.device)
        self.scheduler.set_timesteps(num_steps)
        latents = latents * self.scheduler.init_noise_sigma
        guided = guidance_scale != 1.0
        for t in self.scheduler.timesteps:
            model_input = self.scheduler.scale_model_input(latents, t)
            if guided:
                pred = unet(
                    torch.cat([model_input, model_input]),
                    t,
                    encoder_hidden_states=torch.cat([neg_context, context]),
                    encoder_attention_mask=torch.cat([neg_mask, mask]),
                ).sample
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
                if rescale > 0:
                    # Imported here: the pipeline module pulls in transformers' image
                    # processors, seconds that every sample grid would otherwise pay.
                    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (  # noqa: PLC0415
                        rescale_noise_cfg,
                    )

                    pred = rescale_noise_cfg(pred, cond, guidance_rescale=rescale)
            else:
                pred = unet(
                    model_input, t, encoder_hidden_states=context, encoder_attention_mask=mask
                ).sample
            latents = self.scheduler.step(pred, t, latents).prev_sample
        vae = self.vae.config
        latents = latents / vae.scaling_factor + (getattr(vae, "shift_factor", None) or 0.0)
        # A VQModel quantises here (its decode snaps the sampled continuous latents to the
        # codebook, as the paper's VQ-regularised decoder does); a KL decoder takes them as is.
        images = self.vae.decode(latents).sample
        return to_uint8(images.cpu())


def grid(images: np.ndarray, num_columns: int) -> np.ndarray:
    """Tile (N, H, W, 3) images into one (rows*H, cols*W, 3) image, row-major."""
    n, h, w, c = images.shape
    rows = -(-n // num_columns)
    canvas = np.full((rows * h, num_columns * w, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, num_columns)
        canvas[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return canvas


def prompt_grid(
    sampler: Sampler, unet: UNet2DConditionModel | TextConditionedUNet, config: ExperimentConfig
) -> np.ndarray:
    """The fixed grid logged during training: one row per prompt, fixed seeds."""
    s = config.sample
    prompts = [p for p in s.prompts for _ in range(s.images_per_prompt)]
    images = sampler(unet, prompts, s.seed, s.num_inference_steps, s.guidance_scale)
    return grid(images, s.images_per_prompt)


def load_model(tag_dir: Path, use_ema: bool = True) -> torch.nn.Module:
    """The model of a committed tag, with EMA (default) or raw weights: the UNet, or the UNet
    with the text encoder trained jointly with it (`models.TextConditionedUNet`)."""
    verify(tag_dir)
    weights = EMA_FILE if use_ema else RAW_FILE
    unet = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(str(tag_dir / CONFIG_FILE.format("unet")))
    )
    _load_weights(unet, tag_dir / weights.format("unet"), tag_dir)
    encoder_config = tag_dir / CONFIG_FILE.format("text_encoder")
    if not encoder_config.is_file():  # a frozen text encoder: not part of the checkpoint
        return unet.eval()
    encoder = text_model_from_config(json.loads(encoder_config.read_text()))
    _load_weights(encoder, tag_dir / weights.format("text_encoder"), tag_dir)
    return TextConditionedUNet(unet, encoder).eval()


def _load_weights(module: torch.nn.Module, file: Path, tag_dir: Path) -> None:
    missing, unexpected = module.load_state_dict(load_file(file), strict=False)
    # Buffers a module rebuilds itself (position ids, batch-norm counters) may be absent.
    buffers = {name for name, _ in module.named_buffers()}
    if unexpected or [m for m in missing if m not in buffers]:
        raise LdmError(f"checkpoint {tag_dir}: {file.name} does not match the model's config")
