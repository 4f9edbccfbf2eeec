"""Stage 1's images: the raw shards decoded into memory once (a held-out set split off by
key hash), and the random crops each rank draws from them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from core.config import ExperimentConfig
from core.errors import LdmError
from data_pipeline.images import (
    ShardReadReport,
    image_bytes,
    list_shards,
    read_shard,
    resize_crop,
    to_model_range,
    try_decode,
)

# The whole dataset is held in memory as uint8 (N x res x res x 3 bytes): ~3,800 demo emoji at
# 64 px are 47 MB. Past this budget (~21,000 images at 256 px; splitting off the held-out set
# briefly doubles it) further shards are not read: a stage-1 autoencoder learns local image
# statistics and does not need every image, and the budget keeps a large dataset from
# exhausting the driver's memory.
MAX_PIXEL_BYTES = 4 << 30


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
