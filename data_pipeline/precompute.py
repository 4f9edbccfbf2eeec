"""The latent cache's content: its spec, and the pieces of the precompute job that touch
data and models (no Ray here: `orchestrator.precompute` schedules these pieces as a Ray Data
job).

Two stages: `ShardDecoder` (CPU) reads a raw shard, decodes, resizes, crops and tokenizes,
cutting it into fixed batches of `precompute.batch_size`; `Encoder` (a GPU each when the
cluster has GPUs) runs the autoencoder and the text encoder on one batch at a time. Because
batches never mix shards or depend on scheduling, the cache's bytes are the same however the
job is split, killed or rerun. `ShardWriter` reorders finished batches and writes one cache
shard per raw shard (a temporary file, renamed or uploaded when complete) with a small
sidecar of counts; a rerun skips shards whose sidecar exists. `write_cache_manifest` seals
the cache once every shard is there.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from core import storage
from core.config import ExperimentConfig, bucket_sizes
from core.errors import LdmError
from data_pipeline.cache import (
    EMPTY_PROMPT,
    FORMAT,
    bucket_histogram,
    default_cache_dir,
    npy_bytes,
    npy_load,
    source_change,
    spec_digest,
    write_manifest,
)
from data_pipeline.filters import SampleFilter, metadata_of, original_size
from data_pipeline.images import (
    ShardReadReport,
    fit_to,
    image_bytes,
    list_shards,
    nearest_bucket,
    read_shard,
    to_model_range,
    try_decode,
)
from models.autoencoder import autoencoder_config, load_autoencoder
from models.digests import tokenizer_digest, weights_digest
from models.text_encoders import (
    load_text_encoder,
    load_tokenizer,
    text_encoder_path,
    tokenizer_path,
)

MAX_BAD_EXAMPLES = 5  # per shard, kept in its sidecar to say what went wrong


def cache_spec(config: ExperimentConfig, autoencoder_dir: str | Path) -> dict[str, Any]:
    """Everything that determines the cache content; training rebuilds it to compare."""
    # Only the config and the weights' bytes are read: the driver needs the identity, not
    # a loaded model.
    vae = autoencoder_config(autoencoder_dir)
    ae_dir = storage.local_folder(autoencoder_dir)
    p = config.precompute
    te = config.text_encoder
    # A jointly trained encoder reads token ids: then the tokenizer is the cache's identity.
    text = "token_ids" if te.trainable else "hidden_states"
    text_dir = (
        tokenizer_path(te.name_or_path) if te.trainable else text_encoder_path(te.name_or_path)
    )
    digest = tokenizer_digest(text_dir) if te.trainable else weights_digest(text_dir)
    ae_class = vae.get("_class_name", "AutoencoderKL")
    return {
        "autoencoder_class": ae_class,
        "autoencoder_sha256": weights_digest(ae_dir),
        "latent_channels": int(vae.get("latent_channels", 4)),
        "scaling_factor": float(vae.get("scaling_factor", 0.18215)),
        "shift_factor": float(vae.get("shift_factor") or 0.0),
        "text_encoder": te.name_or_path
        if te.name_or_path in ("minilm", "ldmbert")
        else Path(text_dir).name,
        "text_encoder_sha256": digest,
        "text_max_length": te.max_length,
        "text": text,
        # Where the raw shards are: two datasets never share a cache folder. What each shard
        # held when it was encoded is in its entry (`source_identity`), checked on every use.
        "dataset": str(config.data.shards).rstrip("/"),
        "holdout_shards": config.data.holdout_shards,
        "resolution": config.data.resolution,
        "center_crop": config.data.center_crop,
        "flip": p.flip,
        # A VQ encoder has no posterior to sample: its cache holds the pre-quantisation
        # latents only, whatever precompute.latents says (AutoencoderConfig.regularization).
        "latents": "mean" if ae_class == "VQModel" else p.latents,
        "dtype": p.dtype,
        # Batches are fixed per shard; a different cut could change low bits of the encoding.
        "batch_size": p.batch_size,
        # Only when set: caches built before these keys existed keep their spec and folder.
        **data_choices(config),
    }


def data_choices(config: ExperimentConfig) -> dict[str, Any]:
    """The caption source, filters and buckets, as the cache spec records them (each only
    when it differs from the default)."""
    choices: dict[str, Any] = {}
    if config.data.caption != "txt":
        choices["caption"] = config.data.caption
    if filters := config.data.filters.active():
        choices["filters"] = filters
    if (buckets := bucket_sizes(config)) is not None:
        choices["buckets"] = [list(b) for b in buckets]
    return choices


def cached_shards(config: ExperimentConfig) -> list[str]:
    """The raw shards that go into the cache: all but the held-out last `holdout_shards`."""
    shards = list_shards(config.data.shards)
    keep = len(shards) - config.data.holdout_shards
    if keep < 1:
        raise LdmError(
            f"data.holdout_shards={config.data.holdout_shards} leaves none of the "
            f"{len(shards)} shards in {config.data.shards} to train on"
        )
    return shards[:keep]


def cache_names(shards: list[str]) -> list[str]:
    """The cache name of each raw shard: its file name, or where file names repeat (a list
    of shards from several folders) its path below the folder they all share, `/` as `__`."""
    names = [storage.basename(s) for s in shards]
    if len(set(names)) == len(names):
        return names
    split = [s.split("://", 1)[-1].split("/") for s in shards]
    common = 0
    while all(len(parts) > common + 1 and parts[common] == split[0][common] for parts in split):
        common += 1
    names = ["__".join(parts[common:]) for parts in split]
    if len(set(names)) != len(names):
        repeated = next(s for s, n in zip(shards, names, strict=True) if names.count(n) > 1)
        raise LdmError(f"data.shards: {repeated} is listed more than once; list each shard once")
    return names


@dataclass
class PrecomputePlan:
    """What a precompute job does: the shards already cached, and those to encode (with why
    a cached one is encoded again)."""

    done: list[dict] = field(default_factory=list)
    todo: list[tuple[str, str]] = field(default_factory=list)
    """(raw shard, cache name) pairs."""
    stale: dict[str, str] = field(default_factory=dict)


def plan_precompute(
    shards: list[str],
    names: list[str],
    fingerprints: dict[str, dict[str, Any]],
    entries: dict[str, dict],
    digest: str,
) -> PrecomputePlan:
    """Which shards to encode: those without a finished entry for this spec and this shard's
    bytes. Index lookups only, so a 100,000-shard job plans in well under a second."""
    plan = PrecomputePlan()
    for shard, name in zip(shards, names, strict=True):
        entry = entries.get(name)
        why = None if entry is None else why_stale(entry, digest, shard, fingerprints)
        if entry is not None and why is None:
            plan.done.append(entry)
            continue
        if why is not None:
            plan.stale[name] = why
        plan.todo.append((shard, name))
    return plan


def why_stale(
    entry: dict, digest: str, shard: str, fingerprints: dict[str, dict[str, Any]]
) -> str | None:
    """Why a shard's cached entry cannot be reused, or None when it can."""
    if entry.get("spec_digest") != digest:
        return "cached under another spec"
    return source_change(entry, shard, fingerprints.get(shard))


def resolve_cache_dir(config: ExperimentConfig, spec: dict[str, Any]) -> str:
    if config.precompute.cache_dir:
        return config.precompute.cache_dir
    return default_cache_dir(config.run.root, spec)


class ShardDecoder:
    """CPU stage: one raw shard in, fixed batches of decoded and tokenized samples out.

    Samples go through the caption source and the filters first; with aspect-ratio buckets
    each kept image is fitted to its nearest bucket and batches hold one bucket each (a batch
    is emitted when its bucket fills; the rest at the shard's end, in bucket order)."""

    def __init__(
        self,
        text_encoder: str,
        max_length: int,
        resolution: int,
        center_crop: bool,
        seed: int,
        batch_size: int,
        caption: str = "txt",
        filters: dict[str, Any] | None = None,
        buckets: list[list[int]] | None = None,
    ):
        from transformers import AutoTokenizer

        # A resolved folder: importing the model code (diffusers) here would cost seconds.
        self.tokenizer = AutoTokenizer.from_pretrained(text_encoder)
        self.max_length, self.resolution = max_length, resolution
        self.center_crop, self.seed, self.batch_size = center_crop, seed, batch_size
        self.caption, self.filters = caption, filters or {}
        self.buckets = [tuple(b) for b in buckets] if buckets else None

    def __call__(self, row: dict[str, Any]):
        shard = row["shard"]
        name = row.get("name") or storage.basename(shard)
        report = ShardReadReport()
        bad: list[str] = []
        filtered: dict[str, int] = {}
        previous, chunk = None, -1
        for chunk, batch in enumerate(self._batches(shard, name, report, bad, filtered)):
            if previous is not None:
                yield self._batch_row(name, chunk - 1, previous, None)
            previous = batch
        bad += [f"tar: {e}" for e in report.errors]
        # The last batch (empty when the shard kept nothing) carries the shard's report.
        last = max(chunk, 0)
        yield self._batch_row(name, last, previous or [], bad, report.sha256, filtered)

    def _batches(
        self,
        shard: str,
        name: str,
        report: ShardReadReport,
        bad: list[str],
        filtered: dict[str, int],
    ) -> Iterator[list]:
        """Full batches as they fill, then what is left of each bucket, in bucket order."""
        keep = SampleFilter(self.caption, self.filters, shard)
        # Random crops are seeded per shard, so a rerun of one shard reproduces it.
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        square = (self.resolution, self.resolution)
        pending: dict[tuple[int, int], list] = {}
        kept = 0
        for sample in read_shard(shard, report):
            meta = metadata_of(sample)
            caption = keep.caption(sample, meta)
            why = keep.reject_metadata(sample["__key__"], caption, meta)
            image = None if why else try_decode(image_bytes(sample))
            if why is None and image is None:
                bad.append(f"{sample['__key__']!r}: no decodable image")
                continue
            width, height = original_size(meta, image.size) if image else (0, 0)
            why = why or keep.reject_size(width, height)
            if why is not None:
                filtered[why] = filtered.get(why, 0) + 1
                continue
            size = nearest_bucket(*image.size, self.buckets) if self.buckets else square
            pixels, crop = fit_to(image, *size, self.center_crop, rng)
            extra = {"bucket": list(size), "original_size": [height, width], "crop": list(crop)}
            batch = pending.setdefault(size, [])
            batch.append((kept, sample["__key__"], caption, pixels, extra))
            kept += 1
            if len(batch) == self.batch_size:
                yield pending.pop(size)
        for size in sorted(pending):
            yield pending[size]

    def _batch_row(
        self,
        shard: str,
        chunk: int,
        batch: list,
        bad: list[str] | None,
        sha256: str = "",
        filtered: dict[str, int] | None = None,
    ) -> dict:
        captions = [caption for _, _, caption, _, _ in batch]
        tokens = self.tokenizer(
            captions or [""],
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_tensors="np",
        )
        shape = (0, self.resolution, self.resolution, 3)
        pixels = np.stack([p for *_, p, _ in batch]) if batch else np.zeros(shape, np.uint8)
        return {
            "shard": shard,
            "chunk": chunk,
            "last": bad is not None,  # the last batch carries the shard's bad-sample report
            "num_bad": len(bad or []),
            "bad_examples": json.dumps((bad or [])[:MAX_BAD_EXAMPLES]),
            "filtered": json.dumps(filtered or {}),
            "source_sha256": sha256,  # of the whole raw shard, known once it was all read
            "positions": json.dumps([position for position, *_ in batch]),
            "keys": json.dumps([key for _, key, *_ in batch]),
            "captions": json.dumps(captions),
            "extras": json.dumps([extra for *_, extra in batch] if self.buckets else []),
            "pixels": npy_bytes(pixels),
            "input_ids": npy_bytes(tokens["input_ids"][: len(batch)].astype(np.int32)),
            "attention_mask": npy_bytes(tokens["attention_mask"][: len(batch)].astype(np.int8)),
        }


class Encoder:
    """Encoder stage: one batch of one shard in, one row per encoded sample out."""

    def __init__(
        self, autoencoder_dir: str, text_encoder: str, spec: dict[str, Any], num_threads: int
    ):
        torch.set_num_threads(num_threads)  # Ray caps an actor at 1 thread unless told
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae = load_autoencoder(autoencoder_dir).to(self.device)
        self.text_encoder = None
        if spec["text"] == "hidden_states":
            self.text_encoder, _ = load_text_encoder(text_encoder)
            self.text_encoder.to(self.device)
        self.spec = spec
        self.dtype = np.float16 if spec["dtype"] == "float16" else np.float32

    def _moments(self, pixels):
        encoded = self.vae.encode(pixels)
        if not hasattr(encoded, "latent_dist"):
            # Deterministic encoders: AutoencoderTiny, and VQModel, whose `latents` are the
            # pre-quantisation output diffusion is trained on (its decoder quantises them).
            mean = encoded.latents
            logvar = mean.new_full(mean.shape, -30.0)
        else:
            mean, logvar = encoded.latent_dist.mean, encoded.latent_dist.logvar
        moments = mean if self.spec["latents"] == "mean" else torch.cat([mean, logvar], dim=1)
        return moments.float().cpu().numpy().astype(self.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        (row,) = [{k: v[0] for k, v in batch.items()}]  # batch_size=1: one shard batch
        pixels = npy_load(row["pixels"])
        ids, mask = npy_load(row["input_ids"]), npy_load(row["attention_mask"])
        n = len(pixels)
        lengths = mask.sum(axis=1)
        with torch.inference_mode():
            x = to_model_range(pixels).to(self.device) if n else None
            moments = self._moments(x) if n else []
            flipped = self._moments(x.flip(-1)) if n and self.spec["flip"] else [None] * n
            if self.text_encoder is not None and n:
                hidden = self.text_encoder(
                    input_ids=torch.from_numpy(ids.astype(np.int64)).to(self.device),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)).to(self.device),
                ).last_hidden_state
                texts = [h[:k] for h, k in zip(hidden.float().cpu().numpy(), lengths, strict=True)]
                texts = [t.astype(self.dtype) for t in texts]
            else:
                texts = [i[:k] for i, k in zip(ids, lengths, strict=True)]
        keys, captions = json.loads(row["keys"]), json.loads(row["captions"])
        positions, extras = json.loads(row["positions"]), json.loads(row["extras"])
        rows = [
            {
                "index": positions[i],
                "key": keys[i],
                "caption": captions[i],
                "extra": json.dumps(extras[i]) if extras else "",
                "moments_npy": npy_bytes(moments[i]),
                "flip_npy": b"" if flipped[i] is None else npy_bytes(flipped[i]),
                "text_npy": npy_bytes(texts[i]),
            }
            for i in range(n)
        ] or [
            {
                "index": -1,
                "key": "",
                "caption": "",
                "extra": "",
                "moments_npy": b"",
                "flip_npy": b"",
                "text_npy": b"",
            }
        ]  # an empty last batch still reports the shard's counts
        passed_on = (
            "shard",
            "chunk",
            "last",
            "num_bad",
            "bad_examples",
            "filtered",
            "source_sha256",
        )
        shared = {k: row[k] for k in passed_on}
        columns = {k: [r[k] for r in rows] for k in rows[0]}
        columns.update({k: [v] * len(rows) for k, v in shared.items()})
        columns["batch_rows"] = [len(rows)] * len(rows)
        ints = ("index", "chunk", "num_bad", "batch_rows")
        return {
            k: np.array(v, dtype=np.int64 if k in ints else bool if k == "last" else object)
            for k, v in columns.items()
        }


class ShardWriter:
    """Writes one raw shard's cache tar as its batches arrive, in batch order, then publishes
    it; with aspect-ratio buckets, one tar per bucket (`NAME.HxW.tar`, listed as `parts`)."""

    def __init__(
        self,
        cache_dir: str,
        name: str,
        source: str,
        source_fingerprint: dict[str, Any],
        spec_digest: str,
        staging: Path,
        bucketed: bool = False,
    ):
        self.cache_dir, self.name, self.source = cache_dir, name, source
        self.source_fingerprint, self.spec_digest = source_fingerprint, spec_digest
        self.source_sha256 = ""
        self.staging, self.bucketed = staging, bucketed
        self.sinks: dict[str, tuple[Path, Any]] = {}  # tar name -> (partial file, writer)
        self.counts: dict[str, int] = {}
        self.sizes: dict[str, list[int]] = {}
        self.rows: dict[int, list[dict]] = {}  # finished batches waiting for earlier ones
        self.next_chunk, self.num_chunks = 0, None
        self.num_samples, self.num_bad, self.bad_examples = 0, 0, []
        self.filtered: dict[str, int] = {}

    def add(self, row: dict) -> None:
        self.rows.setdefault(int(row["chunk"]), []).append(row)
        if row["last"]:
            self.num_chunks = int(row["chunk"]) + 1
            self.num_bad, self.bad_examples = int(row["num_bad"]), json.loads(row["bad_examples"])
            self.filtered = json.loads(row["filtered"])
            self.source_sha256 = str(row["source_sha256"])
        while len(self.rows.get(self.next_chunk, ())) == self._rows_in(self.next_chunk):
            for r in sorted(self.rows.pop(self.next_chunk), key=lambda r: r["index"]):
                if r["index"] >= 0:
                    self._write(r)
            self.next_chunk += 1

    def _rows_in(self, chunk: int) -> int:
        rows = self.rows.get(chunk)
        return int(rows[0]["batch_rows"]) if rows else -1

    @property
    def complete(self) -> bool:
        return self.num_chunks is not None and self.next_chunk == self.num_chunks

    def _sink(self, extra: dict | None) -> tuple[str, Any]:
        if extra is None:
            tar, size = self.name, None
        else:
            height, width = size = extra["bucket"]
            tar = f"{Path(self.name).stem}.{height}x{width}.tar"
        if tar not in self.sinks:
            partial = self.staging / f".{tar}.partial"
            # A fixed mtime makes the tar bytes (and so its sha256) reproducible.
            self.sinks[tar] = (partial, wds.TarWriter(str(partial), mtime=0.0))
            self.counts[tar] = 0
            if size is not None:
                self.sizes[tar] = list(size)
        return tar, self.sinks[tar][1]

    def _write(self, row: dict) -> None:
        extra = json.loads(row["extra"]) if row["extra"] else None
        tar, sink = self._sink(extra)
        # Keys come from the input: our own index-based key, never a path from the data.
        sample = {
            "__key__": f"{Path(self.name).stem}_{row['index']:06d}",
            "moments.npy": row["moments_npy"],
            "text.npy": row["text_npy"],
            "txt": row["caption"],
            "json": json.dumps({"source_key": row["key"], **(extra or {})}).encode(),
        }
        if row["flip_npy"]:
            sample["flip.npy"] = row["flip_npy"]
        sink.write(sample)
        self.counts[tar] += 1
        self.num_samples += 1

    def publish(self) -> dict:
        if not self.bucketed:
            self._sink(None)  # a shard that kept nothing still has its (empty) tar
        for _, sink in self.sinks.values():
            sink.close()
        parts = [
            {
                "name": tar,
                **({"bucket": self.sizes[tar]} if tar in self.sizes else {}),
                "num_samples": self.counts[tar],
                "sha256": storage.sha256(partial),
            }
            for tar, (partial, _) in sorted(self.sinks.items())
        ]
        entry = {
            "name": self.name,
            "source": self.source,
            "num_samples": self.num_samples,
            "num_bad": self.num_bad,
            "bad_examples": self.bad_examples,
            "num_filtered": self.filtered,
            # What was encoded: the raw shard's size and version when the job was planned,
            # and the sha256 of the bytes the decoder read.
            "source_identity": {**self.source_fingerprint, "sha256": self.source_sha256},
            "spec_digest": self.spec_digest,
        }
        if self.bucketed:
            entry["parts"] = parts
        else:
            entry["sha256"] = parts[0]["sha256"]
        for tar, (partial, _) in sorted(self.sinks.items()):
            storage.put_file(partial, storage.join(self.cache_dir, tar))
        storage.write_bytes(done_marker(self.cache_dir, self.name), json.dumps(entry).encode())
        return entry


def done_marker(cache_dir: str, name: str) -> str:
    return storage.join(cache_dir, f"{Path(name).stem}.done.json")


DONE_SUFFIX = ".done.json"
READ_THREADS = 32  # marker reads in flight: an object store answers each in tens of ms


def done_entries(cache_dir: str, names: list[str]) -> dict[str, dict]:
    """The finished entry of each of `names` whose marker and cache tars are all there: one
    listing of the cache folder, then the markers read side by side (a 100,000-shard cache
    resumes in seconds, not one request after another)."""
    listed = {storage.basename(path) for path in storage.list_files(cache_dir, "")}
    wanted = [n for n in names if f"{Path(n).stem}{DONE_SUFFIX}" in listed]

    def read(name: str) -> tuple[str, dict]:
        return name, json.loads(storage.read_bytes(done_marker(cache_dir, name)))

    if storage.is_remote(cache_dir):  # each read a request: many in flight
        with ThreadPoolExecutor(READ_THREADS) as pool:
            entries = dict(pool.map(read, wanted))
    else:  # local files: threads only contend (measured 6x slower for 50,000 markers)
        entries = dict(map(read, wanted))
    return {
        name: entry
        for name, entry in entries.items()
        if all(f["name"] in listed for f in entry.get("parts", [entry]))
    }


class BadBudget:
    """Running totals of a job's bad samples: fails early once they break the budget (each
    finished shard adds its counts; no pass over every shard each time)."""

    def __init__(self, num_shards: int, max_bad_fraction: float):
        self.num_shards, self.max_bad_fraction = num_shards, max_bad_fraction
        self.bad = self.seen = self.num_entries = 0
        self.worst: dict | None = None

    def add(self, entry: dict) -> None:
        self.num_entries += 1
        self.bad += entry["num_bad"]
        self.seen += entry["num_bad"] + entry["num_samples"]
        if self.worst is None or entry["num_bad"] > self.worst["num_bad"]:
            self.worst = entry
        # An estimate until every shard is done. Filtered samples are a choice, not bad data.
        expected_total = self.seen / self.num_entries * self.num_shards
        if self.bad and self.bad > self.max_bad_fraction * expected_total:
            worst = self.worst
            reason = worst["bad_examples"][0] if worst["bad_examples"] else "?"
            raise LdmError(
                f"precompute: {self.bad} of {self.seen} samples read so far could not be "
                f"decoded, over the budget precompute.max_bad_fraction={self.max_bad_fraction} "
                f"(worst: {worst['name']}, {worst['num_bad']} bad, e.g. {reason}); fix the data "
                "or raise the budget and re-run (finished shards are kept)"
            )


def check_bad_budget(entries: list[dict], num_shards: int, max_bad_fraction: float) -> None:
    """Fail when the bad samples of `entries` already break the budget for the job."""
    budget = BadBudget(num_shards, max_bad_fraction)
    for entry in entries:
        budget.add(entry)


def filtered_totals(entries: list[dict]) -> dict[str, int]:
    """Samples the filters left out, per reason, over `entries`, most first."""
    totals: dict[str, int] = {}
    for entry in entries:
        for reason, count in entry.get("num_filtered", {}).items():
            totals[reason] = totals.get(reason, 0) + count
    return dict(sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])))


def encode_empty_prompt(config: ExperimentConfig, spec: dict[str, Any]) -> np.ndarray:
    """What a dropped caption becomes: the encoding (or token ids) of the empty prompt."""
    if spec["text"] == "token_ids":
        tokens = load_tokenizer(config.text_encoder.name_or_path)([""], return_tensors="np")
        return tokens["input_ids"][0].astype(np.int32)
    model, tokenizer = load_text_encoder(config.text_encoder.name_or_path)
    tokens = tokenizer([""], return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**tokens).last_hidden_state[0]
    return hidden.numpy().astype(np.float16 if spec["dtype"] == "float16" else np.float32)


def write_cache_manifest(
    config: ExperimentConfig,
    spec: dict,
    cache_dir: str,
    names: list[str],
    autoencoder_dir: Path,
    run_id: str | None,
) -> dict:
    """Check every shard is there and within budget, then write the manifest."""
    found = done_entries(cache_dir, names)
    missing = [n for n in names if n not in found]
    if missing:
        raise LdmError(
            f"precompute: {len(missing)} shards are not cached (e.g. {missing[:3]}); re-run "
            "`ldm precompute CONFIG`"
        )
    entries = [found[n] for n in names]
    check_bad_budget(entries, len(names), config.precompute.max_bad_fraction)
    empty = npy_bytes(encode_empty_prompt(config, spec))
    storage.write_bytes(storage.join(cache_dir, EMPTY_PROMPT), empty)
    manifest = {
        "format": FORMAT,
        "spec": spec,
        "spec_digest": spec_digest(spec),
        "source": str(config.data.shards),
        "autoencoder_dir": str(autoencoder_dir),  # where `ldm cache verify` finds it
        "mlflow_run_id": run_id,
        "shards": entries,
        "num_samples": sum(e["num_samples"] for e in entries),
        "num_bad": sum(e["num_bad"] for e in entries),
        "num_filtered": filtered_totals(entries),
        "empty_prompt": {"file": EMPTY_PROMPT, "sha256": hashlib.sha256(empty).hexdigest()},
    }
    manifest["bucket_histogram"] = bucket_histogram(manifest)
    write_manifest(cache_dir, manifest)
    with_bad = [e for e in entries if e["num_bad"]]
    for entry in with_bad[:MAX_BAD_EXAMPLES]:
        print(
            f"precompute: {entry['name']}: {entry['num_bad']} bad samples skipped, e.g. "
            + "; ".join(entry["bad_examples"][:2])
        )
    if len(with_bad) > MAX_BAD_EXAMPLES:
        print(f"precompute: and {len(with_bad) - MAX_BAD_EXAMPLES} more shards with bad samples")
    filtered = manifest["num_filtered"]
    if filtered:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in filtered.items())
        print(f"precompute: {sum(filtered.values())} samples filtered out ({reasons})")
    if "buckets" in spec:
        sizes = ", ".join(f"{size}: {n}" for size, n in manifest["bucket_histogram"].items())
        print(f"precompute: samples per bucket (height x width): {sizes}")
    print(
        f"precompute: cache {cache_dir}: {manifest['num_samples']} samples in "
        f"{len(entries)} shards, {manifest['num_bad']} bad samples skipped"
    )
    return manifest
