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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

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


def check_enough_shards(
    cache_dir: str | Path, manifest: dict[str, Any], world_size: int, num_loader_workers: int
) -> None:
    """Each rank x loader worker reads its own shards, so there must be at least that many."""
    available = sum(1 for s in manifest["shards"] if s["num_samples"])
    needed = world_size * max(1, num_loader_workers)
    if available < needed:
        raise LdmError(
            f"latent cache {cache_dir} has {available} non-empty shards but {world_size} ranks x "
            f"{max(1, num_loader_workers)} loader workers need at least {needed}: lower "
            "train.num_workers or train.num_loader_workers, or write more, smaller shards "
            "(ldm shards --samples-per-shard)"
        )


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


def _read_cache_shard(path: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    from data_pipeline.images import read_shard

    for sample in read_shard(path):
        yield npy_load(sample["moments.npy"]), npy_load(sample["text.npy"])


class LatentCacheStream(IterableDataset):
    """An endless, deterministic stream of micro-batches for one rank.

    Each epoch the shard list is permuted by (seed, epoch) and dealt round-robin to the
    `world_size x num_loader_workers` streams, so every stream reads disjoint shards; within
    a stream, its shards are read side by side and samples shuffled in a buffer seeded by
    (seed, epoch, stream). The stream is endless, so every rank yields as many batches as the
    step count asks for: no rank runs dry while another waits in a collective.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        num_loader_workers: int,
        seed: int,
        start_batch: int = 0,
        shuffle_buffer: int = 1024,
    ):
        manifest = read_manifest(cache_dir)
        self.shards = [
            str(Path(cache_dir) / s["name"]) for s in manifest["shards"] if s["num_samples"]
        ]
        self.max_length = int(manifest["spec"]["text_max_length"])
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = micro_batch_size
        self.num_streams = world_size * max(1, num_loader_workers)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.num_loader_workers = max(1, num_loader_workers)
        self.start_batch = start_batch
        check_enough_shards(cache_dir, manifest, world_size, num_loader_workers)

    def _position(self) -> tuple[int, int]:
        """(stream index, batches of it already consumed) for this loader worker.

        A DataLoader takes batches from its workers round-robin, starting at worker 0. After
        `start_batch` batches the next one is due from worker `start_batch % W`, so worker j
        continues the stream that was at position (j + start_batch) % W, skipping what that
        stream already delivered: the resumed sequence equals the uninterrupted one.
        """
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        w = self.num_loader_workers
        local = (worker + self.start_batch) % w
        consumed = (self.start_batch - local + w - 1) // w
        return self.rank * w + local, consumed

    def samples(self, stream: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        epoch = 0
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            rng = np.random.default_rng([self.seed, epoch, stream])
            buffer: list = []
            # Read this stream's shards side by side: a shard often holds similar samples
            # (written in file-name order), and a buffer alone would not mix them.
            readers = [_read_cache_shard(self.shards[i]) for i in order[stream :: self.num_streams]]
            while readers:
                for reader in list(readers):
                    sample = next(reader, None)
                    if sample is None:
                        readers.remove(reader)
                        continue
                    buffer.append(sample)
                    if len(buffer) >= self.shuffle_buffer:
                        yield buffer.pop(int(rng.integers(len(buffer))))
            while buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))
            epoch += 1

    def __iter__(self) -> Iterator[CacheBatch]:
        stream, consumed = self._position()
        samples = self.samples(stream)
        for _ in range(consumed * self.micro_batch_size):
            next(samples)
        batch = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.micro_batch_size:
                yield collate(batch, self.max_length)
                batch = []
