"""`ldm plan`: what an experiment needs, and how fast it would train, on N GPUs of a type.

Nothing is allocated: every model is built on the meta device. The model, the formulas:

- **Parameters** per component, counted on the meta device.
- **Memory per GPU** for ZeRO stage s with N data-parallel ranks, mixed-precision AdamW
  (Rajbhandari et al., 2020), Psi = trained parameters: weights 2Psi (bf16), gradients 2Psi,
  optimizer state 12Psi (fp32 master copy, first and second moments). Stage 1 shards the
  optimizer state (12Psi/N), stage 2 also the gradients (2Psi/N), stage 3 also the weights
  (2Psi/N). Plus the EMA copy (fp32, 4Psi, on every rank) and the activations one micro-batch
  saves for the backward pass, measured by tracing the forward pass on the meta device.
- **Compute**: the UNet's training FLOPs per sample, traced (3x the forward pass; the same
  count the MLflow MFU metric uses), at `utilisation` of the GPU's dense bf16 peak. The
  utilisation is one per GPU family, each solved from a throughput someone measured on that
  family (`CALIBRATIONS`; a `make gpu-check` result, when the repository holds one, replaces
  its family's published figure): what one software stack reached on one generation is not
  what another reaches on the next.
- **Communication**: one ring all-reduce of bf16 gradients per optimizer step, 2 x 2Psi x
  (N-1)/N bytes through each GPU (ZeRO-1/2's reduce-scatter + all-gather move the same; ZeRO-3
  adds a weight all-gather, 1.5x), at NVLink bandwidth within a node and at the per-GPU
  network bandwidth across nodes, `overlap` of it hidden behind the backward pass.
- **Step time** = (global batch / N) x FLOPs per sample / (peak x utilisation)
  + (1 - overlap) x communication; throughput = global batch / step time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import ExperimentConfig
from core.errors import LdmError
from core.loader import build_config
from models.autoencoder import build_autoencoder
from models.flops import train_flops_per_sample
from models.text_encoders import build_text_encoder_meta
from models.unet import build_denoiser, build_unet

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    """Data-sheet figures of one GPU, and the interconnect of the nodes it usually comes in."""

    name: str
    family: str  # the architecture whose calibration applies (see CALIBRATIONS)
    peak_tflops_bf16: float
    memory_gib: float
    nvlink_gbps: float  # achievable all-reduce bus bandwidth within a node, GB/s per GPU
    network_gbps: float  # across nodes, GB/s per GPU (e.g. one 200 Gb/s NIC per GPU = 25)
    gpus_per_node: int = 8


GPUS = {
    "a100": Gpu("A100 80GB SXM", "ampere", 312.0, 80.0, 230.0, 25.0),
    "h100": Gpu("H100 SXM", "hopper", 989.0, 80.0, 370.0, 50.0),
    "h200": Gpu("H200 SXM", "hopper", 989.0, 141.0, 370.0, 50.0),
    "l40s": Gpu("L40S", "ada", 362.0, 48.0, 25.0, 12.5),
}

# MosaicML trained Stable Diffusion 2 base with a global batch of 2048 and published its
# throughput on 8 and 128 A100s; the A100 utilisation is calibrated on one of those figures.
MOSAIC_GLOBAL_BATCH = 2048
# MosaicML's published Stable Diffusion 2 base throughputs (img/s), A100s, global batch 2048.
MOSAIC = {(8, 256): 1100.0, (8, 512): 290.0, (128, 256): 11600.0, (128, 512): 4590.0}


@dataclass(frozen=True)
class Calibration:
    """A measured training throughput on one GPU family, which its utilisation is solved from."""

    source: str
    preset: str
    resolution: int
    num_gpus: int
    gpu_type: str
    global_batch: int
    images_per_s: float


CALIBRATIONS = {
    "ampere": Calibration(
        "MosaicML's SD2 base on 8 x A100, 256 px: 1,100 img/s (global batch 2048)",
        "sd2_base",
        256,
        8,
        "a100",
        MOSAIC_GLOBAL_BATCH,
        MOSAIC[(8, 256)],
    ),
    # NVIDIA's MLPerf Training v4.0 Stable Diffusion v2 submission (NeMo; fp16, channels-last,
    # inductor, CUDA graphs, fused optimizer): 16 images per GPU, throughput derived from its
    # published result logs (github.com/mlcommons/training_results_v4.0).
    "hopper": Calibration(
        "NVIDIA's MLPerf Training v4.0 SD v2 submission on 64 x H100 SXM, 512 px: about "
        "110 img/s per GPU (global batch 1024)",
        "sd2_base",
        512,
        64,
        "h100",
        1024,
        110.0 * 64,
    ),
}
# Families with no published SD-class training figure borrow another family's calibration.
BORROWED = {"ada": "ampere"}
# Written by `make gpu-check` (bench/gpu_check.py); when present it calibrates its family.
GPU_CHECK_RESULT = Path(__file__).resolve().parents[1] / "bench" / "results" / "gpu.json"


@dataclass
class Plan:
    parameters: dict[str, int]
    flops_per_sample: float
    activation_bytes_per_sample: float
    memory_gib: dict[int, float]  # ZeRO stage -> GiB per GPU
    images_per_s: float
    step_s: float
    compute_s: float
    comm_s: float


def parameter_counts(config: ExperimentConfig) -> dict[str, int]:
    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    text = build_text_encoder_meta(config.text_encoder)
    with torch.device("meta"):
        unet = build_unet(config, latent_channels=config.autoencoder.latent_channels)
        autoencoder = build_autoencoder(config)
    return {"unet": count(unet), "autoencoder": count(autoencoder), "text_encoder": count(text)}


def activation_bytes_per_sample(config: ExperimentConfig) -> float:
    """Bytes the UNet's forward pass saves for backward, per sample, in bf16 (traced)."""
    seen: set[int] = set()
    total = 0
    latent = config.data.resolution // config.autoencoder.downsample_factor
    levels = len(config.unet.block_out_channels)
    tokens = {(latent // 2**i) ** 2 for i in range(levels)}

    def pack(tensor: torch.Tensor):
        nonlocal total
        key = id(tensor)
        if key in seen or key in parameters:  # stored once; weights are not activations
            return tensor
        seen.add(key)
        shape = tuple(tensor.shape)
        # Attention probabilities (queries x keys): fused SDPA kernels (flash, memory-efficient)
        # recompute them in the backward pass instead of keeping them, as real runs do.
        if len(shape) >= 3 and shape[-2] in tokens and shape[-1] in tokens | {max_length}:
            return tensor
        total += tensor.numel() * tensor.element_size()
        return tensor

    batch = 2  # per-sample bytes from a batch of 2 (batch 1 can hide batch-dependent shapes)
    max_length = config.text_encoder.max_length
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # a bf16 cast of a meta model warns needlessly
    with torch.device("meta"):
        unet = build_unet(config, latent_channels=config.autoencoder.latent_channels)
        unet = unet.to(torch.bfloat16)
    diffusers_logging.set_verbosity(level)
    parameters = {id(p) for p in unet.parameters()}
    with torch.device("meta"):
        context = unet.config.cross_attention_dim
        x = torch.zeros(batch, unet.config.in_channels, latent, latent, dtype=torch.bfloat16)
        states = torch.zeros(batch, config.text_encoder.max_length, context, dtype=torch.bfloat16)
        t = torch.zeros(batch, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            unet(x, t, encoder_hidden_states=states)
    return total / batch


def memory_per_gpu(params: int, num_gpus: int, stage: int, activations: float) -> float:
    weights, grads, optim = 2.0 * params, 2.0 * params, 12.0 * params
    if stage >= 1:
        optim /= num_gpus
    if stage >= 2:
        grads /= num_gpus
    if stage >= 3:
        weights /= num_gpus
    ema = 4.0 * params
    return (weights + grads + optim + ema + activations) / GIB


def step_time(
    flops_per_sample: float,
    params: int,
    num_gpus: int,
    gpu: Gpu,
    global_batch: int,
    utilisation: float,
    overlap: float,
    zero_stage: int,
) -> tuple[float, float]:
    """(compute seconds, exposed communication seconds) of one optimizer step."""
    compute = (
        (global_batch / num_gpus) * flops_per_sample / (gpu.peak_tflops_bf16 * 1e12 * utilisation)
    )
    volume = 2 * 2.0 * params * (num_gpus - 1) / num_gpus * (1.5 if zero_stage == 3 else 1.0)
    bandwidth = gpu.nvlink_gbps if num_gpus <= gpu.gpus_per_node else gpu.network_gbps
    comm = volume / (bandwidth * 1e9) if num_gpus > 1 else 0.0
    return compute, (1.0 - overlap) * comm


@functools.lru_cache(maxsize=8)
def _profile(config_json: str) -> tuple[dict[str, int], float, float]:
    """(parameters, training FLOPs per sample, activation bytes per sample) of a config."""
    config = ExperimentConfig.model_validate_json(config_json)
    params = parameter_counts(config)
    # A text encoder trained jointly is optimised (and sharded) with the UNet.
    params["trained"] = params["unet"] + (
        params["text_encoder"] if config.text_encoder.trainable else 0
    )
    latent = config.data.resolution // config.autoencoder.downsample_factor
    with torch.device("meta"):
        model = build_denoiser(config, latent_channels=config.autoencoder.latent_channels)
    flops = train_flops_per_sample(model, latent, config.text_encoder.max_length)
    return params, flops, activation_bytes_per_sample(config)


def plan(
    config: ExperimentConfig,
    num_gpus: int,
    gpu_type: str,
    utilisation: float,
    overlap: float,
    global_batch: int | None = None,
) -> Plan:
    gpu = gpu_of(gpu_type)
    params, flops, act = _profile(config.model_dump_json())
    micro = config.train.micro_batch_size
    memory = {s: memory_per_gpu(params["trained"], num_gpus, s, act * micro) for s in range(4)}
    batch = global_batch or config.train.global_batch_size
    compute, comm = step_time(
        flops,
        params["trained"],
        num_gpus,
        gpu,
        batch,
        utilisation,
        overlap,
        config.train.zero_stage,
    )
    return Plan(params, flops, act, memory, batch / (compute + comm), compute + comm, compute, comm)


def measured_calibration(path: Path) -> tuple[str, Calibration] | None:
    """(family, calibration) from a `make gpu-check` result: its fastest ldm-step row at its
    largest resolution, or None without one (or on a GPU `ldm plan` does not list)."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    row = result.get("calibration")
    gpu_type = next((key for key in GPUS if key in result.get("gpu", "").lower()), None)
    if not row or gpu_type is None:
        return None
    return GPUS[gpu_type].family, Calibration(
        f"measured: make gpu-check on one {result['gpu']} ({result['date']}): "
        f"{row['images_per_s']:.1f} img/s, {row['preset']} at {row['resolution']} px",
        row["preset"],
        row["resolution"],
        1,
        gpu_type,
        row["micro_batch"],
        row["images_per_s"],
    )


def calibration_of(gpu_type: str, measured: Path = GPU_CHECK_RESULT) -> Calibration:
    """The calibration that applies to `gpu_type`: a measurement on its family, else a
    published figure of its family, else the family it borrows from."""
    family = gpu_of(gpu_type).family
    found = measured_calibration(measured)
    if found is not None and found[0] == family:
        return found[1]
    if family in CALIBRATIONS:
        return CALIBRATIONS[family]
    lender = CALIBRATIONS[BORROWED[family]]
    return dataclasses.replace(
        lender,
        source=f"no published {family} figure; borrowed: {lender.source}",
    )


@functools.lru_cache(maxsize=8)
def calibrated_utilisation(calibration: Calibration, overlap: float) -> float:
    """The utilisation that reproduces `calibration`'s throughput under this model."""
    config = build_config(
        {"preset": calibration.preset}, [f"data.resolution={calibration.resolution}"]
    )
    return calibrate_utilisation(
        config,
        calibration.num_gpus,
        calibration.gpu_type,
        calibration.images_per_s,
        calibration.global_batch,
        overlap,
    )


def gpu_of(name: str) -> Gpu:
    if name.lower() not in GPUS:
        raise LdmError(f"--gpu-type {name!r}: choose one of {', '.join(sorted(GPUS))}")
    return GPUS[name.lower()]


def calibrate_utilisation(
    config: ExperimentConfig,
    num_gpus: int,
    gpu_type: str,
    images_per_s: float,
    global_batch: int,
    overlap: float,
) -> float:
    """The utilisation at which the model reproduces a measured throughput (closed form:
    global_batch / images_per_s = compute(utilisation) + exposed communication)."""
    gpu = gpu_of(gpu_type)
    probe = plan(config, num_gpus, gpu_type, 1.0, overlap, global_batch)
    compute_at_peak = (
        (global_batch / num_gpus) * probe.flops_per_sample / (gpu.peak_tflops_bf16 * 1e12)
    )
    available = global_batch / images_per_s - probe.comm_s
    if available <= 0:
        raise LdmError("that throughput is faster than the communication model allows")
    return compute_at_peak / available


def mosaic_check(overlap: float) -> list[dict]:
    """Calibrate on 8 x A100 at 256 px, then predict MosaicML's other three figures."""

    def at(resolution: int) -> ExperimentConfig:
        return build_config({"preset": "sd2_base"}, [f"data.resolution={resolution}"])

    u = calibrated_utilisation(CALIBRATIONS["ampere"], overlap)
    rows = []
    for (gpus, resolution), published in MOSAIC.items():
        p = plan(at(resolution), gpus, "a100", u, overlap, MOSAIC_GLOBAL_BATCH)
        rows.append(
            {
                "gpus": gpus,
                "resolution": resolution,
                "published": published,
                "predicted": p.images_per_s,
                "error": p.images_per_s / published - 1,
                "utilisation": u,
                "calibration": (gpus, resolution) == (8, 256),
            }
        )
    return rows


def report(
    config: ExperimentConfig,
    p: Plan,
    num_gpus: int,
    gpu_type: str,
    utilisation: float,
    source: str,
) -> list[str]:
    gpu = gpu_of(gpu_type)
    trained = "UNet and text encoder" if config.text_encoder.trainable else "UNet"
    lines = [
        "parameters   " + ", ".join(f"{k} {v:,}" for k, v in p.parameters.items()),
        f"per sample   {p.flops_per_sample / 1e12:.3f} TFLOPs to train the {trained} (3x "
        f"forward, traced); {p.activation_bytes_per_sample / 2**20:.0f} MiB of bf16 UNet "
        "activations",
        f"memory/GPU   {num_gpus} x {gpu.name} ({gpu.memory_gib:.0f} GiB), micro-batch "
        f"{config.train.micro_batch_size}:",
    ]
    for stage, gib in p.memory_gib.items():
        fits = "fits" if gib <= gpu.memory_gib * 0.9 else "does NOT fit"
        lines.append(f"  ZeRO-{stage}    {gib:7.1f} GiB  {fits}")
    lines.append(
        f"throughput   {p.images_per_s:,.0f} img/s (step {p.step_s * 1000:.0f} ms: compute "
        f"{p.compute_s * 1000:.0f} ms + exposed communication {p.comm_s * 1000:.0f} ms)"
    )
    lines.append(f"utilisation  {utilisation:.3f} of the bf16 peak, from {source}")
    return lines
