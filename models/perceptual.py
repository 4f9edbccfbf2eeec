"""LPIPS (Zhang et al., 2018), the perceptual loss of the LDM paper's stage 1, from local files.

The `lpips` package fetches its VGG16 backbone from torchvision's model hub at run time, which
an offline cluster cannot reach, and torchvision is not a dependency here. So the network is
rebuilt in a few lines (VGG16's convolutional part, in torchvision's layer numbering, and the
five learned 1x1 "lin" layers) and both weight files are read from `autoencoder.lpips_path`:

- `vgg16-397923af.pth`: torchvision's ImageNet VGG16 state dict (only `features.*` is used);
- `vgg.pth`: the lpips package's v0.1 linear layers (`lpips/weights/v0.1/vgg.pth`, the same
  file taming-transformers calls `vgg_lpips`).

Without them the perceptual loss stays off (the caller says so); random weights would be a
different loss under the same name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.errors import LdmError

BACKBONE_FILE = "vgg16-397923af.pth"
LINEAR_FILE = "vgg.pth"
# VGG16's feature stack as torchvision builds it: channels, "M" for a max pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# LPIPS compares relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3: these end indices in
# `features` (exclusive) cut it into the five slices that produce them.
_SLICE_ENDS = (4, 9, 16, 23, 30)
_CHANNELS = (64, 128, 256, 512, 512)


def missing_files(path: str | None) -> str | None:
    """Why LPIPS cannot be loaded from `path` (a short reason), or None when it can."""
    if not path:
        return "autoencoder.lpips_path is not set"
    folder = Path(path)
    absent = [name for name in (BACKBONE_FILE, LINEAR_FILE) if not (folder / name).is_file()]
    if absent:
        return f"no {' and '.join(absent)} in autoencoder.lpips_path={folder}"
    return None


class LPIPS(nn.Module):
    """Learned perceptual distance of two image batches in [-1, 1]: (N,) per image."""

    def __init__(self, folder: str | Path):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=False)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        # The input scaling LPIPS was trained with ([-1, 1] images, ImageNet statistics).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self._load(Path(folder))
        self.eval().requires_grad_(False)

    def _load(self, folder: Path) -> None:
        try:
            # weights_only: plain tensors, nothing in the files runs as code.
            backbone = torch.load(folder / BACKBONE_FILE, map_location="cpu", weights_only=True)
            linear = torch.load(folder / LINEAR_FILE, map_location="cpu", weights_only=True)
            features = {
                k.removeprefix("features."): v
                for k, v in backbone.items()
                if k.startswith("features.")
            }
            self.features.load_state_dict(features)
            self.lins.load_state_dict(
                {f"{i}.weight": linear[f"lin{i}.model.1.weight"] for i in range(len(self.lins))}
            )
        except Exception as err:  # a wrong or truncated file: name it, not a stack trace
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise LdmError(
                f"autoencoder.lpips_path={folder}: {BACKBONE_FILE} must be torchvision's VGG16 "
                f"state dict and {LINEAR_FILE} the lpips v0.1 linear layers ({reason})"
            ) from None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h_x, h_y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = x.new_zeros(x.shape[0])
        start = 0
        for end, lin in zip(_SLICE_ENDS, self.lins, strict=True):
            block = self.features[start:end]
            h_x, h_y = block(h_x), block(h_y)
            start = end
            # Unit-normalise each position's feature vector, then a learned weighted distance.
            n_x = h_x / (h_x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            n_y = h_y / (h_y.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((n_x - n_y).square()).mean(dim=(1, 2, 3))
        return total
