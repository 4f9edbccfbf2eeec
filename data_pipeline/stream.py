"""The stream training reads from the latent cache: deterministic, resumable, elastic.

Each epoch is planned in sample space, independent of how many ranks read it: the shards
are permuted by (seed, epoch) and their samples laid end to end; the `num_ranks x
num_loader_workers` streams then take equal contiguous chunks of that sequence (whole
micro-batches each, the remainder sits out this epoch), so every rank yields the same number
of batches per epoch and any number of shards works. A stream reads its pieces of shards
side by side (a shard often holds similar samples) through a shuffle buffer seeded by
(seed, epoch, segment, stream).

The cursor is the epoch plus how many batches each rank took under each layout used in this
epoch (a *segment*). Resuming on the same layout continues every stream where it stopped;
resuming on another layout (elastic restart) recomputes, in index space, exactly which
samples the earlier segments consumed and deals only the rest of the epoch to the new
streams: within an epoch no sample is repeated or skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from core import storage
from core.errors import LdmError
from data_pipeline.cache import CacheBatch, cache_files, collate, read_manifest, read_sample
from data_pipeline.images import read_shard


@dataclass(frozen=True)
class Layout:
    """How an epoch's samples are dealt: to ranks x loader workers, in micro-batches."""

    num_ranks: int
    num_loader_workers: int
    micro_batch_size: int

    @property
    def num_streams(self) -> int:
        return self.num_ranks * self.num_loader_workers

    def samples_per_stream(self, available: int) -> int:
        per_stream = available // self.num_streams
        return per_stream - per_stream % self.micro_batch_size

    def batches_per_rank(self, available: int) -> int:
        return self.num_loader_workers * self.samples_per_stream(available) // self.micro_batch_size


@dataclass
class DataCursor:
    """How far the data stream got: JSON-able, stored in every checkpoint's train state."""

    epoch: int = 0
    finished_segments: list[dict[str, int]] = field(default_factory=list)
    """Earlier layouts of this epoch: Layout fields plus `batches_per_rank` each took."""
    layout: dict[str, int] | None = None
    """The layout of the current segment (None before the first batch)."""
    batches_per_rank: int = 0
    """Batches each rank took in the current segment."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DataCursor:
        return cls(**data) if data else cls()


class EpochPlan:
    """Index-space plan of the epochs of one cache: which sample each stream reads, in order.

    With aspect-ratio buckets every cache shard holds one bucket (`shard_buckets`); a stream
    still reads its chunk in the same order, but groups what it reads per bucket and yields a
    micro-batch whenever a bucket has enough. How many batches a chunk can give depends on its
    bucket counts, so every stream of an epoch yields the smallest stream's number (known in
    index space): the ranks stay in step whatever the buckets.
    """

    def __init__(
        self,
        shard_sizes: list[int],
        seed: int,
        shuffle_buffer: int,
        shard_buckets: list[int] | None = None,
    ):
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        self.num_samples = int(self.offsets[-1])
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        buckets = shard_buckets if shard_buckets is not None else [0] * len(shard_sizes)
        self.shard_buckets = np.asarray(buckets, dtype=np.int64)
        self.num_buckets = int(self.shard_buckets.max(initial=0)) + 1

    def epoch_sequence(self, epoch: int) -> np.ndarray:
        """Global sample ids of the epoch: shards permuted by (seed, epoch), laid end to end."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_sizes))
        return np.concatenate(
            [np.arange(self.offsets[k], self.offsets[k + 1]) for k in order]
            or [np.zeros(0, np.int64)]
        )

    def chunk(self, remaining: np.ndarray, layout: Layout, stream: int) -> np.ndarray:
        per_stream = layout.samples_per_stream(len(remaining))
        return remaining[stream * per_stream : (stream + 1) * per_stream]

    def pieces(self, chunk: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """The chunk as (shard, ascending in-shard indices) runs, in chunk order."""
        shards = np.searchsorted(self.offsets, chunk, side="right") - 1
        cuts = np.flatnonzero(np.diff(shards)) + 1
        return [
            (int(shards[run[0]]), np.sort(chunk[run] - self.offsets[shards[run[0]]]))
            for run in np.split(np.arange(len(chunk)), cuts)
            if len(run)
        ]

    def emit(
        self,
        pieces: list[tuple[int, np.ndarray]],
        key: list[int],
        read: Callable[[int, np.ndarray], Iterator[Any]],
    ) -> Iterator[Any]:
        """Read pieces side by side through a shuffle buffer; `read(shard, indices)` yields items.

        The same function orders real samples and, with a reader of plain ids, computes in
        index space which samples a stream delivered.
        """
        rng = np.random.default_rng([self.seed, *key])
        readers = [read(shard, indices) for shard, indices in pieces]
        buffer: list[Any] = []
        while readers:
            for reader in list(readers):
                item = next(reader, None)
                if item is None:
                    readers.remove(reader)
                    continue
                buffer.append(item)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def batches_per_stream(self, remaining: np.ndarray, layout: Layout) -> int:
        """Micro-batches each stream yields from `remaining`: the same for every stream."""
        mb = layout.micro_batch_size
        if self.num_buckets == 1:
            return layout.samples_per_stream(len(remaining)) // mb
        shards = np.searchsorted(self.offsets, remaining, side="right") - 1
        buckets = self.shard_buckets[shards]
        return min(
            int(
                (
                    np.bincount(self.chunk(buckets, layout, s), minlength=self.num_buckets) // mb
                ).sum()
            )
            for s in range(layout.num_streams)
        )

    def batches(
        self,
        pieces: list[tuple[int, np.ndarray]],
        key: list[int],
        read: Callable[[int, np.ndarray], Iterator[Any]],
        micro_batch_size: int,
        limit: int,
    ) -> Iterator[list[Any]]:
        """The first `limit` micro-batches of `emit`'s order, each drawn from one bucket: an
        item joins its bucket's queue, and a full queue is a batch."""
        if limit <= 0:
            return
        queues: dict[int, list[Any]] = {}

        def tagged(shard: int, indices: np.ndarray) -> Iterator[tuple[int, Any]]:
            bucket = int(self.shard_buckets[shard])
            return ((bucket, item) for item in read(shard, indices))

        for bucket, item in self.emit(pieces, key, tagged):
            queue = queues.setdefault(bucket, [])
            queue.append(item)
            if len(queue) == micro_batch_size:
                yield queue
                queues[bucket] = []
                limit -= 1
                if limit == 0:
                    return

    def remaining(self, epoch: int, finished: list[dict[str, int]]) -> np.ndarray:
        """Sample ids of the epoch that the finished segments did not consume, in order."""
        sequence = self.epoch_sequence(epoch)
        for index, segment in enumerate(finished):
            layout = Layout(
                segment["num_ranks"], segment["num_loader_workers"], segment["micro_batch_size"]
            )
            taken: list[int] = []
            for stream in range(layout.num_streams):
                worker = stream % layout.num_loader_workers
                count = _stream_batches(segment["batches_per_rank"], worker, layout)
                batches = self.batches(
                    self.pieces(self.chunk(sequence, layout, stream)),
                    [epoch, index, stream],
                    lambda shard, idx: iter((self.offsets[shard] + idx).tolist()),
                    layout.micro_batch_size,
                    count,
                )
                taken += [i for batch in batches for i in batch]
            sequence = sequence[~np.isin(sequence, taken)]
        return sequence


def _nonempty_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in cache_files(manifest) if f["num_samples"]]


def epoch_plan(manifest: dict[str, Any], seed: int = 0, shuffle_buffer: int = 1024) -> EpochPlan:
    """The plan of a cache's epochs: its non-empty tars, each tagged with its bucket."""
    files = _nonempty_files(manifest)
    sizes = sorted({tuple(f["bucket"]) for f in files if "bucket" in f})
    buckets = [sizes.index(tuple(f["bucket"])) if "bucket" in f else 0 for f in files]
    return EpochPlan([f["num_samples"] for f in files], seed, shuffle_buffer, buckets)


def _stream_batches(batches_per_rank: int, stream_worker: int, layout: Layout) -> int:
    """Batches stream `stream_worker` of a rank delivered after the rank took that many.

    A DataLoader takes batches from its workers round-robin from worker 0, and segments are
    whole multiples of the worker count, so batch i of a segment comes from stream i % L.
    """
    n = layout.num_loader_workers
    return (batches_per_rank - stream_worker + n - 1) // n


def _read_indices(path: str, indices: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    wanted = iter(indices.tolist())
    target = next(wanted, None)
    for position, sample in enumerate(read_shard(path)):
        if target is None:
            return
        if position == target:
            yield read_sample(sample)
            target = next(wanted, None)


class LatentCacheStream(IterableDataset):
    """An endless stream of micro-batches for one rank, starting at a `DataCursor`."""

    def __init__(
        self,
        cache_dir: str | Path,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        num_loader_workers: int,
        seed: int,
        cursor: DataCursor | None = None,
        shuffle_buffer: int = 1024,
    ):
        manifest = read_manifest(cache_dir)
        self.cache_dir = cache_dir
        self.paths = [storage.join(cache_dir, f["name"]) for f in _nonempty_files(manifest)]
        self.plan = epoch_plan(manifest, seed, shuffle_buffer)
        self.max_length = int(manifest["spec"]["text_max_length"])
        self.has_logvar = manifest["spec"]["latents"] == "moments"
        self.rank = rank
        self.layout = Layout(world_size, max(1, num_loader_workers), micro_batch_size)
        check_enough_samples(cache_dir, self.plan, self.layout)
        cursor = cursor or DataCursor()
        if cursor.layout is not None and Layout(**cursor.layout) != self.layout:
            # An elastic restart: what the old layout took this epoch becomes a finished segment.
            finished = [
                *cursor.finished_segments,
                {**cursor.layout, "batches_per_rank": cursor.batches_per_rank},
            ]
            cursor = DataCursor(cursor.epoch, finished, None, 0)
        self.start = DataCursor(
            cursor.epoch, cursor.finished_segments, asdict(self.layout), cursor.batches_per_rank
        )

    def cursor_after(self, batches: int) -> DataCursor:
        """The cursor once this rank has taken `batches` more batches from the start."""
        epoch, finished = self.start.epoch, self.start.finished_segments
        taken = self.start.batches_per_rank + batches
        length = self._batches_per_rank(self.plan.remaining(epoch, finished))
        while taken >= length:
            taken -= length
            epoch, finished = epoch + 1, []
            # With buckets an epoch's length depends on how its order deals the buckets.
            length = self._batches_per_rank(self.plan.epoch_sequence(epoch))
        return DataCursor(epoch, finished, asdict(self.layout), taken)

    def _batches_per_rank(self, remaining: np.ndarray) -> int:
        per_stream = self.plan.batches_per_stream(remaining, self.layout)
        if per_stream < 1:  # only buckets can do this after the first epoch: too little data
            raise LdmError(too_few_message(self.cache_dir, self.plan, self.layout))
        return self.layout.num_loader_workers * per_stream

    def __iter__(self) -> Iterator[CacheBatch]:
        info = torch.utils.data.get_worker_info()
        n = self.layout.num_loader_workers
        # Loader worker w yields this rank's batches start+w, start+w+n, ...: the stream those
        # batches come from in the uninterrupted run.
        local = ((info.id if info else 0) + self.start.batches_per_rank) % n
        stream = self.rank * n + local
        epoch, finished = self.start.epoch, self.start.finished_segments
        skip = _stream_batches(self.start.batches_per_rank, local, self.layout)
        mb = self.layout.micro_batch_size
        while True:
            remaining = self.plan.remaining(epoch, finished)
            batches = self.plan.batches(
                self.plan.pieces(self.plan.chunk(remaining, self.layout, stream)),
                [epoch, len(finished), stream],
                lambda shard, idx: _read_indices(self.paths[shard], idx),
                mb,
                self._batches_per_rank(remaining) // n,
            )
            for _ in range(skip):
                next(batches)
            for batch in batches:
                yield collate(batch, self.max_length, self.has_logvar)
            epoch, finished, skip = epoch + 1, [], 0


def check_enough_samples(cache_dir: str | Path, plan: EpochPlan, layout: Layout) -> None:
    """Every stream needs at least one micro-batch per epoch."""
    if plan.batches_per_stream(plan.epoch_sequence(0), layout) < 1:
        raise LdmError(too_few_message(cache_dir, plan, layout))


def too_few_message(cache_dir: str | Path, plan: EpochPlan, layout: Layout) -> str:
    needed = layout.num_streams * layout.micro_batch_size
    per_bucket = " of one aspect-ratio bucket" if plan.num_buckets > 1 else ""
    return (
        f"latent cache {cache_dir} has {plan.num_samples} samples, too few for "
        f"{layout.num_ranks} ranks x {layout.num_loader_workers} loader workers to draw a "
        f"micro batch of {layout.micro_batch_size}{per_bucket} each (at least {needed} "
        "samples): lower train.num_workers, train.num_loader_workers or "
        "train.micro_batch_size, or add data"
    )
