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

It trains as the UNet stage does: `autoencoder.num_workers` Ray Train workers, each a
DeepSpeed rank (`autoencoder.zero_stage`) drawing its own share of the global batch of
crops, with the autoencoder and the discriminator each in an engine of its own. The driver
checks the config, the resume state and the data before any worker starts, owns the MLflow
run, and hands the images to the workers through Ray's object store; rank 0 alone logs,
commits checkpoints, evaluates and publishes (`Rank0`; the other ranks hold a `NullRank0`).

Training checkpoints every `autoencoder.checkpoint_every` steps into
`<run>/autoencoder-checkpoints/step_<8-digit step>`: both engines' DeepSpeed checkpoints
(weights, optimizer and LR-schedule state, ZeRO shards) and a JSON state with every rank's
RNG, sealed by a commit marker as training checkpoints are. A rerun continues from the
newest committed one: an interrupted run ends with the weights an uninterrupted one has.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
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
# A checkpoint tag holds one DeepSpeed checkpoint per engine, in these subfolders.
AUTOENCODER_ENGINE, DISCRIMINATOR_ENGINE = "autoencoder", "discriminator"
# Settings that do not change what is trained: a checkpoint resumes under any value of these.
_NOT_RESUME_RELEVANT = {"log_every", "checkpoint_every"}


def checkpoint_dir(config: ExperimentConfig) -> Path:
    return config.run_dir / CHECKPOINT_DIR


def _resume_key(config: ExperimentConfig) -> dict[str, object]:
    """The settings a checkpoint must share with the run that continues it (`num_workers`
    among them: each rank's crop stream is in the checkpoint)."""
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
    if "world_size" not in state:
        raise LdmError(
            f"{tag}: a checkpoint of the single-process stage 1 of earlier versions, which "
            f"its DeepSpeed engines cannot load; delete {root} to train from scratch"
        )
    return tag, state


def _rank_generator(seed: int, rank: int) -> torch.Generator:
    """Seed this rank's random streams from (seed, rank): torch's global RNG (KL posterior
    samples) and the returned generator of its crops. Ranks draw different crops and noise;
    a rerun draws the same ones."""
    crops, noise = np.random.SeedSequence([seed, rank]).generate_state(2)
    torch.manual_seed(int(noise))
    return torch.Generator().manual_seed(int(crops))


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


# --- one training step ---------------------------------------------------------------------


@dataclass
class _Critics:
    """What judges the autoencoder's output without being trained by its optimizer: the
    frozen LPIPS network, and the discriminator (trained by its own engine)."""

    lpips: torch.nn.Module | None
    disc: torch.nn.Module | None


class _AutoencoderLoss(torch.nn.Module):
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

    def __init__(self, config: ExperimentConfig, vae: torch.nn.Module, critics: _Critics):
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
            from training.discriminator import adaptive_weight, generator_loss

            g_loss = generator_loss(self.critics.disc(x_hat))
            weight = adaptive_weight(rec, g_loss, vae.decoder.conv_out.weight)
            loss = loss + ae.discriminator_weight * weight * g_loss
            logged.update(g_loss=g_loss.detach(), adaptive_weight=weight)
        logged["loss"] = loss.detach()
        return loss, x_hat.detach(), logged


class _DiscriminatorLoss(torch.nn.Module):
    """The PatchGAN's hinge loss on real images and (detached) reconstructions, as the
    module its DeepSpeed engine runs."""

    def __init__(self, disc: torch.nn.Module):
        super().__init__()
        self.disc = disc

    def forward(
        self, x: torch.Tensor, x_hat: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from training.discriminator import hinge_d_loss

        logits_real, logits_fake = self.disc(x), self.disc(x_hat)
        d_loss = hinge_d_loss(logits_real, logits_fake)
        logged = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, logged


class _Step:
    """One training step of a rank: the autoencoder engine's update, then, from
    `discriminator_start_step` on, the discriminator engine's."""

    def __init__(self, config: ExperimentConfig, engine, d_engine, critics: _Critics):
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


def _perceptual_off(config: ExperimentConfig) -> str | None:
    """Why the perceptual loss is off though asked for (no weights on disk), else None."""
    from training.perceptual import missing_files

    ae = config.autoencoder
    return missing_files(ae.lpips_path) if ae.perceptual_weight > 0 else None


def _perceptual(config: ExperimentConfig, device: torch.device) -> torch.nn.Module | None:
    """The LPIPS module when the perceptual loss is on, else None."""
    from training.perceptual import LPIPS

    ae = config.autoencoder
    if ae.perceptual_weight == 0 or _perceptual_off(config) is not None:
        return None
    return LPIPS(ae.lpips_path).to(device)


# --- rank 0's side effects ----------------------------------------------------------------


class Rank0:
    """What only the first rank does: MLflow, progress lines, the checkpoint's JSON state and
    commit, and at the end the evaluation and the published model."""

    def __init__(self, config: ExperimentConfig, run_id: str, progress: bool):
        from training.tracking import tracker_for

        self.config, self.run_id, self.progress = config, run_id, progress
        self.tracker = tracker_for(
            0,
            config.tracking_uri,
            run_id,
            config.run_dir / "mlflow-spool",
            flush_timeout_s=config.tracking.flush_timeout_s,
        )

    def start(self, perceptual: bool, step: int) -> None:
        started = {"perceptual_loss_enabled": float(perceptual)}
        started["torch_threads_per_worker"] = float(torch.get_num_threads())
        self.tracker.log_metrics(started, step)
        if off := _perceptual_off(self.config):
            self.tracker.set_tags({"ldm.perceptual_loss": f"off: {off}"})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)
        if self.progress:
            print(
                f"autoencoder: step {step}/{self.config.autoencoder.num_steps} "
                f"loss {metrics['loss']:.4f}, {metrics['steps_per_second']:.2f} steps/s",
                flush=True,
            )

    def clear(self, tag_dir: Path) -> None:
        shutil.rmtree(tag_dir, ignore_errors=True)  # what a save cut short by a crash left
        tag_dir.mkdir(parents=True)

    def commit(self, tag_dir: Path, state: dict) -> None:
        """Write the JSON state, seal the tag (every rank's files are written), prune."""
        from data_pipeline.cache import write_atomic
        from training import checkpoint as ckpt

        write_atomic(tag_dir / STATE_FILE, json.dumps(state).encode())
        ckpt.commit(tag_dir)
        ckpt.prune(tag_dir.parent, KEEP_CHECKPOINTS)

    def finish(
        self,
        vae: torch.nn.Module,
        train: np.ndarray,
        test: np.ndarray,
        generator: torch.Generator,
        facts: dict[str, float],
    ) -> dict[str, float]:
        """Evaluate held out, set the latent normalisation, publish the model; its metrics."""
        from training.sampling import grid

        ae = self.config.autoencoder
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
        metrics.update({"scaling_factor": scaling, "shift_factor": shift, **facts})
        metrics["seconds"] = time.time() - metrics.pop("started_at")  # the whole job's
        vae.cpu()
        target = self.config.autoencoder_dir
        # Saved before anything else is logged, so a tracking hiccup cannot cost the training.
        _publish(vae, metrics, target)
        # Which MLflow run trained these weights: training runs link back to it.
        (target / "lineage.json").write_text(json.dumps({"mlflow_run_id": self.run_id}))
        self.tracker.log_metrics(metrics, ae.num_steps)
        shown = min(GRID_IMAGES, len(test))
        # Rows: originals, autoencoder reconstructions, bicubic baseline.
        self.tracker.log_image(
            grid(np.concatenate([test[:shown], recon[:shown], baseline[:shown]]), shown),
            "reconstructions",
            ae.num_steps,
        )
        self.tracker.log_artifact(target / "metrics.json")
        return metrics

    def close(self) -> None:
        self.tracker.close()


class NullRank0(Rank0):
    """Every other rank: the same calls, doing nothing."""

    def __init__(self):  # noqa: D107 - nothing to build on other ranks
        pass

    def start(self, perceptual, step):  # noqa: D102
        pass

    def log(self, metrics, step):  # noqa: D102
        pass

    def clear(self, tag_dir):  # noqa: D102
        pass

    def commit(self, tag_dir, state):  # noqa: D102
        pass

    def finish(self, vae, train, test, generator, facts):  # noqa: D102
        return {}

    def close(self):  # noqa: D102
        pass


# --- one rank's training --------------------------------------------------------------------


def _reduce_means(sums: dict[str, float], counts: dict[str, int], device) -> dict[str, float]:
    """Each logged term's mean over this window's steps and over all ranks: one all-reduce
    (every rank logs the same terms at the same steps, so the sorted keys line up)."""
    import torch.distributed as dist

    keys = sorted(sums)
    totals = torch.tensor([sums[k] / counts[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    world = dist.get_world_size()
    return {k: v / world for k, v in zip(keys, totals.tolist(), strict=True)}


def _save_checkpoint(
    root: Path,
    step: int,
    engines: dict[str, object],
    rng: dict,
    state: dict,
    main: Rank0,
) -> Path:
    """A collective save: every rank writes its part of each engine's DeepSpeed checkpoint
    into `<tag>/<engine>/`, then rank 0 writes the JSON state (with every rank's RNG) and
    commits the tag after a barrier."""
    import torch.distributed as dist

    from training import checkpoint as ckpt
    from training.engine import save_engine

    tag_dir = root / ckpt.tag_for(step)
    main.clear(tag_dir)
    dist.barrier()  # the tag folder is empty and exists before anyone writes into it
    rngs: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(rngs, rng)
    for name, engine in engines.items():
        save_engine(engine, tag_dir, name)
    dist.barrier()  # every rank's files are on disk before the tag is sealed
    state = {**state, "step": step, "world_size": len(rngs)}
    state["rng"] = {str(r): s for r, s in enumerate(rngs)}
    main.commit(tag_dir, state)
    return tag_dir


def train_worker(
    config: ExperimentConfig,
    train: np.ndarray,
    test: np.ndarray,
    run_id: str,
    resume_from: str | None,
    facts: dict[str, float],
    threads: int,
    progress: bool = True,
) -> dict[str, float]:
    """One rank's whole stage 1 inside an initialised torch.distributed group: build both
    engines, resume from `resume_from` (a verified committed tag), train to
    `autoencoder.num_steps`, checkpoint; rank 0 then evaluates and publishes. Returns the
    published metrics on rank 0, {} elsewhere. `facts`: the driver's data counts and
    timings, published with the metrics; `threads`: torch threads of this rank."""
    import torch.distributed as dist

    from training.discriminator import NLayerDiscriminator
    from training.engine import autoencoder_deepspeed_config, build_module_engine, load_engine
    from training.models import build_autoencoder

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(threads)
    ae = config.autoencoder
    crop, micro_batch = train_crop(config), ae.batch_size // world

    # The same seed on every rank gives identical initial weights.
    torch.manual_seed(config.run.seed)
    vae = build_autoencoder(config).train()
    disc = None
    if ae.discriminator_weight > 0:
        disc = NLayerDiscriminator(num_layers=ae.discriminator_layers).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=ae.learning_rate, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(ae.num_steps))
    critics = _Critics(lpips=None, disc=disc)
    loss_module = _AutoencoderLoss(config, vae, critics)
    size = sum(p.numel() for p in vae.parameters())
    engine = build_module_engine(
        loss_module, optimizer, autoencoder_deepspeed_config(config, world, size), scheduler
    )
    engines = {AUTOENCODER_ENGINE: engine}
    d_engine = None
    if disc is not None:
        # Adam with beta1 = 0.5 and a constant rate, as the paper's code trains it.
        d_optimizer = torch.optim.Adam(
            disc.parameters(),
            lr=ae.discriminator_learning_rate or ae.learning_rate,
            betas=(0.5, 0.9),
        )
        size = sum(p.numel() for p in disc.parameters())
        d_engine = build_module_engine(
            _DiscriminatorLoss(disc), d_optimizer, autoencoder_deepspeed_config(config, world, size)
        )
        engines[DISCRIMINATOR_ENGINE] = d_engine
    device = engine.device
    critics.lpips = _perceptual(config, device)
    step_fn = _Step(config, engine, d_engine, critics)
    generator = _rank_generator(config.run.seed, rank)

    start_step, last = 0, {}
    if resume_from is not None:
        tag = Path(resume_from)
        for name, each in engines.items():
            load_engine(each, tag, name)
        state = json.loads((tag / STATE_FILE).read_text())
        _set_rng_state(state["rng"][str(rank)], generator, device)
        start_step, last = state["step"], state.get("last", {})

    main = Rank0(config, run_id, progress) if rank == 0 else NullRank0()
    try:
        main.start(critics.lpips is not None, start_step)
        sums: dict[str, float] = {}
        seen: dict[str, int] = {}
        loop_start = window_start = time.perf_counter()
        window_steps = 0
        for step in range(start_step + 1, ae.num_steps + 1):
            x = random_crops(train, micro_batch, crop, generator).to(device)
            for name, value in step_fn(x, step).items():
                sums[name] = sums.get(name, 0.0) + value.item()
                seen[name] = seen.get(name, 0) + 1
            window_steps += 1
            if step % ae.log_every == 0 or step == ae.num_steps:
                last = _reduce_means(sums, seen, device)
                now = time.perf_counter()
                last["steps_per_second"] = window_steps / (now - window_start)
                last["learning_rate"] = engine.get_lr()[0]
                main.log(last, step)
                sums, seen = {}, {}
                window_start, window_steps = now, 0
            if step % ae.checkpoint_every == 0 or step == ae.num_steps:
                state = {"mlflow_run_id": run_id, "config": _resume_key(config), "last": last}
                rng = _rng_state(generator, device)
                _save_checkpoint(checkpoint_dir(config), step, engines, rng, state, main)
        train_seconds = time.perf_counter() - loop_start
        trained_steps = ae.num_steps - start_step
        facts = {
            **facts,
            "steps": float(ae.num_steps),
            "resumed_at_step": float(start_step),
            "final_loss": last.get("loss", math.nan),
            "train_crop": float(crop),
            "world_size": float(world),
            "perceptual_loss_enabled": float(critics.lpips is not None),
            "mean_steps_per_second": trained_steps / train_seconds if trained_steps else 0.0,
            "train_seconds": train_seconds,
        }
        return main.finish(vae, train, test, generator, facts)
    finally:
        main.close()


# --- the driver ------------------------------------------------------------------------------


def _cpu_share(reserved: float, workers_on_node: int) -> int:
    """Torch threads of one worker: its share of its node's CPUs, at least its reservation.

    Ray sets OMP_NUM_THREADS to a worker's CPU reservation (`cluster.num_cpus_per_worker`, 1
    by default), which would leave a lone stage-1 worker on one core of a many-core node.
    The node's CPUs are what Ray counts there (container limits included), at most the cores
    this process may run on.
    """
    import ray

    node = ray.get_runtime_context().get_node_id()
    counted = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
    cpus = min(int(counted) or _usable_cores(), _usable_cores())
    return max(1, math.floor(reserved), cpus // max(1, workers_on_node))


# glibc hands large freed blocks back to the OS (above a threshold it moves at run time), so
# a step's big buffers are page-faulted in anew every step. Inside a DeepSpeed engine the
# demo's step took ~15,000 page faults (plain torch: ~2,300) and ran at 7.0 steps/s against
# plain torch's 8.0-8.3; with blocks up to 256 MB kept in the heap and 1 GB of free heap
# before trimming: ~40 faults a step and 8.3 steps/s (measured in one process, 2 threads).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824"


def runtime_env() -> dict:
    """Ray's runtime environment for this stage's workers (what `ray_session` is given)."""
    from orchestrator.launch import worker_env

    return {
        "env_vars": {
            **worker_env(),
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", MALLOC_TUNABLES),
            # Ray Train's print patch doubles every line a worker prints (Ray 2.60 tees it
            # whenever stdout is wrapped, and Ray's own wrapper always is in a worker).
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        }
    }


def _in_process(config: ExperimentConfig) -> bool:
    """One worker on this machine (no cluster address, not inside a Ray job) trains in this
    process: the same DeepSpeed rank, without Ray's start-up (seconds, against a stage that
    runs for minutes in the demo and seconds in tests)."""
    return (
        config.autoencoder.num_workers == 1
        and config.cluster.address is None
        and not os.environ.get("RAY_ADDRESS")
    )


def _keep_freed_memory() -> None:
    """MALLOC_TUNABLES for this process, set at run time (see `runtime_env`)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its defaults stay
        return
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    libc.mallopt(-3, 1 << 28)  # M_MMAP_THRESHOLD


def _train_in_process(config: ExperimentConfig, train, test, job: dict) -> None:
    import torch.distributed as dist

    from training.engine import forget_process_groups

    _keep_freed_memory()
    threads = torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what DeepSpeed reads
    with tempfile.TemporaryDirectory() as tmp:
        # A file rendezvous: a TCP store would listen on every interface.
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        forget_process_groups()  # of an earlier group in this process, if any
        dist.init_process_group(
            backend, init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1
        )
        try:
            train_worker(config, train, test, threads=_usable_cores(), **job)
        finally:
            dist.destroy_process_group()
            forget_process_groups()
            torch.set_num_threads(threads)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _ray_worker(loop_config: dict) -> None:
    """Entry point of each Ray Train worker."""
    import ray
    import ray.train

    context = ray.train.get_context()
    train, test = ray.get(loop_config["images"])  # zero-copy from the node's object store
    test = test.copy()  # small, and torch warns about read-only arrays it evaluates on
    config = ExperimentConfig.model_validate(loop_config["config"])
    threads = _cpu_share(config.cluster.num_cpus_per_worker, context.get_local_world_size())
    train_worker(config, train, test, threads=threads, **loop_config["job"])


def _train_on_ray(config: ExperimentConfig, train, test, job: dict) -> None:
    """`autoencoder.num_workers` Ray Train workers, each a DeepSpeed rank of `train_worker`."""
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.cluster import ray_session, worker_scaling
    from orchestrator.launch import _find_user_error

    # On the checkpoints' storage, which every node must share.
    ray_storage = checkpoint_dir(config).resolve() / "ray_train"
    with ray_session(config.cluster.address, runtime_env=runtime_env()):
        # Workers on one node map the same object-store copy of the images.
        images = [ray.put(train), ray.put(test)]
        del train, test
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={
                "config": config.to_dict(),
                "images": images,
                "job": job,
            },
            scaling_config=worker_scaling(config.cluster, config.autoencoder.num_workers),
            run_config=RunConfig(name=ray_storage.name, storage_path=str(ray_storage.parent)),
        )
        try:
            trainer.fit()
        except Exception as err:
            user_error = _find_user_error(err)
            if user_error is not None:
                raise user_error from None
            raise
        finally:
            # Nothing is reported to Ray Train (the tags and their commit markers are the
            # checkpoints): its folder holds only a storage-check marker.
            shutil.rmtree(ray_storage, ignore_errors=True)


def train_autoencoder(config: ExperimentConfig, progress: bool = True) -> dict[str, float]:
    """Train (or continue training), evaluate and save the stage-1 autoencoder; returns its
    metrics.

    The driver checks what it can (config, resume state, data) before any worker starts,
    owns the MLflow run, and runs `autoencoder.num_workers` Ray Train workers, each a
    DeepSpeed rank of `train_worker`; a single worker on this machine is that rank in this
    process (`_in_process`). With `autoencoder.pretrained` set there is nothing to
    train: it prints so and returns {}.
    """

    from training.tracking import end_run, reopen_run, start_run

    ae = config.autoencoder
    if ae.pretrained:
        print(
            f"autoencoder: autoencoder.pretrained is set ({ae.pretrained}); nothing to train, "
            "precompute uses it directly",
            flush=True,
        )
        return {}

    started_at = time.time()
    crop = train_crop(config)
    resume = _read_resume_state(config)  # before the data: a refused resume costs nothing
    began = time.perf_counter()
    train, test, counts = load_images(config)
    load_seconds = time.perf_counter() - began
    print(
        f"autoencoder: {counts['train']} training images, {counts['holdout']} held out, "
        f"{config.data.resolution}px (training on {crop}px crops), f={ae.downsample_factor}, "
        f"{ae.regularization.upper()}, {ae.num_workers} worker(s) at ZeRO-{ae.zero_stage}",
        flush=True,
    )
    perceptual_off = _perceptual_off(config)
    if perceptual_off:
        print(
            f"autoencoder: perceptual loss OFF: autoencoder.perceptual_weight="
            f"{ae.perceptual_weight}, but {perceptual_off} (LPIPS needs pretrained VGG16 "
            "weights on disk; nothing is downloaded); training without it",
            flush=True,
        )

    run_id = None
    if resume is not None:
        tag, state = resume
        run_id = state["mlflow_run_id"]
        print(
            f"autoencoder: resuming from {tag} (step {state['step']} of {ae.num_steps})",
            flush=True,
        )
    uri = config.tracking_uri
    tags = {"ldm.world_size": str(ae.num_workers), "ldm.zero_stage": str(ae.zero_stage)}
    if run_id is not None:
        try:
            reopen_run(uri, run_id, {"ldm.resumed_from": str(resume[1]["step"]), **tags})
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
            tags={"ldm.stage": "autoencoder", **tags},
            artifact_root=Path(config.run.root) / "mlartifacts",
        )
    print(f"autoencoder: MLflow run {run_id} at {uri}", flush=True)

    config = config.model_copy(deep=True)
    config.tracking.uri = uri  # workers must not re-derive it from their environment
    facts = {
        "train_images": float(counts["train"]),
        "holdout_images": float(counts["holdout"]),
        "undecodable": float(counts["undecodable"]),
        "load_seconds": load_seconds,
        "started_at": started_at,
    }
    job = {
        "run_id": run_id,
        "resume_from": str(resume[0]) if resume else None,
        "facts": facts,
        "progress": progress,
    }
    status = "FAILED"
    try:
        if _in_process(config):
            _train_in_process(config, train, test, job)
        else:
            _train_on_ray(config, train, test, job)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        end_run(uri, run_id, status)
    metrics = json.loads((config.autoencoder_dir / "metrics.json").read_text())
    f = ae.downsample_factor
    print(
        f"autoencoder: held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
        f"rFD {metrics['rfd_efficientnet_lite0']:.2f} (bicubic x{f}: "
        f"{metrics['psnr_bicubic']:.2f} dB, {metrics['ssim_bicubic']:.4f}, "
        f"{metrics['rfd_efficientnet_lite0_bicubic']:.2f}), scaling factor "
        f"{metrics['scaling_factor']:.4f}, {metrics['seconds']:.0f} s; saved to "
        f"{config.autoencoder_dir}",
        flush=True,
    )
    return metrics
