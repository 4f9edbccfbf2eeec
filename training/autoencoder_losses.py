"""Stage 1's training step, as the paper's menu of losses: a pixel loss (MSE by default,
or the paper's L1), LPIPS when its weights are on disk, the KL or VQ regulariser, and a
PatchGAN discriminator (`models.discriminator`) with the paper's adaptive weight. The
autoencoder's loss and the discriminator's loss are each the module of a DeepSpeed engine;
`AdversarialStep` updates one, then the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.config import ExperimentConfig
from data_pipeline.image_set import train_crop
from models.discriminator import adaptive_weight, generator_loss, hinge_d_loss
from models.perceptual import LPIPS, missing_files

WARMUP_STEPS = 20


def lr_factor(num_steps: int):
    """The learning-rate multiplier by step: a short linear warmup, then cosine decay."""
    # A short linear warmup, then cosine decay to zero: measured +0.9 dB held out over a
    # constant rate in a 900-step demo run, where the last steps at a low rate settle the
    # reconstructions.
    warmup = max(1, min(WARMUP_STEPS, num_steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, num_steps - warmup)))

    return factor


@dataclass
class Critics:
    """What judges the autoencoder's output without being trained by its optimizer: the
    frozen LPIPS network, and the discriminator (trained by its own engine)."""

    lpips: torch.nn.Module | None
    disc: torch.nn.Module | None


class AutoencoderLoss(torch.nn.Module):
    """The autoencoder's whole loss as the module its DeepSpeed engine runs: pixel,
    perceptual, KL or VQ, and the adversarial term with its adaptive weight.

    The adaptive weight takes gradients at the decoder's last layer (`torch.autograd.grad`)
    in the middle of the step. It is computed inside `forward` because the engine hooks the
    tensors its forward returns: a backward pass through those outside `engine.backward`
    is refused at ZeRO-0 and would start ZeRO-1/2's gradient reduction. Inside, it is a
    plain autograd graph (ZeRO-1/2's per-parameter hooks fire on gradient accumulation,
    which `autograd.grad` does not do), and each rank weighs its own batch's gradients, as
    the paper's multi-GPU code does.
    """

    def __init__(self, config: ExperimentConfig, vae: torch.nn.Module, critics: Critics):
        super().__init__()
        self.vae = vae
        self.critics = critics  # a plain attribute: not parameters of this engine
        self.ae = config.autoencoder
        self.pixels_per_image = 3 * train_crop(config) ** 2

    def forward(
        self, x: torch.Tensor, adversarial: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, the reconstruction detached, detached terms to log)."""
        ae, vae = self.ae, self.vae
        logged: dict[str, torch.Tensor] = {}
        if ae.regularization == "kl":
            posterior = vae.encode(x).latent_dist
            x_hat = vae.decode(posterior.sample()).sample
            kl = posterior.kl().mean()  # nats per image, summed over latent elements
            # The paper sums the pixel loss per image; dividing both terms by the pixel count
            # keeps kl_weight's meaning (1e-6 as in the paper) while the loss reads per pixel.
            regularizer = ae.kl_weight * kl / self.pixels_per_image
            logged["kl"] = kl.detach()
        else:
            # Quantised in decode; the straight-through estimator carries the gradient past
            # the codebook lookup to the encoder.
            decoded = vae.decode(vae.encode(x).latents)
            x_hat = decoded.sample
            vq = decoded.commit_loss.mean()  # codebook + 0.25 x commitment, per element
            regularizer = ae.vq_weight * vq
            logged["vq_loss"] = vq.detach()
        diff = x_hat - x
        mse = diff.square().mean()
        # MSE by default rather than the paper's L1: without its perceptual and adversarial
        # terms L1 buys no sharpness, and MSE is what PSNR measures (L1 + MSE measured 0.1 to
        # 1.1 dB lower held out on the demo data at the same step count).
        if ae.reconstruction_loss == "l1":
            rec = l1 = diff.abs().mean()
        else:
            rec = mse
            with torch.no_grad():
                l1 = diff.abs().mean()
        logged.update(mse=mse.detach(), l1=l1.detach())
        if self.critics.lpips is not None:
            perceptual = self.critics.lpips(x_hat, x).mean()
            rec = rec + ae.perceptual_weight * perceptual
            logged["perceptual"] = perceptual.detach()
        loss = rec + regularizer
        if adversarial:
            g_loss = generator_loss(self.critics.disc(x_hat))
            weight = adaptive_weight(rec, g_loss, vae.decoder.conv_out.weight)
            loss = loss + ae.discriminator_weight * weight * g_loss
            logged.update(g_loss=g_loss.detach(), adaptive_weight=weight)
        logged["loss"] = loss.detach()
        return loss, x_hat.detach(), logged


class DiscriminatorLoss(torch.nn.Module):
    """The PatchGAN's hinge loss on real images and (detached) reconstructions, as the
    module its DeepSpeed engine runs."""

    def __init__(self, disc: torch.nn.Module):
        super().__init__()
        self.disc = disc

    def forward(
        self, x: torch.Tensor, x_hat: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_real, logits_fake = self.disc(x), self.disc(x_hat)
        d_loss = hinge_d_loss(logits_real, logits_fake)
        logged = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, logged


class AdversarialStep:
    """One training step of a rank: the autoencoder engine's update, then, from
    `discriminator_start_step` on, the discriminator engine's."""

    def __init__(self, config: ExperimentConfig, engine, d_engine, critics: Critics):
        self.start = config.autoencoder.discriminator_start_step
        self.engine, self.d_engine, self.critics = engine, d_engine, critics

    def __call__(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        adversarial = self.d_engine is not None and step > self.start
        if adversarial:
            self.critics.disc.requires_grad_(False)  # its update is the second half of the step
        loss, x_hat, logged = self.engine(x, adversarial)
        self.engine.backward(loss)
        self.engine.step()  # also steps the learning-rate schedule
        if adversarial:
            self.critics.disc.requires_grad_(True)
            d_loss, d_logged = self.d_engine(x, x_hat)
            self.d_engine.backward(d_loss)
            self.d_engine.step()
            logged.update(d_logged)
        return logged


def perceptual_off(config: ExperimentConfig) -> str | None:
    """Why the perceptual loss is off though asked for (no weights on disk), else None."""
    ae = config.autoencoder
    return missing_files(ae.lpips_path) if ae.perceptual_weight > 0 else None


def perceptual_loss(config: ExperimentConfig, device: torch.device) -> torch.nn.Module | None:
    """The LPIPS module when the perceptual loss is on, else None."""
    ae = config.autoencoder
    if ae.perceptual_weight == 0 or perceptual_off(config) is not None:
        return None
    return LPIPS(ae.lpips_path).to(device)
