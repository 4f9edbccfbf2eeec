"""The latent cache: its on-disk format, its manifest, and the stream training reads from it.

A cache folder holds webdataset tar shards (one per raw shard) and `manifest.json`. Each
sample stores the autoencoder posterior moments (mean and log-variance, so training draws
a fresh latent every time) and the text encoder's hidden states of the real tokens only (no
padding). The empty-prompt embedding is stored once, so caption dropout happens at train
time. The manifest's `spec` records everything that determines the content; the folder name
derives from it, and training refuses a cache whose spec differs from its own config.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.errors import LdmError

FORMAT = "ldm-latent-cache/1"
MANIFEST = "manifest.json"
EMPTY_PROMPT = "empty_prompt.npy"


def spec_digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def default_cache_dir(root: str | Path, spec: dict[str, Any]) -> Path:
    """`<root>/cache/<spec digest>`: two specs never share a folder."""
    return Path(root) / "cache" / spec_digest(spec)[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(cache_dir: Path, manifest: dict[str, Any]) -> None:
    write_atomic(cache_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise LdmError(
            f"no latent cache at {cache_dir} (no {MANIFEST}): run `ldm precompute CONFIG`"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise LdmError(
            f"{path}: unknown cache format {manifest.get('format')!r}, expected {FORMAT}"
        )
    return manifest


def check_spec(cache_dir: Path, manifest: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a cache built from another spec, naming the first field that differs."""
    built = manifest["spec"]
    for key in sorted(set(built) | set(expected)):
        if built.get(key) != expected.get(key):
            raise LdmError(
                f"latent cache {cache_dir} was built with {key}={_short(built.get(key))} but the "
                f"config gives {key}={_short(expected.get(key))}: re-run `ldm precompute CONFIG` "
                "or configure what the cache was built with"
            )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:20] + "…"


@dataclass
class CacheBatch:
    """One micro-batch as training consumes it."""

    moments: torch.Tensor  # (B, 2C, h, w) float32: mean and log-variance of q(z|x)
    context: torch.Tensor  # (B, L, D) float32, zero beyond each caption's tokens
    mask: torch.Tensor  # (B, L) bool, True on real tokens


def collate(samples: list[tuple[np.ndarray, np.ndarray]], max_length: int) -> CacheBatch:
    moments = torch.from_numpy(np.stack([m for m, _ in samples]).astype(np.float32))
    dim = samples[0][1].shape[-1]
    context = torch.zeros(len(samples), max_length, dim)
    mask = torch.zeros(len(samples), max_length, dtype=torch.bool)
    for i, (_, text) in enumerate(samples):
        n = min(len(text), max_length)
        context[i, :n] = torch.from_numpy(text[:n].astype(np.float32))
        mask[i, :n] = True
    return CacheBatch(moments, context, mask)
