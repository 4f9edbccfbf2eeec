"""The patch-based adversarial loss of the LDM paper's stage 1 (from taming-transformers).

A PatchGAN discriminator (Isola et al., 2017; the paper's `NLayerDiscriminator`) scores
overlapping patches rather than whole images, so it judges local realism (texture, sharp
edges), which is what a pixel loss blurs away. It is trained with the hinge loss, and the
autoencoder's adversarial term is weighted adaptively (Esser et al., 2021): the ratio of the
reconstruction loss's and the adversarial loss's gradient norms at the decoder's last layer,
so that the adversarial gradient there is `discriminator_weight` times the reconstruction
one, whatever scale either loss has.
"""

from __future__ import annotations

import torch
from torch import nn

MAX_ADAPTIVE_WEIGHT = 1e4  # the paper's clamp: a vanishing GAN gradient must not explode it


class NLayerDiscriminator(nn.Module):
    """Conv(4x4, stride 2) + LeakyReLU, then `num_layers` - 1 more stride-2 convolutions with
    BatchNorm, one stride-1 convolution and a 1-channel output: a map of real/fake logits,
    one per receptive field (70x70 pixels at 3 layers)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = channels
        for n in range(1, num_layers + 1):
            last = n == num_layers  # the last hidden block keeps the resolution
            out = channels * min(2**n, 8)
            layers += [
                # No bias: the BatchNorm that follows has its own.
                nn.Conv2d(width, out, 4, stride=1 if last else 2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    # DCGAN's initialisation, as the paper's code does it.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: push real logits above 1 and fake ones below -1."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The autoencoder's adversarial loss: raise the discriminator's logits on its output."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
) -> torch.Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4), clamped to [0, 1e4].

    Both gradients are taken at the decoder's last layer G_L; the graph is kept for the
    backward pass of the total loss. Detached: lambda is a weight, not something to train.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach()
