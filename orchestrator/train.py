"""`ldm train`: the UNet stage's driver.

It checks everything it can before any worker starts (the cache exists and was built for
this config, holds enough samples for the layout, the evaluation can run, the resume policy
allows what is on storage), then hands the ranks to the stage launcher: each runs
`training.loop.train_rank` with a DeepSpeed engine (imported only where a rank runs, not
here). At the end the final checkpoint is exported as a diffusers pipeline into the run's
MLflow `model` artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from core import storage
from core.config import ExperimentConfig
from core.errors import LdmError
from core.layout import RunLayout
from core.loader import load_saved_config
from core.resume import check_resumable
from data_pipeline.cache import (
    bucket_histogram,
    check_sources,
    check_spec,
    read_manifest,
    spec_digest,
)
from data_pipeline.precompute import cache_spec, resolve_cache_dir
from data_pipeline.stream import Layout, check_enough_samples, epoch_plan
from orchestrator.jobs import source_commit
from orchestrator.launcher import Stage, check_local_gpu, launch
from training import checkpoint as ckpt
from training.evaluation import check_ready
from training.init_from import check_source, staged
from training.tracking import MLflowTracker, log_cache_input


def train(config: ExperimentConfig) -> dict[str, Any]:
    """Run the training stage to `train.num_steps`; resumes per `train.resume`."""
    layout = RunLayout.of(config)
    t = config.train
    check_local_gpu(config, t.num_workers, t.max_failures)
    if t.eval_every:
        check_ready(config)
    spec = cache_spec(config, layout.autoencoder_dir)
    cache_dir = resolve_cache_dir(config, spec)
    manifest = read_manifest(cache_dir)
    check_spec(cache_dir, manifest, spec)
    check_sources(cache_dir, manifest)
    check_enough_samples(
        cache_dir,
        epoch_plan(manifest, config.run.seed),
        Layout(t.num_workers, max(1, t.num_loader_workers), t.micro_batch_size),
    )

    newest = ckpt.newest(layout.checkpoints)
    if t.resume == "never" and newest is not None:
        raise LdmError(
            f"train.resume=never, but {storage.dirname(newest)} already holds checkpoints "
            f"(newest {storage.basename(newest)}): choose another run.name, delete them, "
            "or resume=auto"
        )
    tag = ckpt.resolve_resume(t.resume, newest)
    resumed = ckpt.TrainState.load(storage.join(tag, ckpt.TRAIN_STATE)) if tag else None
    if resumed and resumed.world_size not in (0, t.num_workers) and t.zero_stage == 3:
        raise LdmError(
            f"{tag} was saved by {resumed.world_size} ZeRO-3 ranks: resume it with "
            f"train.num_workers={resumed.world_size} (ZeRO-1/2 checkpoints resume on any count)"
        )
    if tag is not None and storage.exists(storage.join(tag, ckpt.CONFIG_YAML)):
        changed = check_resumable(
            tag,
            load_saved_config(tag),
            config,
            resumed.settings.get("cache_spec_digest") if resumed else None,
            spec_digest(spec),
        )
        if changed:
            print(f"train: continuing {tag} with changed {'; '.join(changed)}", flush=True)
    init = None
    # An object-store tag: each node stages its own copy (as the driver does here), so the
    # ranks and the MLflow tag get the URI; a local source goes by its resolved path.
    remote_source = t.init_from is not None and storage.is_remote(t.init_from)
    if t.init_from is not None and tag is not None:
        # A restarted or continued job goes on from its own weights, never back to the start.
        print(
            f"train: train.init_from is ignored: the run continues its own checkpoint "
            f"{storage.basename(tag)}",
            flush=True,
        )
    elif t.init_from is not None:
        init = check_source(
            staged(t.init_from, layout.run_dir / "staging"), config, spec["latent_channels"]
        )
        print(
            f"train: a new run from the weights of {init.describe()}: fresh optimizer, "
            "learning-rate schedule and data order, from step 0",
            flush=True,
        )
    launched = launch(
        config,
        layout,
        Stage(
            name="train",
            rank_function="training.loop:train_rank",
            num_workers=t.num_workers,
            max_failures=t.max_failures,
            preempt_grace_s=t.preempt_grace_s,
            checkpoints=layout.checkpoints,
            run_name=config.run.name,
            tags={
                **lineage_tags(config, layout, cache_dir, manifest),
                **(init.tags(t.init_from if remote_source else None) if init else {}),
            },
            args={
                "cache_dir": str(cache_dir),
                "resume_from": tag,
                "newest_at_start": newest,
                "init_from": None
                if init is None
                else (t.init_from if remote_source else str(init.location)),
            },
            resume_run_id=resumed.mlflow_run_id if resumed else None,
            on_start=lambda run_id: log_cache_input(
                layout.tracking_uri, run_id, cache_dir, manifest
            ),
        ),
    )
    if config.tracking.log_model:
        log_final_model(layout, launched.run_id, config.tracking.flush_timeout_s)
    return {
        "run_id": launched.run_id,
        "metrics": launched.metrics,
        "checkpoint_dir": layout.checkpoints.root,
    }


def lineage_tags(
    config: ExperimentConfig, layout: RunLayout, cache_dir: str, manifest: dict
) -> dict[str, str]:
    """What produced this run: code, cluster, job, and the cache and autoencoder it used."""
    ae_lineage = storage.join(layout.autoencoder_dir, "lineage.json")
    manifest_bytes = storage.read_bytes(storage.join(cache_dir, "manifest.json"))
    commit = source_commit()
    return {
        "ldm.world_size": str(config.train.num_workers),
        "ldm.zero_stage": str(config.train.zero_stage),
        "ldm.ray_job_id": os.environ.get("RAY_JOB_ID", ""),
        "ldm.cluster_address": config.cluster.address or "embedded",
        "ldm.git_commit": commit,
        "ldm.cache_dir": str(cache_dir),
        "ldm.cache_spec": manifest["spec_digest"],
        "ldm.cache_manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "ldm.precompute_run_id": manifest.get("mlflow_run_id") or "",
        "ldm.cache_num_samples": str(manifest["num_samples"]),
        # Samples per image size (HxW), and what the filters left out: what this run saw.
        "ldm.cache_buckets": json.dumps(bucket_histogram(manifest)),
        "ldm.cache_filtered": json.dumps(manifest.get("num_filtered", {})),
        "ldm.autoencoder_run_id": json.loads(storage.read_bytes(ae_lineage)).get(
            "mlflow_run_id", ""
        )
        if storage.exists(ae_lineage)
        else "",
        "mlflow.source.git.commit": commit,
    }


def log_final_model(layout: RunLayout, run_id: str, flush_timeout_s: float) -> None:
    """Export the final checkpoint as a diffusers pipeline into the run's `model` artifact."""
    newest = ckpt.newest(layout.checkpoints)
    if newest is None:
        return
    # diffusers' pipeline (seconds to import) at the end only: the driver trains nothing.
    from orchestrator.export import export_pipeline  # noqa: PLC0415

    tag = ckpt.local_tag(newest, layout.checkpoints)
    out = export_pipeline(tag, layout.run_dir / "export" / tag.name, overwrite=True)
    tracker = MLflowTracker(
        layout.tracking_uri, run_id, layout.mlflow_spool, flush_timeout_s=flush_timeout_s
    )
    tracker.log_artifact(out, "model")
    tracker.log_artifact(tag / ckpt.CONFIG_YAML, "config")
    tracker.close()
    print(f"train: exported {tag.name} to {out} and logged it as the run's model artifact")
