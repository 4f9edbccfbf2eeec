"""`ldm precompute`: a Ray Data job that encodes raw shards into the latent cache.

Two stages, scheduled separately by Ray Data: CPU tasks read a raw shard, decode, resize,
crop and tokenize, cutting it into fixed batches of `precompute.batch_size`; encoder actors
(one GPU each when the cluster has GPUs) run the autoencoder and the text encoder on one
batch at a time. Because batches never mix shards or depend on scheduling, the cache's bytes
are the same however the job is split, killed or rerun. The driver reorders finished batches
and writes one cache shard per raw shard (a temporary file, renamed or uploaded when
complete) with a small sidecar of counts; a rerun skips shards whose sidecar exists.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import storage
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
    caption_of,
    image_bytes,
    list_shards,
    read_shard,
    resize_crop,
    try_decode,
)
from orchestrator.config import ExperimentConfig
from orchestrator.errors import LdmError

MAX_BAD_EXAMPLES = 5  # per shard, kept in its sidecar to say what went wrong


def cache_spec(config: ExperimentConfig) -> dict[str, Any]:
    """Everything that determines the cache content; training rebuilds it to compare."""
    from training.models import (
        autoencoder_config,
        text_encoder_path,
        tokenizer_path,
        weights_digest,
    )

    # Only the config is read: the driver needs the identity, not a loaded model.
    ae_dir = config.autoencoder_dir
    vae = autoencoder_config(ae_dir)
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


def tokenizer_digest(folder: Path) -> str:
    """sha256 over a tokenizer's vocabulary and settings files."""
    import hashlib

    files = sorted(
        p
        for p in Path(folder).iterdir()
        if p.name.startswith(("tokenizer", "vocab"))
        or p.name in ("special_tokens_map.json", "merges.txt")
    )
    if not files:
        raise LdmError(f"no tokenizer files in {folder}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


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


class _ShardDecoder:
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
        from data_pipeline.images import ShardReadReport

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
        yield self._batch_row(name, chunk, batch, bad)

    def _batch_row(self, shard: str, chunk: int, batch: list, bad: list[str] | None) -> dict:
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
            "keys": json.dumps([key for key, _, _ in batch]),
            "captions": json.dumps(captions),
            "pixels": npy_bytes(pixels),
            "input_ids": npy_bytes(tokens["input_ids"][: len(batch)].astype(np.int32)),
            "attention_mask": npy_bytes(tokens["attention_mask"][: len(batch)].astype(np.int8)),
        }


class _Encoder:
    """Encoder stage: one batch of one shard in, one row per encoded sample out."""

    def __init__(
        self, autoencoder_dir: str, text_encoder: str, spec: dict[str, Any], num_threads: int
    ):
        import torch

        from training.models import load_autoencoder, load_text_encoder

        torch.set_num_threads(num_threads)  # Ray caps an actor at 1 thread unless told
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae = load_autoencoder(Path(autoencoder_dir)).to(self.device)
        self.text_encoder = None
        if spec["text"] == "hidden_states":
            self.text_encoder, _ = load_text_encoder(text_encoder)
            self.text_encoder.to(self.device)
        self.spec = spec
        self.dtype = np.float16 if spec["dtype"] == "float16" else np.float32

    def _moments(self, pixels):
        import torch

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
        import torch

        from data_pipeline.images import to_model_range

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
        shared = {k: row[k] for k in ("shard", "chunk", "last", "num_bad", "bad_examples")}
        columns = {k: [r[k] for r in rows] for k in rows[0]}
        columns.update({k: [v] * len(rows) for k, v in shared.items()})
        columns["batch_rows"] = [len(rows)] * len(rows)
        ints = ("index", "chunk", "num_bad", "batch_rows")
        return {
            k: np.array(v, dtype=np.int64 if k in ints else bool if k == "last" else object)
            for k, v in columns.items()
        }


class _ShardWriter:
    """Writes one cache shard as its batches arrive, in batch order, then publishes it."""

    def __init__(self, cache_dir: str, name: str, source: str, staging: Path):
        import webdataset as wds

        self.cache_dir, self.name, self.source = cache_dir, name, source
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
        }
        storage.put_file(self.partial, storage.join(self.cache_dir, self.name))
        storage.write_bytes(_marker(self.cache_dir, self.name), json.dumps(entry).encode())
        return entry


def _marker(cache_dir: str, name: str) -> str:
    return storage.join(cache_dir, f"{Path(name).stem}.done.json")


def _done_entry(cache_dir: str, name: str) -> dict | None:
    marker = _marker(cache_dir, name)
    if storage.exists(marker) and storage.exists(storage.join(cache_dir, name)):
        return json.loads(storage.read_bytes(marker))
    return None


def _check_bad_budget(entries: list[dict], num_shards: int, max_bad_fraction: float) -> None:
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


def _empty_prompt(config: ExperimentConfig, spec: dict[str, Any]) -> np.ndarray:
    """What a dropped caption becomes: the encoding (or token ids) of the empty prompt."""
    import torch

    from training.models import load_text_encoder, load_tokenizer

    if spec["text"] == "token_ids":
        tokens = load_tokenizer(config.text_encoder.name_or_path)([""], return_tensors="np")
        return tokens["input_ids"][0].astype(np.int32)
    model, tokenizer = load_text_encoder(config.text_encoder.name_or_path)
    tokens = tokenizer([""], return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**tokens).last_hidden_state[0]
    return hidden.numpy().astype(np.float16 if spec["dtype"] == "float16" else np.float32)


def _encode(
    config: ExperimentConfig,
    spec: dict[str, Any],
    cache_dir: str,
    todo: list[str],
    done: list[dict],
    num_shards: int,
    progress: bool,
) -> None:
    """The Ray Data job: encode the `todo` shards, publishing each as it completes."""
    import ray

    from orchestrator.cluster import ray_session
    from training.models import tokenizer_path

    if not todo:
        return
    p = config.precompute
    with ray_session(config.cluster.address), tempfile.TemporaryDirectory() as tmp:
        # Local caches stage next to their final name (a rename); remote ones upload.
        staging = Path(tmp) if storage.is_remote(cache_dir) else Path(cache_dir)
        use_gpu = bool(ray.cluster_resources().get("GPU", 0))
        ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
        ds = ds.flat_map(
            _ShardDecoder,
            fn_constructor_kwargs=dict(
                text_encoder=str(tokenizer_path(config.text_encoder.name_or_path)),
                max_length=config.text_encoder.max_length,
                resolution=config.data.resolution,
                center_crop=config.data.center_crop,
                seed=config.run.seed,
                batch_size=p.batch_size,
            ),
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, len(todo))),
            num_cpus=p.num_cpus_per_decoder,
        )
        ds = ds.map_batches(
            _Encoder,
            fn_constructor_kwargs=dict(
                autoencoder_dir=str(config.autoencoder_dir),
                text_encoder=config.text_encoder.name_or_path,
                spec=spec,
                num_threads=math.ceil(p.num_cpus_per_encoder),
            ),
            batch_size=1,  # one shard batch per call: its size is fixed upstream
            compute=ray.data.ActorPoolStrategy(size=p.num_encoders),
            num_cpus=p.num_cpus_per_encoder,
            num_gpus=1 if use_gpu else 0,
        )
        sources = {storage.basename(s): s for s in todo}
        writers: dict[str, _ShardWriter] = {}
        for row in ds.iter_rows():
            name = row["shard"]
            if name not in writers:
                writers[name] = _ShardWriter(cache_dir, name, sources[name], staging)
            writer = writers[name]
            writer.add(row)
            if writer.complete:
                entry = writers.pop(name).publish()
                done.append(entry)
                if progress:
                    print(
                        f"precompute: wrote {entry['name']} ({entry['num_samples']} "
                        f"samples, {entry['num_bad']} bad)"
                    )
                _check_bad_budget(done, num_shards, p.max_bad_fraction)
        if writers:
            raise LdmError(
                f"precompute: shards {sorted(writers)} ended incomplete; re-run to retry them"
            )


def _start_run(config: ExperimentConfig, spec: dict[str, Any], cache_dir: str) -> str:
    from training.tracking import start_run

    run_id = start_run(
        config.tracking_uri,
        config.tracking.experiment,
        f"{config.run.name}-precompute",
        {**config.flat(), **{f"spec.{k}": v for k, v in spec.items()}},
        tags={
            "ldm.stage": "precompute",
            "ldm.cache_spec": spec_digest(spec),
            "ldm.cache_dir": str(cache_dir),
        },
        artifact_root=Path(config.run.root) / "mlartifacts",
    )
    print(f"precompute: MLflow run {run_id} at {config.tracking_uri}", flush=True)
    return run_id


def precompute(config: ExperimentConfig, progress: bool = True) -> str:
    """Encode every raw shard not yet in the cache; returns the cache folder (path or URI)."""
    spec = cache_spec(config)
    cache_dir = resolve_cache_dir(config, spec)
    storage.makedirs(cache_dir)
    shards = cached_shards(config)
    names = [storage.basename(s) for s in shards]
    if len(set(names)) != len(names):
        raise LdmError(f"data.shards: shard file names repeat in {config.data.shards}")
    done = [e for e in (_done_entry(cache_dir, n) for n in names) if e]
    todo = [s for s, n in zip(shards, names, strict=True) if n not in {e["name"] for e in done}]
    print(f"precompute: {len(done)} of {len(shards)} shards already cached in {cache_dir}")
    started = time.perf_counter()
    previous = storage.join(cache_dir, "manifest.json")
    run_id = (
        json.loads(storage.read_bytes(previous)).get("mlflow_run_id")
        if not todo and storage.exists(previous)
        else None
    )
    if todo:
        run_id = _start_run(config, spec, cache_dir)
    status = "FAILED"
    try:
        _encode(config, spec, cache_dir, todo, done, len(shards), progress)
        manifest = _finish(config, spec, cache_dir, names, run_id)
        status = "FINISHED"
    finally:
        if todo:
            _end_run(config, run_id, status, manifest if status == "FINISHED" else None, started)
    return cache_dir


def _finish(
    config: ExperimentConfig, spec: dict, cache_dir: str, names: list[str], run_id: str | None
) -> dict:
    """Check every shard is there and within budget, then write the manifest."""
    entries = [_done_entry(cache_dir, name) for name in names]
    missing = [n for n, e in zip(names, entries, strict=True) if e is None]
    if missing:
        raise LdmError(
            f"precompute: shards {missing} are not cached; re-run `ldm precompute CONFIG`"
        )
    _check_bad_budget(entries, len(names), config.precompute.max_bad_fraction)
    empty = npy_bytes(_empty_prompt(config, spec))
    storage.write_bytes(storage.join(cache_dir, EMPTY_PROMPT), empty)
    manifest = {
        "format": FORMAT,
        "spec": spec,
        "spec_digest": spec_digest(spec),
        "source": str(config.data.shards),
        "autoencoder_dir": str(config.autoencoder_dir),  # where `ldm cache verify` finds it
        "mlflow_run_id": run_id,
        "shards": entries,
        "num_samples": sum(e["num_samples"] for e in entries),
        "num_bad": sum(e["num_bad"] for e in entries),
        "empty_prompt": {"file": EMPTY_PROMPT, "sha256": _sha256_bytes(empty)},
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


def _end_run(
    config: ExperimentConfig, run_id: str, status: str, manifest: dict | None, started: float
) -> None:
    from training.tracking import end_run, tracker_for

    if manifest is not None:
        seconds = time.perf_counter() - started
        tracker = tracker_for(0, config.tracking_uri, run_id, config.run_dir / "mlflow-spool")
        tracker.log_metrics(
            {
                "num_samples": manifest["num_samples"],
                "num_bad": manifest["num_bad"],
                "seconds": seconds,
            },
            0,
        )
        tracker.log_text(json.dumps(manifest, indent=2), "manifest.json")
        tracker.close()
        print(f"precompute: done in {seconds:.1f} s", flush=True)
    end_run(config.tracking_uri, run_id, status)


def _sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
