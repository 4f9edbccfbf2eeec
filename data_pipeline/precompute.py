"""`ldm precompute`: a Ray Data job that encodes raw shards into the latent cache.

Two stages, scheduled separately by Ray Data: CPU tasks read a raw shard, decode, resize,
crop and tokenize; encoder actors (one GPU each when the cluster has GPUs) run the
autoencoder and the text encoder. The driver collects encoded samples, and writes one cache
shard per raw shard (temporary name, renamed when complete) with a small sidecar of counts.
Re-running skips shards that are complete, so a killed job resumes where it stopped.
"""

from __future__ import annotations

import json
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.cache import (
    EMPTY_PROMPT,
    FORMAT,
    default_cache_dir,
    file_sha256,
    npy_bytes,
    spec_digest,
    write_atomic,
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


def cache_spec(config: ExperimentConfig) -> dict[str, Any]:
    """Everything that determines the cache content; training rebuilds it to compare."""
    from training.models import autoencoder_config, text_encoder_path, weights_digest

    # Only the config is read: the driver needs the identity, not a loaded model.
    ae_dir = config.autoencoder_dir
    vae = autoencoder_config(ae_dir)
    text_dir = text_encoder_path(config.text_encoder.name_or_path)
    return {
        "autoencoder_class": vae.get("_class_name", "AutoencoderKL"),
        "autoencoder_sha256": weights_digest(ae_dir),
        "latent_channels": int(vae.get("latent_channels", 4)),
        "scaling_factor": float(vae.get("scaling_factor", 0.18215)),
        "shift_factor": float(vae.get("shift_factor") or 0.0),
        "text_encoder": config.text_encoder.name_or_path
        if config.text_encoder.name_or_path == "minilm"
        else Path(text_dir).name,
        "text_encoder_sha256": weights_digest(text_dir),
        "text_max_length": config.text_encoder.max_length,
        "resolution": config.data.resolution,
        "center_crop": config.data.center_crop,
        "dtype": config.precompute.dtype,
    }


def resolve_cache_dir(config: ExperimentConfig, spec: dict[str, Any]) -> Path:
    if config.precompute.cache_dir:
        return Path(config.precompute.cache_dir)
    return default_cache_dir(config.run.root, spec)


class _ShardDecoder:
    """CPU stage: one raw shard in, its decoded and tokenized samples out."""

    def __init__(
        self, text_encoder: str, max_length: int, resolution: int, center_crop: bool, seed: int
    ):
        from transformers import AutoTokenizer

        from training.models import text_encoder_path

        self.tokenizer = AutoTokenizer.from_pretrained(text_encoder_path(text_encoder))
        self.max_length, self.resolution = max_length, resolution
        self.center_crop, self.seed = center_crop, seed

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        from data_pipeline.images import ShardReadReport

        shard = row["shard"]
        report = ShardReadReport()
        good, bad = [], 0
        rng = np.random.default_rng([self.seed, zlib.crc32(Path(shard).name.encode())])
        for sample in read_shard(shard, report):
            image = try_decode(image_bytes(sample))
            if image is None:
                bad += 1
                continue
            pixels = resize_crop(image, self.resolution, self.center_crop, rng)
            good.append((sample["__key__"], caption_of(sample), pixels))
        bad += len(report.errors)
        tokens = self.tokenizer(
            [caption for _, caption, _ in good] or [""],
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_tensors="np",
        )
        name = Path(shard).name
        if not good:  # one placeholder row, so the driver still learns the shard's counts
            blank = np.zeros((self.resolution, self.resolution, 3), np.uint8)
            good = [("", "", blank)]
        return [
            {
                "shard": name,
                "index": i,
                "num_good": 0 if not key else len(good),
                "num_bad": bad,
                "key": key,
                "caption": caption,
                "pixels": pixels,
                "input_ids": tokens["input_ids"][i].astype(np.int64),
                "attention_mask": tokens["attention_mask"][i].astype(np.int64),
            }
            for i, (key, caption, pixels) in enumerate(good)
        ]


class _Encoder:
    """Encoder stage: autoencoder posterior moments and text hidden states, on a GPU if given."""

    def __init__(self, autoencoder_dir: str, text_encoder: str, dtype: str):
        import torch

        from training.models import load_autoencoder, load_text_encoder

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae = load_autoencoder(Path(autoencoder_dir)).to(self.device)
        self.text_encoder, _ = load_text_encoder(text_encoder)
        self.text_encoder.to(self.device)
        self.dtype = np.float16 if dtype == "float16" else np.float32

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        from data_pipeline.images import to_model_range

        with torch.inference_mode():
            pixels = to_model_range(batch["pixels"]).to(self.device)
            encoded = self.vae.encode(pixels)
            if hasattr(encoded, "latent_dist"):
                dist = encoded.latent_dist
                moments = torch.cat([dist.mean, dist.logvar], dim=1)
            else:  # AutoencoderTiny is deterministic: zero variance
                mean = encoded.latents
                moments = torch.cat([mean, torch.full_like(mean, -30.0)], dim=1)
            ids = torch.from_numpy(batch["input_ids"]).to(self.device)
            mask = torch.from_numpy(batch["attention_mask"]).to(self.device)
            hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        moments = moments.float().cpu().numpy().astype(self.dtype)
        hidden = hidden.float().cpu().numpy().astype(self.dtype)
        lengths = batch["attention_mask"].sum(axis=1)
        return {
            "shard": batch["shard"],
            "index": batch["index"],
            "num_good": batch["num_good"],
            "num_bad": batch["num_bad"],
            "key": batch["key"],
            "caption": batch["caption"],
            "moments_npy": np.array([npy_bytes(m) for m in moments], dtype=object),
            "text_npy": np.array(
                [npy_bytes(h[:n]) for h, n in zip(hidden, lengths, strict=True)], dtype=object
            ),
        }


def _write_cache_shard(
    cache_dir: Path, name: str, source: str, rows: list[dict], num_bad: int
) -> dict:
    import webdataset as wds

    rows = sorted((r for r in rows if r["key"]), key=lambda r: r["index"])
    final = cache_dir / name
    tmp = cache_dir / f".{name}.partial"
    with wds.TarWriter(str(tmp)) as sink:
        for row in rows:
            # Keys come from the input: use our own index-based key, never a path from the data.
            sink.write(
                {
                    "__key__": f"{Path(name).stem}_{row['index']:06d}",
                    "moments.npy": row["moments_npy"],
                    "text.npy": row["text_npy"],
                    "txt": row["caption"],
                    "json": json.dumps({"source_key": row["key"]}).encode(),
                }
            )
    tmp.replace(final)
    entry = {
        "name": name,
        "source": source,
        "num_samples": len(rows),
        "num_bad": num_bad,
        "sha256": file_sha256(final),
    }
    write_atomic(cache_dir / f"{Path(name).stem}.done.json", json.dumps(entry).encode())
    return entry


def _done_entry(cache_dir: Path, name: str) -> dict | None:
    marker = cache_dir / f"{Path(name).stem}.done.json"
    if marker.is_file() and (cache_dir / name).is_file():
        return json.loads(marker.read_text())
    return None


def _empty_prompt_embedding(config: ExperimentConfig, dtype: str) -> np.ndarray:
    import torch

    from training.models import load_text_encoder

    model, tokenizer = load_text_encoder(config.text_encoder.name_or_path)
    tokens = tokenizer([""], return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**tokens).last_hidden_state[0]
    return hidden.numpy().astype(np.float16 if dtype == "float16" else np.float32)


def precompute(config: ExperimentConfig, progress: bool = True) -> Path:
    """Encode every raw shard not yet in the cache; returns the cache folder."""
    import ray

    from orchestrator.cluster import ray_session

    spec = cache_spec(config)
    cache_dir = resolve_cache_dir(config, spec)
    cache_dir.mkdir(parents=True, exist_ok=True)
    shards = list_shards(config.data.shards)
    names = [Path(s).name for s in shards]
    if len(set(names)) != len(names):
        raise LdmError(f"data.shards: shard file names repeat in {config.data.shards}")
    todo = [s for s in shards if _done_entry(cache_dir, Path(s).name) is None]
    print(
        f"precompute: {len(shards) - len(todo)} of {len(shards)} shards already cached "
        f"in {cache_dir}"
    )
    started = time.perf_counter()
    p = config.precompute
    if todo:
        with ray_session(config.cluster.address):
            use_gpu = bool(ray.cluster_resources().get("GPU", 0))
            ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
            ds = ds.flat_map(
                _ShardDecoder,
                fn_constructor_kwargs=dict(
                    text_encoder=config.text_encoder.name_or_path,
                    max_length=config.text_encoder.max_length,
                    resolution=config.data.resolution,
                    center_crop=config.data.center_crop,
                    seed=config.run.seed,
                ),
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, len(todo))),
                num_cpus=1,
            )
            ds = ds.map_batches(
                _Encoder,
                fn_constructor_kwargs=dict(
                    autoencoder_dir=str(config.autoencoder_dir),
                    text_encoder=config.text_encoder.name_or_path,
                    dtype=p.dtype,
                ),
                batch_size=p.batch_size,
                compute=ray.data.ActorPoolStrategy(size=p.num_encoders),
                num_cpus=p.num_cpus_per_encoder,
                num_gpus=1 if use_gpu else 0,
            )
            pending: dict[str, list[dict]] = defaultdict(list)
            sources = {Path(s).name: s for s in todo}
            for row in ds.iter_rows():
                rows = pending[row["shard"]]
                rows.append(row)
                if len(rows) >= max(1, row["num_good"]):
                    entry = _write_cache_shard(
                        cache_dir, row["shard"], sources[row["shard"]], rows, row["num_bad"]
                    )
                    del pending[row["shard"]]
                    if progress:
                        print(
                            f"precompute: wrote {entry['name']} ({entry['num_samples']} "
                            f"samples, {entry['num_bad']} bad)"
                        )
            if pending:
                raise LdmError(
                    f"precompute: shards {sorted(pending)} ended incomplete; re-run to retry them"
                )
    entries = [_done_entry(cache_dir, name) for name in names]
    missing = [n for n, e in zip(names, entries, strict=True) if e is None]
    if missing:
        raise LdmError(
            f"precompute: shards {missing} are not cached; re-run `ldm precompute CONFIG`"
        )
    empty = _empty_prompt_embedding(config, p.dtype)
    write_atomic(cache_dir / EMPTY_PROMPT, npy_bytes(empty))
    manifest = {
        "format": FORMAT,
        "spec": spec,
        "spec_digest": spec_digest(spec),
        "source": str(config.data.shards),
        "autoencoder_dir": str(config.autoencoder_dir),  # where `ldm cache verify` finds it
        "shards": entries,
        "num_samples": sum(e["num_samples"] for e in entries),
        "num_bad": sum(e["num_bad"] for e in entries),
        "empty_prompt": {"file": EMPTY_PROMPT, "sha256": file_sha256(cache_dir / EMPTY_PROMPT)},
    }
    write_manifest(cache_dir, manifest)
    elapsed = time.perf_counter() - started
    print(
        f"precompute: cache {cache_dir}: {manifest['num_samples']} samples in "
        f"{len(entries)} shards, "
        f"{manifest['num_bad']} bad samples skipped ({elapsed:.1f} s)"
    )
    return cache_dir
