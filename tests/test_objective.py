"""The diffusion objective, pure: a fixed seed gives a fixed loss (golden values), and each
piece (the latent draw, caption dropout, Min-SNR weights, the empty prompt) does what it says.

The golden losses were computed by the objective as it was before it moved into its own
module (`training.loop.diffusion_loss` at commit 5a8c164), on a small fixed denoiser, so
this file also proves the move changed nothing.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from core.loader import build_config
from data_pipeline.cache import CacheBatch
from models.schedulers import build_noise_scheduler
from training.objective import diffusion_loss, draw_latents, empty_prompt, min_snr_weights

# name: (config overrides, snr_gamma, caption dropout) -> (loss, dropped captions)
GOLDEN = {
    "epsilon_dropout": (([], None, 0.5), (2.263118267059326, [True, True, False, False])),
    "epsilon_min_snr": (([], 5.0, 0.1), (2.294114828109741, [False, True, False, False])),
    "v_zero_snr_min_snr": (
        (
            ["diffusion.prediction_type=v_prediction", "diffusion.rescale_zero_terminal_snr=true"],
            5.0,
            0.0,
        ),
        (0.4165949821472168, [False, False, False, False]),
    ),
    "cosine_schedule": (
        (["diffusion.beta_schedule=squaredcos_cap_v2"], None, 0.25),
        (2.286287546157837, [False, True, False, False]),
    ),
}


class TinyDenoiser(nn.Module):
    """Called like the UNet: a convolution of the noisy latent, the mean of the real tokens'
    context, and the timestep, so every input of the objective reaches the loss."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.proj = nn.Linear(8, 4)

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask):
        mask = encoder_attention_mask.to(sample.dtype)
        pooled = (encoder_hidden_states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(
            min=1
        )
        out = (
            self.conv(sample)
            + self.proj(pooled)[:, :, None, None]
            + timestep.to(sample.dtype)[:, None, None, None] / 1000
        )
        return SimpleNamespace(sample=out)


def _model() -> TinyDenoiser:
    torch.manual_seed(0)
    return TinyDenoiser()


def _batch() -> CacheBatch:
    g = torch.Generator().manual_seed(7)
    lengths = torch.tensor([6, 3, 1, 4])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    return CacheBatch(
        moments=torch.randn(4, 2, 8, 8, 8, generator=g),  # two views, mean and log-variance
        context=torch.randn(4, 6, 8, generator=g) * mask[..., None],
        mask=mask,
    )


def _empty() -> tuple[torch.Tensor, torch.Tensor]:
    context, mask = torch.zeros(6, 8), torch.zeros(6, dtype=torch.bool)
    mask[0] = True
    return context, mask


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_fixed_seed_gives_the_golden_loss(name):
    (overrides, snr_gamma, dropout), (expected_loss, expected_dropped) = GOLDEN[name]
    config = build_config({"preset": "tiny"}, overrides, absolute_paths=False)
    scheduler = build_noise_scheduler(config)
    model, batch = _model(), _batch()
    torch.manual_seed(123)  # after building the model, whose init reseeds
    loss, dropped = diffusion_loss(
        model, batch, scheduler, (0.25, 0.5), _empty(), dropout, snr_gamma
    )
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert dropped.tolist() == expected_dropped


def test_the_loss_depends_only_on_the_seed():
    config = build_config({"preset": "tiny"}, absolute_paths=False)
    scheduler = build_noise_scheduler(config)
    model, batch, losses = _model(), _batch(), []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        losses.append(diffusion_loss(model, batch, scheduler, (0.0, 1.0), _empty(), 0.1)[0])
    assert losses[0].item() == losses[1].item() != losses[2].item()


def test_latents_are_drawn_from_the_posterior_of_a_random_view():
    batch = _batch()
    torch.manual_seed(0)
    drawn = torch.stack([draw_latents(batch) for _ in range(400)])
    views = batch.moments[:, :, :4]  # the posterior means of the image and its mirror
    # Each draw is near one of the two views' means, and both views are picked.
    nearest = (drawn[:, :, None] - views[None]).pow(2).mean(dim=(3, 4, 5)).argmin(dim=2)
    assert set(nearest.flatten().tolist()) == {0, 1}
    means_only = CacheBatch(batch.moments[:, :, :4], batch.context, batch.mask, has_logvar=False)
    assert draw_latents(means_only).shape == (4, 4, 8, 8)


def test_min_snr_weights_cap_easy_timesteps():
    config = build_config({"preset": "tiny"}, absolute_paths=False)
    scheduler = build_noise_scheduler(config)
    t = torch.tensor([0, 500, 999])
    weights = min_snr_weights(scheduler, t, 5.0)
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    assert weights[0] == pytest.approx(5.0 / snr[0].item())  # low noise: capped at gamma
    assert weights[2] == pytest.approx(1.0)  # high noise: SNR < gamma, weight 1


def test_empty_prompt_is_padded_like_a_batch_row():
    hidden = np.arange(6, dtype=np.float16).reshape(2, 3)
    context, mask = empty_prompt(hidden, 4)
    assert context.shape == (4, 3) and context.dtype == torch.float32
    assert mask.tolist() == [True, True, False, False] and context[2:].abs().sum() == 0
    ids, mask = empty_prompt(np.array([101, 102], dtype=np.int32), 4)
    assert ids.dtype == torch.int64 and ids.tolist() == [101, 102, 0, 0]
