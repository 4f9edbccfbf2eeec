"""Stage 1 of the LDM paper: train the autoencoder that defines the latent space.

`ldm autoencoder` reads the raw shards into memory and trains a diffusers `AutoencoderKL`
(a small KL pull towards N(0, I)) or `VQModel` (a learned codebook; the decoder quantises) on
random crops. The loss is the paper's menu, each term switchable: a pixel loss (MSE by
default, or the paper's L1), LPIPS when its pretrained weights are on disk, and a PatchGAN
discriminator (training.discriminator) with the paper's adaptive weight. Held out, it
measures PSNR, SSIM and an rFID-style feature distance against the "bicubic down by f, then
up" baseline (what any f-times smaller representation must beat), sets the latent scaling
the way Stable Diffusion did, and publishes the model folder atomically at
`config.autoencoder_dir`, where precompute picks it up.

Training checkpoints every `autoencoder.checkpoint_every` steps into
`<run>/autoencoder-checkpoints/step_<8-digit step>` (model, discriminator, optimizers, step, RNG;
sealed by a commit marker as training checkpoints are), and a rerun continues from the
newest committed one: an interrupted run ends with the weights an uninterrupted one has.

The stage runs in one process (no Ray, no DeepSpeed): the model is small and the dataset fits
in memory, so distributing it would only add start-up time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.images import (
    ShardReadReport,
    image_bytes,
    list_shards,
    read_shard,
    resize_crop,
    to_model_range,
    to_uint8,
    try_decode,
)
from orchestrator.config import ExperimentConfig
from orchestrator.errors import LdmError

# The whole dataset is held in memory as uint8 (N x res x res x 3 bytes): ~3,800 demo emoji at
# 64 px are 47 MB. Past this budget (~21,000 images at 256 px; splitting off the held-out set
# briefly doubles it) further shards are not read: a stage-1 autoencoder learns local image
# statistics and does not need every image, and the budget keeps a large dataset from
# exhausting the driver's memory.
MAX_PIXEL_BYTES = 4 << 30
SCALING_IMAGES = 512  # training images whose latents set the scaling factor
GRID_IMAGES = 8  # held-out images shown in the reconstruction grid
WARMUP_STEPS = 20


def _holdout_rank(key: str) -> str:
    # A hash of the key, not its position, so the held-out set stays the same when shards are
    # re-made in another order or more shards are added.
    return hashlib.sha256(key.encode()).hexdigest()


def load_images(config: ExperimentConfig) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Decode and crop every shard image: (train uint8 NHWC, held-out uint8 NHWC, counts)."""
    res = config.data.resolution
    rng = np.random.default_rng(config.run.seed)
    keys: list[str] = []
    images: list[np.ndarray] = []
    undecodable = 0
    read_errors: list[str] = []
    shards = list_shards(config.data.shards)
    skipped_shards = 0
    for i, shard in enumerate(shards):
        if len(images) * res * res * 3 >= MAX_PIXEL_BYTES:
            skipped_shards = len(shards) - i
            break
        report = ShardReadReport()
        for sample in read_shard(shard, report):
            image = try_decode(image_bytes(sample))
            if image is None:
                undecodable += 1
                continue
            keys.append(sample["__key__"])
            images.append(resize_crop(image, res, config.data.center_crop, rng))
        read_errors += [f"{Path(shard).name}: {e}" for e in report.errors]
    for error in read_errors:
        print(f"autoencoder: shard read error (rest of that shard skipped): {error}", flush=True)
    if undecodable:
        print(f"autoencoder: skipped {undecodable} samples without a decodable image", flush=True)
    if skipped_shards:
        print(
            f"autoencoder: memory budget reached after {len(images)} images; "
            f"{skipped_shards} of {len(shards)} shards not used",
            flush=True,
        )
    holdout = config.autoencoder.num_holdout
    if len(images) <= holdout:
        raise LdmError(
            f"data.shards: only {len(images)} decodable images in {config.data.shards}, need more "
            f"than autoencoder.num_holdout={holdout} (some must be left to train on)"
        )
    order = sorted(range(len(keys)), key=lambda i: _holdout_rank(keys[i]))
    held = set(order[:holdout])
    train = np.stack([img for i, img in enumerate(images) if i not in held])
    test = np.stack([images[i] for i in sorted(held)])
    counts = {"train": len(train), "holdout": len(test), "undecodable": undecodable}
    return train, test, counts


def train_crop(config: ExperimentConfig) -> int:
    """Side of the square crops stage 1 trains on: `autoencoder.train_crop`, else whole images.

    The autoencoder is convolutional: what it learns on crops it applies to whole images, and
    a 32 px crop costs a quarter of a 64 px image. On the demo data, 16 crops of 32 px per step
    reached 23.3 dB held out in the time 4 whole images per step reached 20.3 dB.
    """
    res, f = config.data.resolution, config.autoencoder.downsample_factor
    crop = config.autoencoder.train_crop or res
    if not f <= crop <= res or crop % f:
        raise LdmError(
            f"autoencoder.train_crop: {crop} must be a multiple of autoencoder.downsample_factor="
            f"{f} and at most data.resolution={res}"
        )
    return crop


def random_crops(
    images: np.ndarray, batch_size: int, crop: int, generator: torch.Generator
) -> torch.Tensor:
    """A batch of random images, each randomly cropped and flipped: float NCHW in [-1, 1]."""
    n, res = len(images), images.shape[1]
    idx = torch.randint(n, (batch_size,), generator=generator).tolist()
    corners = torch.randint(res - crop + 1, (batch_size, 2), generator=generator).tolist()
    flips = (torch.rand(batch_size, generator=generator) < 0.5).tolist()
    batch = np.empty((batch_size, crop, crop, 3), dtype=np.uint8)
    for b, (i, (top, left), flip) in enumerate(zip(idx, corners, flips, strict=True)):
        patch = images[i, top : top + crop, left : left + crop]
        batch[b] = patch[:, ::-1] if flip else patch
    return to_model_range(batch)


def _lr_factor(num_steps: int):
    # A short linear warmup, then cosine decay to zero: measured +0.9 dB held out over a
    # constant rate in a 900-step demo run, where the last steps at a low rate settle the
    # reconstructions.
    warmup = max(1, min(WARMUP_STEPS, num_steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, num_steps - warmup)))

    return factor


def psnr(reference: np.ndarray, images: np.ndarray) -> float:
    """Mean per-image PSNR in dB of uint8 NHWC images against their references."""
    diff = reference.astype(np.float64) - images.astype(np.float64)
    mse = np.maximum((diff**2).mean(axis=(1, 2, 3)), 255.0**2 * 1e-10)  # a copy scores 100 dB
    return float(np.mean(10 * np.log10(255.0**2 / mse)))


def ssim(reference: np.ndarray, images: np.ndarray) -> float:
    """Mean SSIM (Wang et al., 2004) of uint8 NHWC images against their references.

    The standard form: an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03 on the 0-255
    range, over every window that fits inside the image ("valid"), per colour channel, then
    averaged over positions, channels and images. Images under 11 px use the largest odd
    window that fits.
    """
    x = torch.from_numpy(reference).permute(0, 3, 1, 2).double()
    y = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    size = min(11, x.shape[2], x.shape[3])
    size -= 1 - size % 2
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * 1.5**2))
    g /= g.sum()
    window = (g[:, None] * g[None, :]).expand(x.shape[1], 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return float(ssim_map.mean())


def bicubic_baseline(images: np.ndarray, factor: int) -> np.ndarray:
    """Bicubic down by `factor`, then back up: the naive f-times smaller representation."""
    out = []
    for array in images:
        image = Image.fromarray(array)
        w, h = image.size
        small = image.resize((w // factor, h // factor), Image.Resampling.BICUBIC)
        out.append(np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.uint8))
    return np.stack(out)


def reconstruction_metrics(
    originals: np.ndarray, reconstructions: np.ndarray, baseline: np.ndarray
) -> dict[str, float]:
    """PSNR, SSIM and an rFID-style distance of the reconstructions and of the bicubic
    baseline, each against the originals.

    The rFID-style score is the Frechet distance between EfficientNet-Lite0 features of the
    originals and of the reconstructions (training.evaluation's network; not Inception, so
    comparable only with itself, and biased upwards by the few held-out images: compare
    runs with the same `autoencoder.num_holdout`).
    """
    from training.evaluation import FeatureNet

    features = FeatureNet()
    real = features(originals)
    metrics = {}
    for suffix, images in (("", reconstructions), ("_bicubic", baseline)):
        metrics[f"psnr{suffix}"] = psnr(originals, images)
        metrics[f"ssim{suffix}"] = ssim(originals, images)
        metrics[f"rfd_efficientnet_lite0{suffix}"] = frechet_distance(real, features(images))
    return metrics


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """training.evaluation.frechet_distance, computed exactly for few samples.

    With n samples of d-dim features (64 of 1280 here) the covariances have rank < n, and
    Tr((S_a S_b)^(1/2)) is the sum of the singular values of A B^T / sqrt((n_a-1)(n_b-1)),
    A and B the centred features (the nonzero eigenvalues of A^T A B^T B are those of
    (A B^T)(A B^T)^T): an n x n problem instead of three d x d eigendecompositions, which
    take seconds on a CPU. With more samples than dimensions the d x d form is cheaper.
    """
    from training import evaluation

    if min(len(a), len(b)) > a.shape[1]:
        return evaluation.frechet_distance(a, b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = a - mu_a, b - mu_b
    na, nb = len(a) - 1, len(b) - 1
    trace_root = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / math.sqrt(na * nb)
    traces = (ca**2).sum() / na + (cb**2).sum() / nb
    return float(((mu_a - mu_b) ** 2).sum() + traces - 2 * trace_root)


def encode_latents(vae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The deterministic latent of `x`: a KL posterior's mean, or a VQModel's (or
    AutoencoderTiny's) encoder output, before quantisation."""
    encoded = vae.encode(x)
    dist = getattr(encoded, "latent_dist", None)
    return dist.mode() if dist is not None else encoded.latents


@torch.inference_mode()
def reconstruct(vae: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Encode deterministically and decode (a VQModel quantises in decode): the round trip."""
    device = next(vae.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_range(images[start : start + batch_size]).to(device)
        out.append(to_uint8(vae.decode(encode_latents(vae, x)).sample))
    return np.concatenate(out)


@torch.inference_mode()
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


@torch.no_grad()
def fold_vq_shift(vae: torch.nn.Module, shift: float) -> None:
    """Make a VQModel encode to `z - shift` and decode exactly as before.

    diffusers' VQModel has no `shift_factor` setting, so the latent offset goes into the
    weights: the encoder's 1x1 `quant_conv` subtracts it, the codebook moves with it (the
    nearest entry to z - shift among e - shift is the nearest to z among e, so the same
    codes are picked) and `post_quant_conv` adds it back. The published model's latents are
    then zero-mean by construction, for every consumer (precompute, sampling, diffusers).
    """
    vae.quant_conv.bias -= shift
    vae.quantize.embedding.weight -= shift
    post = vae.post_quant_conv
    post.bias += shift * post.weight.sum(dim=(1, 2, 3))


# --- resumable training ------------------------------------------------------------------

CHECKPOINT_DIR = "autoencoder-checkpoints"
KEEP_CHECKPOINTS = 2  # the newest, and one to fall back on should the newest be damaged
STATE_FILE = "state.json"
# Settings that do not change what is trained: a checkpoint resumes under any value of these.
_NOT_RESUME_RELEVANT = {"log_every", "checkpoint_every"}


def checkpoint_dir(config: ExperimentConfig) -> Path:
    return config.run_dir / CHECKPOINT_DIR


def _resume_key(config: ExperimentConfig) -> dict[str, object]:
    """The settings a checkpoint must share with the run that continues it."""
    ae = config.autoencoder.model_dump(mode="json", exclude=_NOT_RESUME_RELEVANT)
    key = {f"autoencoder.{k}": v for k, v in ae.items()}
    d = config.data
    key.update(
        {
            "data.shards": d.shards,
            "data.resolution": d.resolution,
            "data.center_crop": d.center_crop,
            "run.seed": config.run.seed,
        }
    )
    return key


def _read_resume_state(config: ExperimentConfig) -> tuple[Path, dict] | None:
    """The newest committed checkpoint and its state, after checking both; None: start fresh."""
    from training import checkpoint as ckpt

    root = checkpoint_dir(config)
    tags = ckpt.committed_tags(root)
    for tag in reversed(tags):
        try:
            ckpt.verify(tag)  # every file against its sha256, before anything is loaded
            break
        except LdmError as err:
            print(f"autoencoder: not resuming from a damaged checkpoint: {err}", flush=True)
    else:
        if tags:
            raise LdmError(
                f"{root}: no committed checkpoint matches its sha256 (damaged files); delete "
                f"{root} to train from scratch"
            )
        return None
    state = json.loads((tag / STATE_FILE).read_text())
    now = _resume_key(config)
    for key, value in state["config"].items():
        if now.get(key, value) != value:
            raise LdmError(
                f"{key}: {root} holds checkpoints of a run with {key}={value!r}, now "
                f"{now[key]!r}; set it back to continue that run, or delete {root} to train "
                "from scratch"
            )
    return tag, state


def _rng_state(generator: torch.Generator, device: torch.device) -> dict:
    from training import checkpoint as ckpt

    state = {"global": ckpt.rng_state(), "crops": generator.get_state().tolist()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def _set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    from training import checkpoint as ckpt

    ckpt.set_rng_state(state["global"])
    generator.set_state(torch.tensor(state["crops"], dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


def _save_checkpoint(
    config: ExperimentConfig,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, object],
    state: dict,
) -> Path:
    """Write a tag (safetensors weights, optimizer states, JSON state), then commit it."""
    from safetensors.torch import save_file

    from data_pipeline.cache import write_atomic
    from training import checkpoint as ckpt

    root = checkpoint_dir(config)
    tag = root / ckpt.tag_for(step)
    shutil.rmtree(tag, ignore_errors=True)  # what a save cut short by a crash left
    tag.mkdir(parents=True)
    for name, module in modules.items():
        tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(tensors, tag / f"{name}.safetensors")
    # Optimizer and LR-scheduler states are nested dicts of tensors and numbers: torch's
    # format, read back with weights_only=True (no code runs) after the hashes check out.
    torch.save({k: v.state_dict() for k, v in optimizers.items()}, tag / "optimizers.pt")
    write_atomic(tag / STATE_FILE, json.dumps({**state, "step": step}).encode())
    ckpt.commit(tag)
    ckpt.prune(root, KEEP_CHECKPOINTS)
    return tag


def _load_checkpoint(
    tag: Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, object],
    device: torch.device,
) -> None:
    from safetensors.torch import load_file

    for name, module in modules.items():
        module.load_state_dict(load_file(tag / f"{name}.safetensors", device=str(device)))
    states = torch.load(tag / "optimizers.pt", map_location=device, weights_only=True)
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(states[name])


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # respects taskset and container CPU sets
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _publish(vae: torch.nn.Module, metrics: dict[str, float], target: Path) -> None:
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


# --- training -----------------------------------------------------------------------------


class _Losses:
    """One training step's losses and updates: pixel, perceptual, KL or VQ, adversarial."""

    def __init__(
        self, config: ExperimentConfig, vae, optimizer, scheduler, lpips, disc, d_optimizer
    ):
        self.ae = config.autoencoder
        self.vae, self.optimizer, self.scheduler = vae, optimizer, scheduler
        self.lpips, self.disc, self.d_optimizer = lpips, disc, d_optimizer
        self.pixels_per_image = 3 * train_crop(config) ** 2

    def step(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        ae, vae = self.ae, self.vae
        logged: dict[str, torch.Tensor] = {}
        if ae.regularization == "kl":
            posterior = vae.encode(x).latent_dist
            x_hat = vae.decode(posterior.sample()).sample
            kl = posterior.kl().mean()  # nats per image, summed over latent elements
            # The paper sums the pixel loss per image; dividing both terms by the pixel count
            # keeps kl_weight's meaning (1e-6 as in the paper) while the loss reads per pixel.
            regularizer = ae.kl_weight * kl / self.pixels_per_image
            logged["kl"] = kl
        else:
            # Quantised in decode; the straight-through estimator carries the gradient past
            # the codebook lookup to the encoder.
            decoded = vae.decode(vae.encode(x).latents)
            x_hat = decoded.sample
            vq = decoded.commit_loss.mean()  # codebook + 0.25 x commitment, per element
            regularizer = ae.vq_weight * vq
            logged["vq_loss"] = vq
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
        logged.update(mse=mse, l1=l1)
        if self.lpips is not None:
            perceptual = self.lpips(x_hat, x).mean()
            rec = rec + ae.perceptual_weight * perceptual
            logged["perceptual"] = perceptual
        loss = rec + regularizer
        adversarial = self.disc is not None and step > ae.discriminator_start_step
        if adversarial:
            from training.discriminator import adaptive_weight, generator_loss

            self.disc.requires_grad_(False)  # its update is the second half of the step
            g_loss = generator_loss(self.disc(x_hat))
            weight = adaptive_weight(rec, g_loss, vae.decoder.conv_out.weight)
            loss = loss + ae.discriminator_weight * weight * g_loss
            logged.update(g_loss=g_loss, adaptive_weight=weight)
        logged["loss"] = loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if adversarial:
            from training.discriminator import hinge_d_loss

            self.disc.requires_grad_(True)
            logits_real, logits_fake = self.disc(x), self.disc(x_hat.detach())
            d_loss = hinge_d_loss(logits_real, logits_fake)
            self.d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            self.d_optimizer.step()
            logged.update(
                d_loss=d_loss,
                logits_real=logits_real.detach().mean(),
                logits_fake=logits_fake.detach().mean(),
            )
        return logged


def _perceptual(config: ExperimentConfig, device: torch.device):
    """(LPIPS module or None, why it is off or None)."""
    from training.perceptual import LPIPS, missing_files

    ae = config.autoencoder
    if ae.perceptual_weight == 0:
        return None, None
    reason = missing_files(ae.lpips_path)
    if reason is not None:
        return None, reason
    return LPIPS(ae.lpips_path).to(device), None


def train_autoencoder(config: ExperimentConfig, progress: bool = True) -> dict[str, float]:
    """Train (or continue training), evaluate and save the stage-1 autoencoder; returns its
    metrics.

    With `autoencoder.pretrained` set there is nothing to train: it prints so and returns {}.
    """
    from tqdm.auto import tqdm

    from training.discriminator import NLayerDiscriminator
    from training.models import build_autoencoder
    from training.sampling import grid
    from training.tracking import end_run, reopen_run, start_run, tracker_for

    ae = config.autoencoder
    if ae.pretrained:
        print(
            f"autoencoder: autoencoder.pretrained is set ({ae.pretrained}); nothing to train, "
            "precompute uses it directly",
            flush=True,
        )
        return {}

    crop = train_crop(config)
    resume = _read_resume_state(config)  # before the data: a refused resume costs nothing
    began = time.perf_counter()
    train, test, counts = load_images(config)
    load_seconds = time.perf_counter() - began
    print(
        f"autoencoder: {counts['train']} training images, {counts['holdout']} held out, "
        f"{config.data.resolution}px (training on {crop}px crops), f={ae.downsample_factor}, "
        f"{ae.regularization.upper()}",
        flush=True,
    )

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.run.seed)
    generator = torch.Generator().manual_seed(config.run.seed)
    vae = build_autoencoder(config).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=ae.learning_rate, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(ae.num_steps))
    modules: dict[str, torch.nn.Module] = {"autoencoder": vae}
    optimizers: dict[str, object] = {"autoencoder": optimizer, "scheduler": scheduler}
    disc = d_optimizer = None
    if ae.discriminator_weight > 0:
        disc = NLayerDiscriminator(num_layers=ae.discriminator_layers).to(device).train()
        # Adam with beta1 = 0.5 and a constant rate, as the paper's code trains it.
        d_optimizer = torch.optim.Adam(
            disc.parameters(),
            lr=ae.discriminator_learning_rate or ae.learning_rate,
            betas=(0.5, 0.9),
        )
        modules["discriminator"] = disc
        optimizers["discriminator"] = d_optimizer
    lpips, perceptual_off = _perceptual(config, device)
    losses = _Losses(config, vae, optimizer, scheduler, lpips, disc, d_optimizer)
    if perceptual_off:
        print(
            f"autoencoder: perceptual loss OFF: autoencoder.perceptual_weight="
            f"{ae.perceptual_weight}, but {perceptual_off} (LPIPS needs pretrained VGG16 "
            "weights on disk; nothing is downloaded); training without it",
            flush=True,
        )

    start_step, last = 0, {}
    run_id = None
    if resume is not None:
        tag, state = resume
        _load_checkpoint(tag, modules, optimizers, device)
        _set_rng_state(state["rng"], generator, device)
        start_step, last, run_id = state["step"], state.get("last", {}), state["mlflow_run_id"]
        print(f"autoencoder: resuming from {tag} (step {start_step} of {ae.num_steps})", flush=True)

    uri = config.tracking_uri
    if run_id is not None:
        try:
            reopen_run(uri, run_id, {"ldm.resumed_from": str(start_step)})
        except Exception as err:  # another tracking store: the checkpoint's run is not there
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            print(f"autoencoder: cannot reopen MLflow run {run_id} ({first}); starting a new one")
            run_id = None
    if run_id is None:
        run_id = start_run(
            uri,
            config.tracking.experiment,
            f"{config.run.name}-autoencoder",
            config.flat(),
            tags={"ldm.stage": "autoencoder"},
            artifact_root=Path(config.run.root) / "mlartifacts",
        )
    tracker = tracker_for(
        0,
        uri,
        run_id,
        config.run_dir / "mlflow-spool",
        flush_timeout_s=config.tracking.flush_timeout_s,
    )
    print(f"autoencoder: MLflow run {run_id} at {uri}", flush=True)
    tracker.log_metrics({"perceptual_loss_enabled": float(losses.lpips is not None)}, start_step)
    if perceptual_off:
        tracker.set_tags({"ldm.perceptual_loss": f"off: {perceptual_off}"})
    # Stage 1 runs alone on the driver, so it takes every core it may use (Ray may have set
    # OMP_NUM_THREADS=1 for its workers, which would leave this run on one core).
    threads = torch.get_num_threads()
    torch.set_num_threads(_usable_cores())
    status = "FAILED"
    try:
        sums: dict[str, float] = {}
        seen: dict[str, int] = {}
        loop_start = window_start = time.perf_counter()
        window_steps = 0
        bar = tqdm(
            range(start_step + 1, ae.num_steps + 1),
            initial=start_step,
            total=ae.num_steps,
            desc="autoencoder",
            disable=not progress,
        )
        for step in bar:
            x = random_crops(train, ae.batch_size, crop, generator).to(device)
            for name, value in losses.step(x, step).items():
                sums[name] = sums.get(name, 0.0) + value.item()
                seen[name] = seen.get(name, 0) + 1
            window_steps += 1
            if step % ae.log_every == 0 or step == ae.num_steps:
                now = time.perf_counter()
                last = {k: v / seen[k] for k, v in sums.items()}
                last["steps_per_second"] = window_steps / (now - window_start)
                last["learning_rate"] = scheduler.get_last_lr()[0]
                tracker.log_metrics(last, step)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                sums, seen = {}, {}
                window_start, window_steps = now, 0
            if step % ae.checkpoint_every == 0 or step == ae.num_steps:
                state = {
                    "mlflow_run_id": run_id,
                    "config": _resume_key(config),
                    "rng": _rng_state(generator, device),
                    "last": last,
                }
                _save_checkpoint(config, step, modules, optimizers, state)
        train_seconds = time.perf_counter() - loop_start
        trained_steps = ae.num_steps - start_step

        vae.eval()
        recon = reconstruct(vae, test)
        baseline = bicubic_baseline(test, ae.downsample_factor)
        shift, scaling = latent_normalization(vae, train, generator)
        metrics = reconstruction_metrics(test, recon, baseline)
        if ae.regularization == "vq":
            metrics["codebook_usage"] = codebook_usage(vae, test)
            fold_vq_shift(vae, shift)
            vae.register_to_config(scaling_factor=scaling)
        else:
            vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
        metrics.update(
            {
                "scaling_factor": scaling,
                "shift_factor": shift,
                "steps": float(ae.num_steps),
                "resumed_at_step": float(start_step),
                "final_loss": last.get("loss", math.nan),
                "train_images": float(counts["train"]),
                "holdout_images": float(counts["holdout"]),
                "undecodable": float(counts["undecodable"]),
                "train_crop": float(crop),
                "perceptual_loss_enabled": float(losses.lpips is not None),
                "mean_steps_per_second": trained_steps / train_seconds if trained_steps else 0.0,
                "load_seconds": load_seconds,
                "train_seconds": train_seconds,
                "seconds": time.perf_counter() - began,
            }
        )
        vae.cpu()
        # Saved before anything else is logged, so a tracking hiccup cannot cost the training.
        _publish(vae, metrics, config.autoencoder_dir)
        # Which MLflow run trained these weights: training runs link back to it.
        (config.autoencoder_dir / "lineage.json").write_text(json.dumps({"mlflow_run_id": run_id}))
        tracker.log_metrics(metrics, ae.num_steps)
        shown = min(GRID_IMAGES, len(test))
        # Rows: originals, autoencoder reconstructions, bicubic baseline.
        tracker.log_image(
            grid(np.concatenate([test[:shown], recon[:shown], baseline[:shown]]), shown),
            "reconstructions",
            ae.num_steps,
        )
        tracker.log_artifact(config.autoencoder_dir / "metrics.json")
        f = ae.downsample_factor
        print(
            f"autoencoder: held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
            f"rFD {metrics['rfd_efficientnet_lite0']:.2f} (bicubic x{f}: "
            f"{metrics['psnr_bicubic']:.2f} dB, {metrics['ssim_bicubic']:.4f}, "
            f"{metrics['rfd_efficientnet_lite0_bicubic']:.2f}), scaling factor {scaling:.4f}, "
            f"{metrics['seconds']:.0f} s; saved to {config.autoencoder_dir}",
            flush=True,
        )
        status = "FINISHED"
        return metrics
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        torch.set_num_threads(threads)
        tracker.close()
        end_run(uri, run_id, status)
