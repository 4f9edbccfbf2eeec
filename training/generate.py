"""`ldm sample`: images from a committed checkpoint, written as PNG files.

Needs no DeepSpeed and no Ray: a tag holds its config, the UNet's config and its weights
(EMA and raw) as safetensors, so sampling works on any machine that has the autoencoder and
text encoder the run used.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from orchestrator.config import load_saved_config
from orchestrator.errors import LdmError
from training import checkpoint as ckpt
from training.loop import CONFIG_FILE, EMA_FILE, RAW_FILE, UNET_CONFIG
from training.models import TextConditionedUNet, text_model_from_config
from training.sampling import Sampler


def load_model(tag_dir: Path, use_ema: bool = True) -> torch.nn.Module:
    """The model of a committed tag, with EMA (default) or raw weights: the UNet, or the UNet
    with the text encoder trained jointly with it (`models.TextConditionedUNet`)."""
    ckpt.verify(tag_dir)
    weights = EMA_FILE if use_ema else RAW_FILE
    unet = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(str(tag_dir / UNET_CONFIG))
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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def sample_from_checkpoint(
    tag_dir: Path,
    prompts: list[str],
    out: Path,
    num_images: int = 4,
    seed: int = 0,
    num_steps: int = 50,
    guidance_scale: float = 4.0,
    negative_prompt: str | None = None,
    use_ema: bool = True,
    sampler: str | None = None,
) -> list[Path]:
    """Write `num_images` PNGs per prompt into `out`; returns their paths. The sampler and
    negative prompt default to the run's config (`sample.sampler`, `sample.negative_prompt`)."""
    tag_dir = Path(tag_dir)
    if not (tag_dir / "config.yaml").is_file():
        raise LdmError(
            f"{tag_dir} is not a checkpoint tag (no config.yaml); "
            "pass e.g. runs/demo/checkpoints/step_00001500"
        )
    config = load_saved_config(tag_dir, [f"sample.sampler={sampler}"] if sampler else [])
    model = load_model(tag_dir, use_ema)
    out.mkdir(parents=True, exist_ok=True)
    batch = [p for p in prompts for _ in range(num_images)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sampler = Sampler(config, device)
    images = sampler(model.to(device), batch, seed, num_steps, guidance_scale, negative_prompt)
    paths = []
    for i, (prompt, image) in enumerate(zip(batch, images, strict=True)):
        path = out / f"{_slug(prompt)}_{i % num_images:02d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths
