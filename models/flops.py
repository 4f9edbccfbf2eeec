"""Model FLOPs of one training sample, counted once by tracing, and devices' peak FLOP/s.

The UNet's forward pass is traced on the meta device (no memory, no compute) with PyTorch's
FlopCounterMode, which counts matmuls, convolutions and attention; a training step costs
three forward passes (the backward pass is two). Model FLOPs utilisation (MFU) is achieved
model FLOP/s over the device's dense peak, from a table of data-sheet figures that the
config can extend (`tracking.peak_tflops`).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.unet import TextConditionedUNet, empty_like, unet_of

# Dense bf16/fp16 tensor-core peaks from vendor data sheets, TFLOP/s per device; matched
# against torch.cuda.get_device_name() by substring, longest name first.
PEAK_TFLOPS_BF16 = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "V100": 125.0,
    "T4": 65.0,
}


def train_flops_per_sample(model: torch.nn.Module, latent_size: int, text_length: int):
    """FLOPs of forward + backward for one sample: 3x the traced forward pass (of the UNet,
    and of the text encoder when it trains with it)."""
    with torch.device("meta"):
        copy = empty_like(model)
        unet = unet_of(copy)
        sample = torch.zeros(1, unet.config.in_channels, latent_size, latent_size)
        if isinstance(copy, TextConditionedUNet):  # token ids in, the encoder runs inside
            context = torch.zeros(1, text_length, dtype=torch.long)
        else:
            context = torch.zeros(1, text_length, unet.config.cross_attention_dim)
        mask = torch.ones(1, text_length, dtype=torch.bool)
        timestep = torch.zeros(1, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            copy(sample, timestep, encoder_hidden_states=context, encoder_attention_mask=mask)
    return 3.0 * counter.get_total_flops()


def peak_flops(device: torch.device, extra_tflops: dict[str, float]) -> float | None:
    """The device's dense peak FLOP/s, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = device.type
    table = {**PEAK_TFLOPS_BF16, **extra_tflops}
    for key in sorted(table, key=len, reverse=True):
        if key.lower() in name.lower():
            return table[key] * 1e12
    return None
