"""Launching the training stage: checks on the driver, then Ray Train workers.

The driver validates everything it can before any worker starts (the cache exists and was
built for this config), creates the job's one MLflow run (or finds it in the checkpoint it
resumes from), and runs a Ray Train `TorchTrainer` whose workers each run
`training.loop.train_worker` with a DeepSpeed engine.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.config import ExperimentConfig
from orchestrator.errors import LdmError


def worker_env() -> dict[str, str]:
    """Environment every Ray worker gets: CPU DeepSpeed, offline models, caches kept local."""
    keys = (
        "DS_ACCELERATOR",
        "TORCH_EXTENSIONS_DIR",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "MLFLOW_DISABLE_TELEMETRY",
        "DO_NOT_TRACK",
        "TOKENIZERS_PARALLELISM",
        "PYTHONWARNINGS",
    )
    return {k: os.environ[k] for k in keys if k in os.environ}


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker."""
    import ray
    import ray.train

    from training.loop import train_worker

    config = ExperimentConfig.model_validate(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    node = ray.get_runtime_context().get_node_id()
    print(f"train: worker rank {rank} on node {node}", flush=True)

    def report(metrics: dict[str, Any], tag_dir: Path | None) -> None:
        # Ray Train registers a small pointer; the tag on storage (with its commit marker)
        # stays the source of truth, so a large checkpoint is never copied twice.
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0 and tag_dir is not None:
                Path(tmp, "ldm_checkpoint.json").write_text(json.dumps({"tag": str(tag_dir)}))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(
                metrics,
                checkpoint=checkpoint,
                checkpoint_dir_name=tag_dir.name if tag_dir else None,
            )

    train_worker(config, Path(loop_config["cache_dir"]), loop_config["mlflow_run_id"], report)


def train(config: ExperimentConfig) -> dict[str, Any]:
    """Run the training stage to `train.num_steps`; resumes per `train.resume`."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from data_pipeline.cache import check_enough_shards, check_spec, read_manifest
    from data_pipeline.precompute import cache_spec, resolve_cache_dir
    from orchestrator.cluster import ray_session
    from training.checkpoint import TRAIN_STATE, TrainState, resolve_resume
    from training.tracking import end_run, start_run

    spec = cache_spec(config)
    cache_dir = resolve_cache_dir(config, spec)
    manifest = read_manifest(cache_dir)
    check_spec(cache_dir, manifest, spec)
    check_enough_shards(
        cache_dir, manifest, config.train.num_workers, config.train.num_loader_workers
    )
    config = config.model_copy(deep=True)
    config.tracking.uri = config.tracking_uri  # workers must not re-derive it from their env

    tag = resolve_resume(config.train.resume, config.checkpoint_dir)
    run_id = TrainState.load(tag / TRAIN_STATE).mlflow_run_id if tag else None
    if run_id is None:
        run_id = start_run(
            config.tracking.uri,
            config.tracking.experiment,
            config.run.name,
            config.flat(),
            tags={
                "ldm.stage": "train",
                "ldm.world_size": str(config.train.num_workers),
                "ldm.zero_stage": str(config.train.zero_stage),
                "ldm.cache_spec": manifest["spec_digest"],
                "ldm.ray_job_id": os.environ.get("RAY_JOB_ID", ""),
                "ldm.cluster_address": config.cluster.address or "embedded",
            },
            artifact_root=Path(config.run.root) / "mlartifacts",
        )
    print(f"train: MLflow run {run_id} at {config.tracking.uri}", flush=True)
    c = config.cluster
    status = "FAILED"
    try:
        with ray_session(c.address, runtime_env={"env_vars": worker_env()}):
            trainer = TorchTrainer(
                _ray_worker,
                train_loop_config={
                    "config": config.to_dict(),
                    "cache_dir": str(cache_dir),
                    "mlflow_run_id": run_id,
                },
                scaling_config=ScalingConfig(
                    num_workers=config.train.num_workers,
                    use_gpu=c.use_gpu,
                    resources_per_worker={
                        "CPU": c.num_cpus_per_worker,
                        **({"GPU": 1} if c.use_gpu else {}),
                    },
                    placement_strategy=c.placement_strategy,
                ),
                run_config=RunConfig(
                    name="ray_train",
                    storage_path=str(config.run_dir.resolve()),
                    failure_config=FailureConfig(max_failures=0),
                ),
            )
            result = trainer.fit()
        status = "FINISHED"
    except Exception as err:
        user_error = _find_user_error(err)
        if user_error is not None:
            raise user_error from None
        raise
    finally:
        end_run(config.tracking.uri, run_id, status)
    return {
        "run_id": run_id,
        "metrics": dict(result.metrics or {}),
        "checkpoint_dir": str(config.checkpoint_dir),
    }


def _find_user_error(err: BaseException) -> LdmError | None:
    """Ray wraps worker exceptions; surface an LdmError raised inside a worker as itself."""
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, LdmError):
            original = getattr(e, "cause", None) or e  # RayTaskError keeps the original here
            return LdmError(original.args[0] if original.args else str(original))
        # Ray re-raises worker errors as RayTaskError subclasses of the original type, inside
        # a WorkerGroupError that maps ranks to their failures.
        stack += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    return None
