"""Stage 1's end: evaluate held out against the bicubic baseline, set the latent
normalisation the way Stable Diffusion did, and publish the model folder atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from data_pipeline.images import to_model_range, to_uint8
from models.autoencoder import encode_latents
from models.feature_net import FeatureNet
from models.metrics import frechet_distance_few, psnr, ssim

SCALING_IMAGES = 512  # training images whose latents set the scaling factor
GRID_IMAGES = 8  # held-out images shown in the reconstruction grid


def reconstruction_metrics(
    originals: np.ndarray, reconstructions: np.ndarray, baseline: np.ndarray
) -> dict[str, float]:
    """PSNR, SSIM and an rFID-style distance of the reconstructions and of the bicubic
    baseline, each against the originals.

    The rFID-style score is the Frechet distance between EfficientNet-Lite0 features of the
    originals and of the reconstructions (`models.feature_net`; not Inception, so
    comparable only with itself, and biased upwards by the few held-out images: compare
    runs with the same `autoencoder.num_holdout`).
    """
    features = FeatureNet()
    real = features(originals)
    metrics = {}
    for suffix, images in (("", reconstructions), ("_bicubic", baseline)):
        metrics[f"psnr{suffix}"] = psnr(originals, images)
        metrics[f"ssim{suffix}"] = ssim(originals, images)
        metrics[f"rfd_efficientnet_lite0{suffix}"] = frechet_distance_few(real, features(images))
    return metrics


@torch.inference_mode()
@torch.inference_mode()
def reconstruct(vae: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Encode deterministically and decode (a VQModel quantises in decode): the round trip."""
    device = next(vae.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_range(images[start : start + batch_size]).to(device)
        out.append(to_uint8(vae.decode(encode_latents(vae, x)).sample))
    return np.concatenate(out)


def codebook_usage(vae: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> float:
    """Fraction of a VQModel's codebook that the images' latents use: a collapsed codebook
    (a few entries doing all the work) shows here before it shows in PSNR."""
    device = next(vae.parameters()).device
    used: set[int] = set()
    for start in range(0, len(images), batch_size):
        x = to_model_range(images[start : start + batch_size]).to(device)
        _, _, (_, _, indices) = vae.quantize(vae.encode(x).latents)
        used.update(indices.flatten().tolist())
    return len(used) / vae.config.num_vq_embeddings


@torch.inference_mode()
def latent_normalization(
    vae: torch.nn.Module, images: np.ndarray, generator: torch.Generator, batch_size: int = 64
) -> tuple[float, float]:
    """(shift, scale) = (mean, 1 / std) of the latents diffusion will be trained on.

    The diffusion model sees (z - shift) * scale: zero mean and unit variance, which the
    noise schedule assumes (a KL autoencoder trained briefly has a clear offset, and an
    offset latent is never fully destroyed by the forward process, so pure-noise sampling
    starts off the training distribution). For a KL autoencoder, posterior samples rather
    than means, because training draws samples from the cached moments; for a VQ one, its
    deterministic pre-quantisation latents, which is what its cache holds.
    """
    device = next(vae.parameters()).device
    pick = torch.randperm(len(images), generator=generator)[:SCALING_IMAGES].numpy()
    latents = []
    for start in range(0, len(pick), batch_size):
        x = to_model_range(images[np.sort(pick[start : start + batch_size])]).to(device)
        encoded = vae.encode(x)
        if hasattr(encoded, "latent_dist"):
            dist = encoded.latent_dist
            noise = torch.randn(dist.mean.shape, generator=generator).to(device)
            z = dist.mean + dist.std * noise
        else:
            z = encoded.latents
        latents.append(z.flatten().cpu())
    latents = torch.cat(latents)
    return float(latents.mean()), float(1.0 / latents.std())


def publish(vae: torch.nn.Module, metrics: dict[str, float], target: Path) -> None:
    """Save into a temp folder beside the target, then swap it in: never a half-written model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        vae.save_pretrained(staging, safe_serialization=True)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if target.exists():
            # A folder cannot be os.replace'd over a non-empty one: move the old one aside first.
            # In between, readers find no model (an error), never a mixture of two.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
