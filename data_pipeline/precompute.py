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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from core import storage
from core.config import ExperimentConfig
from core.errors import LdmError
from data_pipeline.cache import (
    EMPTY_PROMPT,
    FORMAT,
    default_cache_dir,
    npy_bytes,
    npy_load,
    spec_digest,
    write_manifest,
)
from data_pipeline.images import (
    ShardReadReport,
    caption_of,
    image_bytes,
    list_shards,
    read_shard,
    resize_crop,
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
    }


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


def resolve_cache_dir(config: ExperimentConfig, spec: dict[str, Any]) -> str:
    if config.precompute.cache_dir:
        return config.precompute.cache_dir
    return default_cache_dir(config.run.root, spec)


class ShardDecoder:
    """CPU stage: one raw shard in, fixed batches of decoded and tokenized samples out."""

    def __init__(
        self,
        text_encoder: str,
        max_length: int,
        resolution: int,
        center_crop: bool,
        seed: int,
        batch_size: int,
    ):
        from transformers import AutoTokenizer

        # A resolved folder: importing the model code (diffusers) here would cost seconds.
        self.tokenizer = AutoTokenizer.from_pretrained(text_encoder)
        self.max_length, self.resolution = max_length, resolution
        self.center_crop, self.seed, self.batch_size = center_crop, seed, batch_size

    def __call__(self, row: dict[str, Any]):
        shard = row["shard"]
        name = storage.basename(shard)
        report = ShardReadReport()
        bad: list[str] = []
        # Random crops are seeded per shard, so a rerun of one shard reproduces it.
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        chunk, batch = 0, []
        for sample in read_shard(shard, report):
            image = try_decode(image_bytes(sample))
            if image is None:
                bad.append(f"{sample['__key__']!r}: no decodable image")
                continue
            pixels = resize_crop(image, self.resolution, self.center_crop, rng)
            batch.append((sample["__key__"], caption_of(sample), pixels))
            if len(batch) == self.batch_size:
                yield self._batch_row(name, chunk, batch, None)
                chunk, batch = chunk + 1, []
        bad += [f"tar: {e}" for e in report.errors]
        yield self._batch_row(name, chunk, batch, bad, report.sha256)

    def _batch_row(
        self, shard: str, chunk: int, batch: list, bad: list[str] | None, sha256: str = ""
    ) -> dict:
        captions = [caption for _, caption, _ in batch]
        tokens = self.tokenizer(
            captions or [""],
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_tensors="np",
        )
        shape = (0, self.resolution, self.resolution, 3)
        pixels = np.stack([p for _, _, p in batch]) if batch else np.zeros(shape, np.uint8)
        return {
            "shard": shard,
            "chunk": chunk,
            "last": bad is not None,  # the last batch carries the shard's bad-sample report
            "num_bad": len(bad or []),
            "bad_examples": json.dumps((bad or [])[:MAX_BAD_EXAMPLES]),
            "source_sha256": sha256,  # of the whole raw shard, known once it was all read
            "keys": json.dumps([key for key, _, _ in batch]),
            "captions": json.dumps(captions),
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
        rows = [
            {
                "index": int(row["chunk"]) * self.spec["batch_size"] + i,
                "key": keys[i],
                "caption": captions[i],
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
                "moments_npy": b"",
                "flip_npy": b"",
                "text_npy": b"",
            }
        ]  # an empty last batch still reports the shard's counts
        passed_on = ("shard", "chunk", "last", "num_bad", "bad_examples", "source_sha256")
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
    """Writes one cache shard as its batches arrive, in batch order, then publishes it."""

    def __init__(
        self,
        cache_dir: str,
        name: str,
        source: str,
        source_fingerprint: dict[str, Any],
        spec_digest: str,
        staging: Path,
    ):
        self.cache_dir, self.name, self.source = cache_dir, name, source
        self.source_fingerprint, self.spec_digest = source_fingerprint, spec_digest
        self.source_sha256 = ""
        self.partial = staging / f".{name}.partial"
        # A fixed mtime makes the tar bytes (and so its sha256) reproducible.
        self.sink = wds.TarWriter(str(self.partial), mtime=0.0)
        self.rows: dict[int, list[dict]] = {}  # finished batches waiting for earlier ones
        self.next_chunk, self.num_chunks = 0, None
        self.num_samples, self.num_bad, self.bad_examples = 0, 0, []

    def add(self, row: dict) -> None:
        self.rows.setdefault(int(row["chunk"]), []).append(row)
        if row["last"]:
            self.num_chunks = int(row["chunk"]) + 1
            self.num_bad, self.bad_examples = int(row["num_bad"]), json.loads(row["bad_examples"])
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

    def _write(self, row: dict) -> None:
        # Keys come from the input: our own index-based key, never a path from the data.
        sample = {
            "__key__": f"{Path(self.name).stem}_{row['index']:06d}",
            "moments.npy": row["moments_npy"],
            "text.npy": row["text_npy"],
            "txt": row["caption"],
            "json": json.dumps({"source_key": row["key"]}).encode(),
        }
        if row["flip_npy"]:
            sample["flip.npy"] = row["flip_npy"]
        self.sink.write(sample)
        self.num_samples += 1

    def publish(self) -> dict:
        self.sink.close()
        entry = {
            "name": self.name,
            "source": self.source,
            "num_samples": self.num_samples,
            "num_bad": self.num_bad,
            "bad_examples": self.bad_examples,
            "sha256": storage.sha256(self.partial),
            # What was encoded: the raw shard's size and version when the job was planned,
            # and the sha256 of the bytes the decoder read.
            "source_identity": {**self.source_fingerprint, "sha256": self.source_sha256},
            "spec_digest": self.spec_digest,
        }
        storage.put_file(self.partial, storage.join(self.cache_dir, self.name))
        storage.write_bytes(done_marker(self.cache_dir, self.name), json.dumps(entry).encode())
        return entry


def done_marker(cache_dir: str, name: str) -> str:
    return storage.join(cache_dir, f"{Path(name).stem}.done.json")


def done_entry(cache_dir: str, name: str) -> dict | None:
    marker = done_marker(cache_dir, name)
    if storage.exists(marker) and storage.exists(storage.join(cache_dir, name)):
        return json.loads(storage.read_bytes(marker))
    return None


def check_bad_budget(entries: list[dict], num_shards: int, max_bad_fraction: float) -> None:
    """Fail early when the bad samples seen so far already break the budget for the job."""
    bad = sum(e["num_bad"] for e in entries)
    seen = bad + sum(e["num_samples"] for e in entries)
    expected_total = seen / len(entries) * num_shards  # an estimate until every shard is done
    if bad and bad > max_bad_fraction * expected_total:
        worst = max(entries, key=lambda e: e["num_bad"])
        reason = worst["bad_examples"][0] if worst["bad_examples"] else "?"
        raise LdmError(
            f"precompute: {bad} of {seen} samples read so far could not be decoded, over the "
            f"budget precompute.max_bad_fraction={max_bad_fraction} (worst: {worst['name']}, "
            f"{worst['num_bad']} bad, e.g. {reason}); fix the data or raise the budget and "
            "re-run (finished shards are kept)"
        )


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
    entries = [done_entry(cache_dir, name) for name in names]
    missing = [n for n, e in zip(names, entries, strict=True) if e is None]
    if missing:
        raise LdmError(
            f"precompute: shards {missing} are not cached; re-run `ldm precompute CONFIG`"
        )
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
        "empty_prompt": {"file": EMPTY_PROMPT, "sha256": hashlib.sha256(empty).hexdigest()},
    }
    write_manifest(cache_dir, manifest)
    for entry in entries:
        if entry["num_bad"]:
            print(
                f"precompute: {entry['name']}: {entry['num_bad']} bad samples skipped, e.g. "
                + "; ".join(entry["bad_examples"][:2])
            )
    print(
        f"precompute: cache {cache_dir}: {manifest['num_samples']} samples in "
        f"{len(entries)} shards, {manifest['num_bad']} bad samples skipped"
    )
    return manifest
