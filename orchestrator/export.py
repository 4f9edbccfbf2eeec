"""`ldm export`: a committed checkpoint as a diffusers StableDiffusionPipeline folder.

The folder (unet, vae, text encoder, tokenizer, scheduler, `model_index.json`, safetensors
only) loads with `StableDiffusionPipeline.from_pretrained` offline, without this project.
Two things that pipeline does differently from training are adapted here:

- it decodes `latents / scaling_factor` and ignores `shift_factor`, while training uses
  `(z - shift) * scale`: the shift is folded into the autoencoder's 1x1 `quant_conv` (encode
  gives `z - shift`) and `post_quant_conv` (decode adds it back), exactly, so the exported
  autoencoder has zero-mean latents and `shift_factor=0`;
- it pads every prompt to `tokenizer.model_max_length` and gives the UNet no attention mask.
  The text encoder gets the mask (`use_attention_mask`), so real tokens' hidden states equal
  training's, and the padding length is the training one; but the UNet still attends to the
  padding positions, which training masked out. No config setting removes that, so the
  export is close to `ldm sample`, not identical (see the README written into the folder).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from core.errors import LdmError
from core.layout import RunLayout
from core.loader import load_saved_config
from models.autoencoder import autoencoder_config, fold_latent_shift, load_autoencoder
from models.schedulers import build_sampling_scheduler
from models.text_encoders import load_text_encoder, load_tokenizer
from models.unet import parts
from training.checkpoint import TRAIN_STATE
from training.sampling import load_model

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _readme(tag_dir: Path, config, use_ema: bool, step: int, text_encoder: str) -> str:
    s, res = config.sample, config.data.resolution
    trained = (
        f"trained jointly with the UNet, {'EMA' if use_ema else 'raw'} weights"
        if config.text_encoder.trainable
        else "frozen, as pretrained"
    )
    return f"""# {config.run.name} — text-to-image latent diffusion model (diffusers format)

Exported by `ldm export` from checkpoint `{tag_dir.name}` (training step {step}),
{"EMA" if use_ema else "raw (non-EMA)"} UNet weights, {res}x{res} px images. Text encoder:
`{config.text_encoder.name_or_path}` ({text_encoder}; {trained}; per-token hidden states,
prompts padded to {config.text_encoder.max_length} tokens). Scheduler: DDIM over the training
noise schedule (prediction type `{config.diffusion.prediction_type}`). Weights are safetensors
only.

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("path/to/this/folder")
image = pipe(
    "{s.prompts[0]}",
    num_inference_steps={s.num_inference_steps},
    guidance_scale={s.guidance_scale},
    generator=torch.Generator().manual_seed(0),
).images[0]
image.save("sample.png")
```

The autoencoder's latent shift is folded into its weights (`shift_factor` is 0 here), so the
plain `latents / scaling_factor` decode is exact. Training masked the prompt's padding tokens
out of the UNet's cross-attention; StableDiffusionPipeline passes no such mask, so its
images are close to, not identical with, `ldm sample` for the same seed. If loading logs that
the pipeline expected a CLIPTextModel: any transformers text encoder works in its place.
"""


def export_pipeline(
    tag_dir: Path, out: Path, use_ema: bool = True, overwrite: bool = False
) -> Path:
    """Write the checkpoint `tag_dir` as a diffusers pipeline folder `out`, atomically."""
    tag_dir, out = Path(tag_dir), Path(out)
    if out.is_file():
        raise LdmError(f"{out} is a file; pass a folder to write the pipeline into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LdmError(f"{out} exists and is not empty; pass --overwrite or pick a new folder")
    if not (tag_dir / "config.yaml").is_file():
        raise LdmError(
            f"{tag_dir} is not a checkpoint tag (no config.yaml); "
            "pass e.g. runs/demo/checkpoints/step_00001500"
        )
    model = parts(load_model(tag_dir, use_ema))  # verifies every file's sha256 first
    config = load_saved_config(tag_dir)
    autoencoder_dir = RunLayout.of(config).autoencoder_dir
    if autoencoder_config(autoencoder_dir).get("_class_name") == "VQModel":
        raise LdmError(
            f"cannot export: the autoencoder {autoencoder_dir} is a VQModel "
            "(autoencoder.regularization=vq), which diffusers' StableDiffusionPipeline cannot "
            "hold (it decodes with AutoencoderKL's arguments); sample with `ldm sample` instead"
        )
    # Imported only now: diffusers' pipelines take seconds to import and log transformers
    # warnings, which would bury the one-line errors above.
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    step = json.loads((tag_dir / TRAIN_STATE).read_text())["step"]
    if "text_encoder" in model:  # trained with the UNet: the checkpoint's (EMA) weights
        text_encoder = model["text_encoder"]
        tokenizer = load_tokenizer(config.text_encoder.name_or_path)
    else:
        text_encoder, tokenizer = load_text_encoder(config.text_encoder.name_or_path)
    # The pipeline pads to model_max_length and hands the text encoder the padding mask only
    # when use_attention_mask is set: then real tokens' hidden states equal training's.
    text_encoder.config.use_attention_mask = True
    tokenizer.model_max_length = config.text_encoder.max_length
    # StableDiffusionPipeline rewrites steps_offset to 1 on load anyway; say so up front.
    scheduler = DDIMScheduler.from_config(build_sampling_scheduler(config).config, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=fold_latent_shift(load_autoencoder(autoencoder_dir)),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=model["unet"],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp, old = (out.with_name(f".{out.name}.{kind}{os.getpid()}") for kind in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(
            _readme(tag_dir, config, use_ema, step, type(text_encoder).__name__)
        )
        pickled = [p.name for p in tmp.rglob("*") if p.suffix in _PICKLE_SUFFIXES]
        if pickled:
            raise RuntimeError(f"export wrote pickle files {pickled}; expected safetensors only")
        if out.exists():  # empty, or --overwrite: swap, so OUT is never half-written
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return out
