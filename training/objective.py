"""The diffusion objective, pure: a cached batch and a UNet in, the training loss out.

Every random draw (the latent from q(z|x) and the mirrored view, the noise, the timesteps,
which captions become the empty prompt) is made on the CPU with torch's global generator,
which the checkpoint saves per rank: a run resumes exactly and draws the same numbers on
any device. Nothing here reads files, logs or talks to other ranks.
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.cache import CacheBatch


def draw_latents(batch: CacheBatch) -> torch.Tensor:
    """One latent per sample: a random cached view (image or mirror), then a draw from q(z|x)."""
    b, num_views = batch.moments.shape[:2]
    chosen = batch.moments[torch.arange(b), torch.randint(0, num_views, (b,))]
    if not batch.has_logvar:
        return chosen
    mean, logvar = chosen.chunk(2, dim=1)
    return mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)


def drop_captions(
    batch: CacheBatch, empty: tuple[torch.Tensor, torch.Tensor], probability: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classifier-free guidance training: each caption becomes the empty prompt with
    `probability`. Returns (context, mask, dropped)."""
    dropped = torch.rand(batch.mask.shape[0]) < probability
    spread = dropped.view(-1, *[1] * (batch.context.dim() - 1))
    context = torch.where(spread, empty[0], batch.context)
    mask = torch.where(dropped[:, None], empty[1], batch.mask)
    return context, mask, dropped


def diffusion_loss(
    model: torch.nn.Module,
    batch: CacheBatch,
    scheduler,
    latent_norm: tuple[float, float],
    empty: tuple[torch.Tensor, torch.Tensor],
    caption_dropout: float,
    snr_gamma: float | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDPM objective on a cached batch: a fresh latent draw, noise, and CFG dropout.

    `latent_norm` is the autoencoder's (shift, scale); `snr_gamma` turns on Min-SNR-gamma
    loss weighting (Hang et al., 2023), which stops the many easy low-noise steps from
    dominating the gradient and converges several times faster. Returns the loss and which
    captions were dropped.
    """
    # Every random draw is made on the CPU, with the generator the checkpoint saves, then
    # moved: a run resumes exactly, and draws the same numbers on any device.
    shift, scale = latent_norm
    latents = (draw_latents(batch) - shift) * scale
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
    noisy = scheduler.add_noise(latents, noise, t)
    context, mask, dropped = drop_captions(batch, empty, caption_dropout)
    epsilon = scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else scheduler.get_velocity(latents, noise, t)
    weight = None if snr_gamma is None else min_snr_weights(scheduler, t, snr_gamma)

    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    layout = torch.channels_last if channels_last else torch.contiguous_format
    # Token ids (a text encoder trained inside `model`) stay integers.
    context_dtype = dtype if context.is_floating_point() else None
    pred = model(
        noisy.to(device, dtype, non_blocking=True, memory_format=layout),
        t.to(device, non_blocking=True),
        encoder_hidden_states=context.to(device=device, dtype=context_dtype, non_blocking=True),
        encoder_attention_mask=mask.to(device, non_blocking=True),
    ).sample
    target = target.to(device, non_blocking=True)
    per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
    if weight is not None:
        per_sample = per_sample * weight.to(device, non_blocking=True)
    return per_sample.mean(), dropped


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023) of timesteps `t`: min(SNR, gamma) over
    SNR for epsilon prediction, over SNR + 1 for v-prediction (whose target is scaled so)."""
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    epsilon = scheduler.config.prediction_type == "epsilon"
    return snr.clamp(max=gamma) / (snr if epsilon else snr + 1)


def empty_prompt(stored: np.ndarray, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt's stored encoding (hidden states, or token ids), padded like a batch
    row: (context, mask)."""
    token_ids = stored.ndim == 1
    hidden = torch.from_numpy(stored.astype(np.int64 if token_ids else np.float32))
    context = torch.zeros(max_length, *hidden.shape[1:], dtype=hidden.dtype)
    n = min(len(hidden), max_length)
    context[:n] = hidden[:n]
    mask = torch.zeros(max_length, dtype=torch.bool)
    mask[:n] = True
    return context, mask
