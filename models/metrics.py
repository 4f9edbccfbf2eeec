"""Image-quality metrics shared by stage 1's evaluation, the UNet's FID-style evaluation
and `ldm cache verify`: PSNR, SSIM, the Frechet distance of feature sets, and the bicubic
down-and-up baseline every f-times smaller representation must beat."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


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


def frechet_distance_few(a: np.ndarray, b: np.ndarray) -> float:
    """`frechet_distance`, computed exactly for few samples.

    With n samples of d-dim features (64 of 1280 here) the covariances have rank < n, and
    Tr((S_a S_b)^(1/2)) is the sum of the singular values of A B^T / sqrt((n_a-1)(n_b-1)),
    A and B the centred features (the nonzero eigenvalues of A^T A B^T B are those of
    (A B^T)(A B^T)^T): an n x n problem instead of three d x d eigendecompositions, which
    take seconds on a CPU. With more samples than dimensions the d x d form is cheaper.
    """
    if min(len(a), len(b)) > a.shape[1]:
        return frechet_distance(a, b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = a - mu_a, b - mu_b
    na, nb = len(a) - 1, len(b) - 1
    trace_root = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / math.sqrt(na * nb)
    traces = (ca**2).sum() / na + (cb**2).sum() / nb
    return float(((mu_a - mu_b) ** 2).sum() + traces - 2 * trace_root)
