"""`ldm sample`: images from a committed checkpoint, written as PNG files.

Needs no DeepSpeed and no Ray: a tag holds its config, the UNet's config and its weights
(EMA and raw) as safetensors, so sampling works on any machine that has the autoencoder and
text encoder the run used.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image

from core.errors import LdmError
from core.layout import RunLayout
from core.loader import load_saved_config
from training.sampling import Sampler, image_size, load_model


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
    height: int | None = None,
    width: int | None = None,
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
    image_size(config, height, width)  # a size the model cannot make: refused before loading
    model = load_model(tag_dir, use_ema)
    out.mkdir(parents=True, exist_ok=True)
    batch = [p for p in prompts for _ in range(num_images)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sampler = Sampler(config, RunLayout.of(config).autoencoder_dir, device)
    images = sampler(
        model.to(device), batch, seed, num_steps, guidance_scale, negative_prompt, height, width
    )
    paths = []
    for i, (prompt, image) in enumerate(zip(batch, images, strict=True)):
        path = out / f"{_slug(prompt)}_{i % num_images:02d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths
