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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import storage
from core.errors import LdmError

FORMAT = "ldm-latent-cache/2"
MANIFEST = "manifest.json"
EMPTY_PROMPT = "empty_prompt.npy"


def spec_digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def default_cache_dir(root: str, spec: dict[str, Any]) -> str:
    """`<root>/cache/<spec digest>`: two specs never share a folder."""
    return storage.join(root, "cache", spec_digest(spec)[:16])


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_manifest(cache_dir: str, manifest: dict[str, Any]) -> None:
    storage.write_bytes(
        storage.join(cache_dir, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode()
    )


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    path = storage.join(cache_dir, MANIFEST)
    if not storage.exists(path):
        raise LdmError(
            f"no latent cache at {cache_dir} (no {MANIFEST}): run `ldm precompute CONFIG`"
        )
    manifest = json.loads(storage.read_bytes(path))
    if manifest.get("format") != FORMAT:
        raise LdmError(
            f"{path}: unknown cache format {manifest.get('format')!r}, expected {FORMAT}"
        )
    return manifest


def cache_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every cache tar of a manifest, in order: a raw shard's one tar, or with aspect-ratio
    buckets its tar per bucket (`parts`: name, bucket [height, width], num_samples, sha256)."""
    return [part for entry in manifest["shards"] for part in entry.get("parts", [entry])]


def bucket_histogram(manifest: dict[str, Any]) -> dict[str, int]:
    """Samples per image size `HxW` (height x width) of a cache, largest first."""
    spec = manifest["spec"]
    square = [spec["resolution"], spec["resolution"]]
    counts: dict[str, int] = {}
    for part in cache_files(manifest):
        height, width = part.get("bucket", square)
        counts[f"{height}x{width}"] = counts.get(f"{height}x{width}", 0) + part["num_samples"]
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def read_empty_prompt(cache_dir: str | Path) -> np.ndarray:
    """The stored encoding of the empty prompt (hidden states, or token ids), unpadded."""
    return npy_load(storage.read_bytes(storage.join(cache_dir, EMPTY_PROMPT)))


def check_spec(
    cache_dir: str | Path,
    manifest: dict[str, Any],
    expected: dict[str, Any],
    fix: str = "re-run `ldm precompute CONFIG` or configure what the cache was built with",
) -> None:
    """Refuse a cache built from another spec, naming the first field that differs."""
    built = manifest["spec"]
    for key in sorted(set(built) | set(expected)):
        if built.get(key) != expected.get(key):
            raise LdmError(
                f"latent cache {cache_dir} was built with {key}={_short(built.get(key))} but the "
                f"config gives {key}={_short(expected.get(key))}: {fix}"
            )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 32 else text[:12] + "…" + text[-16:]


def source_change(entry: dict, source: str, fingerprint: dict[str, Any] | None) -> str | None:
    """Why the raw shard `source` no longer holds what `entry` was encoded from, or None.

    Size and version (mtime or ETag) decide at once when they match; when they differ the
    shard is hashed, so a file copied or touched with the same bytes is not encoded again."""
    identity = entry.get("source_identity")
    if not identity or not identity.get("sha256"):
        return "cached without a record of its source"
    if fingerprint is None:
        return f"{source} is gone"
    if all(identity.get(k) == fingerprint[k] for k in ("size", "version")):
        return None
    if identity["size"] == fingerprint["size"] and storage.sha256(source) == identity["sha256"]:
        return None
    return f"{source} changed since it was encoded (size, modification time or ETag differ)"


def source_problems(manifest: dict[str, Any]) -> tuple[int, dict[str, str]]:
    """How many of a cache's raw shards are still there, and why each of those that changed
    since it was encoded no longer matches (by cache shard name). One listing per folder."""
    entries = [e for e in manifest["shards"] if e.get("source")]
    found = storage.fingerprints([e["source"] for e in entries])
    changed = {
        e["name"]: why
        for e in entries
        if e["source"] in found and (why := source_change(e, e["source"], found[e["source"]]))
    }
    return len(found), changed


def check_sources(cache_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Refuse a cache whose raw shards changed since they were encoded (a re-shard after
    fixing captions, a dataset rewritten in place). Shards that are gone are not checked:
    a cache is complete without its sources."""
    _, changed = source_problems(manifest)
    if changed:
        name, why = next(iter(changed.items()))
        raise LdmError(
            f"latent cache {cache_dir}: {name}: {why}; re-run `ldm precompute CONFIG` to "
            "encode it again"
        )


@dataclass
class CacheBatch:
    """One micro-batch as training consumes it."""

    moments: torch.Tensor
    """(B, V, M, h, w) float32: V stored views (the image, and its mirror image when cached);
    M = 2C channels (mean and log-variance of q(z|x)) or C (the mean only)."""
    context: torch.Tensor
    """(B, L, D) float32 text hidden states, zero beyond each caption; or (B, L) int64 ids."""
    mask: torch.Tensor
    """(B, L) bool, True on real tokens."""
    has_logvar: bool = True
    """False for a cache of posterior means: the latent is the mean, nothing to draw."""


def read_sample(sample: dict[str, bytes]) -> tuple[list[np.ndarray], np.ndarray]:
    """A cache tar sample as (latent views, text): hidden states or token ids."""
    views = [npy_load(sample["moments.npy"])]
    if "flip.npy" in sample:
        views.append(npy_load(sample["flip.npy"]))
    return views, npy_load(sample["text.npy"])


def collate(
    samples: list[tuple[list[np.ndarray], np.ndarray]], max_length: int, has_logvar: bool = True
) -> CacheBatch:
    moments = torch.from_numpy(np.stack([np.stack(v) for v, _ in samples]).astype(np.float32))
    token_ids = samples[0][1].ndim == 1
    dtype = np.int64 if token_ids else np.float32
    shape = (len(samples), max_length, *samples[0][1].shape[1:])
    context = torch.zeros(shape, dtype=torch.int64 if token_ids else torch.float32)  # 0 = [PAD]
    mask = torch.zeros(len(samples), max_length, dtype=torch.bool)
    for i, (_, text) in enumerate(samples):
        n = min(len(text), max_length)
        context[i, :n] = torch.from_numpy(text[:n].astype(dtype))
        mask[i, :n] = True
    return CacheBatch(moments, context, mask, has_logvar)
