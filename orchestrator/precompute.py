"""`ldm precompute`: the Ray Data job that encodes raw shards into the latent cache.

The pieces (`data_pipeline.precompute`) are scheduled separately by Ray Data: CPU actors
decode a raw shard into fixed batches, encoder actors (a GPU each when the cluster has GPUs)
run the autoencoder and the text encoder on one batch at a time. This driver reorders
finished batches into one cache shard per raw shard, publishing each as it completes, skips
the shards a rerun finds done, writes the manifest, and tracks the job in MLflow.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from core import storage
from core.config import ExperimentConfig
from core.errors import LdmError
from core.layout import RunLayout
from data_pipeline.cache import MANIFEST, check_spec, read_manifest, spec_digest
from data_pipeline.filters import check_fields_exist
from data_pipeline.images import missing_shards
from data_pipeline.precompute import (
    BadBudget,
    Encoder,
    ShardDecoder,
    ShardWriter,
    cache_names,
    cache_spec,
    cached_shards,
    done_entries,
    plan_precompute,
    resolve_cache_dir,
    write_cache_manifest,
)
from models.text_encoders import tokenizer_path
from orchestrator.cluster import alive_nodes, ray_session
from orchestrator.shared_paths import unshared_paths_problem
from training.tracking import MLflowTracker, end_run, start_run

MAX_STALE_LINES = 5  # shards named when encoded again; the rest are counted
MAX_BLOCKS = 1024  # Ray Data blocks of shard names: enough to spread, few enough to plan fast


def _encode(
    config: ExperimentConfig,
    layout: RunLayout,
    spec: dict[str, Any],
    cache_dir: str,
    todo: list[tuple[str, str]],
    budget: BadBudget,
    progress: bool,
    fingerprints: dict[str, dict[str, Any]],
) -> None:
    """The Ray Data job: encode the `todo` (shard, name) pairs, publishing each shard as it
    completes."""
    import ray

    if not todo:
        return
    p = config.precompute
    with ray_session(config.cluster.address), tempfile.TemporaryDirectory() as tmp:
        if (problem := unshared_paths_problem(config, "precompute", alive_nodes())) is not None:
            raise LdmError(problem)
        # Local caches stage next to their final name (a rename); remote ones upload.
        staging = Path(tmp) if storage.is_remote(cache_dir) else Path(cache_dir)
        use_gpu = bool(ray.cluster_resources().get("GPU", 0))
        blocks = min(len(todo), MAX_BLOCKS)
        rows = [{"shard": shard, "name": name} for shard, name in todo]
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        ds = ds.flat_map(
            ShardDecoder,
            fn_constructor_kwargs=dict(
                text_encoder=str(tokenizer_path(config.text_encoder.name_or_path)),
                max_length=config.text_encoder.max_length,
                resolution=config.data.resolution,
                center_crop=config.data.center_crop,
                seed=config.run.seed,
                batch_size=p.batch_size,
                caption=config.data.caption,
                filters=config.data.filters.active(),
                buckets=spec.get("buckets"),
            ),
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=blocks),
            num_cpus=p.num_cpus_per_decoder,
        )
        ds = ds.map_batches(
            Encoder,
            fn_constructor_kwargs=dict(
                autoencoder_dir=str(layout.autoencoder_dir),
                text_encoder=config.text_encoder.name_or_path,
                spec=spec,
                num_threads=math.ceil(p.num_cpus_per_encoder),
            ),
            batch_size=1,  # one shard batch per call: its size is fixed upstream
            compute=ray.data.ActorPoolStrategy(size=p.num_encoders),
            num_cpus=p.num_cpus_per_encoder,
            num_gpus=1 if use_gpu else 0,
        )
        sources = {name: shard for shard, name in todo}
        digest = spec_digest(spec)
        writers: dict[str, ShardWriter] = {}
        for row in ds.iter_rows():
            name = row["shard"]
            if name not in writers:
                writers[name] = ShardWriter(
                    cache_dir,
                    name,
                    sources[name],
                    fingerprints[sources[name]],
                    digest,
                    staging,
                    bucketed="buckets" in spec,
                )
            writer = writers[name]
            writer.add(row)
            if writer.complete:
                entry = writers.pop(name).publish()
                if progress:
                    filtered = sum(entry["num_filtered"].values())
                    print(
                        f"precompute: wrote {entry['name']} ({entry['num_samples']} "
                        f"samples, {entry['num_bad']} bad, {filtered} filtered)"
                    )
                budget.add(entry)
        if writers:
            raise LdmError(
                f"precompute: shards {sorted(writers)} ended incomplete; re-run to retry them"
            )


def _start_run(
    config: ExperimentConfig, layout: RunLayout, spec: dict[str, Any], cache_dir: str
) -> str:
    run_id = start_run(
        layout.tracking_uri,
        config.tracking.experiment,
        f"{config.run.name}-precompute",
        {**config.flat(), **{f"spec.{k}": v for k, v in spec.items()}},
        tags={
            "ldm.stage": "precompute",
            "ldm.cache_spec": spec_digest(spec),
            "ldm.cache_dir": str(cache_dir),
        },
        artifact_root=layout.mlflow_artifacts,
    )
    print(f"precompute: MLflow run {run_id} at {layout.tracking_uri}", flush=True)
    return run_id


def precompute(config: ExperimentConfig, progress: bool = True) -> str:
    """Encode every raw shard not yet in the cache; returns the cache folder (path or URI)."""
    layout = RunLayout.of(config)
    spec = cache_spec(config, layout.autoencoder_dir)
    cache_dir = resolve_cache_dir(config, spec)
    shards = cached_shards(config)
    # A misspelt field would filter every sample: refused before anything is written.
    check_fields_exist(shards[0], config.data.caption, config.data.filters.active())
    storage.makedirs(cache_dir)
    if storage.exists(storage.join(cache_dir, MANIFEST)):  # an explicit cache_dir, reused
        check_spec(
            cache_dir,
            read_manifest(cache_dir),
            spec,
            fix="point precompute.cache_dir at another folder (or unset it), or delete that one",
        )
    names = cache_names(shards)
    fingerprints = storage.fingerprints(shards)
    missing_shards(shards, fingerprints)
    plan = plan_precompute(
        shards, names, fingerprints, done_entries(cache_dir, names), spec_digest(spec)
    )
    for name, why in list(plan.stale.items())[:MAX_STALE_LINES]:
        print(f"precompute: {name}: {why}; encoding it again", flush=True)
    if len(plan.stale) > MAX_STALE_LINES:
        print(f"precompute: and {len(plan.stale) - MAX_STALE_LINES} more shards to encode again")
    done, todo = plan.done, plan.todo
    print(f"precompute: {len(done)} of {len(shards)} shards already cached in {cache_dir}")

    started = time.perf_counter()
    previous = storage.join(cache_dir, "manifest.json")
    run_id = (
        json.loads(storage.read_bytes(previous)).get("mlflow_run_id")
        if not todo and storage.exists(previous)
        else None
    )
    if todo:
        run_id = _start_run(config, layout, spec, cache_dir)
    status = "FAILED"
    try:
        budget = BadBudget(len(shards), config.precompute.max_bad_fraction)
        for entry in done:
            budget.add(entry)
        _encode(config, layout, spec, cache_dir, todo, budget, progress, fingerprints)
        manifest = write_cache_manifest(
            config, spec, cache_dir, names, layout.autoencoder_dir, run_id
        )
        status = "FINISHED"
    finally:
        if todo:
            _end_run(layout, run_id, status, manifest if status == "FINISHED" else None, started)
    return cache_dir


def _end_run(
    layout: RunLayout, run_id: str, status: str, manifest: dict | None, started: float
) -> None:
    if manifest is not None:
        seconds = time.perf_counter() - started
        tracker = MLflowTracker(layout.tracking_uri, run_id, layout.mlflow_spool)
        filtered = manifest["num_filtered"]
        tracker.log_metrics(
            {
                "num_samples": manifest["num_samples"],
                "num_bad": manifest["num_bad"],
                "num_filtered": sum(filtered.values()),
                "seconds": seconds,
                # The bucket histogram, one metric per size (`bucket_512x512`).
                **{f"bucket_{size}": n for size, n in manifest["bucket_histogram"].items()},
            },
            0,
        )
        tracker.log_text(json.dumps(manifest, indent=2), "manifest.json")
        summary = {"bucket_histogram": manifest["bucket_histogram"], "num_filtered": filtered}
        tracker.log_text(json.dumps(summary, indent=2), "data_summary.json")
        tracker.close()
        print(f"precompute: done in {seconds:.1f} s", flush=True)
    end_run(layout.tracking_uri, run_id, status)
