"""Launching the training stage: checks on the driver, then Ray Train workers.

The driver validates everything it can before any worker starts (the cache exists and was
built for this config), creates the job's one MLflow run (or finds it in the checkpoint it
resumes from), and runs a Ray Train `TorchTrainer` whose workers each run
`training.loop.train_worker` with a DeepSpeed engine.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

from data_pipeline import storage
from orchestrator.config import ExperimentConfig
from orchestrator.errors import LdmError, Preempted


class _GraceExpired(Exception):
    pass


class _GracefulStop:
    """SIGTERM/SIGINT -> ask every rank to checkpoint and stop, within a grace period.

    The request is a file on the run's storage that all ranks poll each step; SIGALRM ends
    the wait when the grace period runs out, and a second signal ends it at once. Either
    way the newest committed checkpoint stays valid, so only unsaved steps are lost.
    """

    def __init__(self, stop_file: str, grace_s: float):
        self.stop_file, self.grace_s = stop_file, grace_s
        self.signal_name: str | None = None
        self.saved_in_time = True
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:  # a second signal: stop waiting
            self.saved_in_time = False
            raise _GraceExpired()
        self.signal_name = signal.Signals(signum).name
        storage.makedirs(storage.dirname(self.stop_file))
        storage.write_bytes(self.stop_file, self.signal_name.encode())
        print(
            f"train: {self.signal_name}: saving a checkpoint and stopping "
            f"(grace {self.grace_s:g} s)",
            flush=True,
        )
        signal.setitimer(signal.ITIMER_REAL, self.grace_s)

    def _expire(self, signum: int, frame: Any) -> None:
        self.saved_in_time = False
        raise _GraceExpired()

    def __enter__(self) -> _GracefulStop:
        storage.remove(self.stop_file)  # a request left by an earlier, killed job
        for sig, handler in (
            (signal.SIGTERM, self._handle),
            (signal.SIGINT, self._handle),
            (signal.SIGALRM, self._expire),
        ):
            self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
    print(f"train: worker rank {rank} on node {node} pid {os.getpid()}", flush=True)

    # After a worker failure Ray Train runs this function again: continue from the newest tag
    # this job committed, whether or not Ray Train had registered it before the failure.
    resume_from = loop_config["resume_from"]
    newest = newest_tag(config)
    if newest is not None and storage.basename(newest) > (loop_config["newest_at_start"] or ""):
        resume_from = newest

    def report(metrics: dict[str, Any], tag_dir: str | None) -> None:
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
                checkpoint_dir_name=storage.basename(tag_dir) if tag_dir else None,
            )

    train_worker(
        config,
        loop_config["cache_dir"],
        loop_config["mlflow_run_id"],
        resume_from,
        report,
    )


def newest_tag(config: ExperimentConfig) -> str | None:
    """The newest committed checkpoint of this run, on its storage (a folder or a URI)."""
    from training.checkpoint import latest_committed, remote_latest

    if config.remote_checkpoints is not None:
        return remote_latest(config.remote_checkpoints)
    tag = latest_committed(config.checkpoint_dir)
    return str(tag) if tag else None


def _ray_storage(config: ExperimentConfig) -> tuple[str, Any]:
    """Ray Train's storage: the run folder, or the run's prefix on the object store (through
    the same fsspec filesystem and credentials as everything else)."""
    if config.remote_checkpoints is None:
        return str(config.run_dir.resolve()), None
    import fsspec
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(config.storage_dir)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def train(config: ExperimentConfig) -> dict[str, Any]:
    """Run the training stage to `train.num_steps`; resumes per `train.resume`."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from data_pipeline.cache import check_spec, read_manifest
    from data_pipeline.precompute import cache_spec, resolve_cache_dir
    from data_pipeline.stream import Layout, check_enough_samples
    from orchestrator.cluster import ray_session, worker_scaling
    from training.checkpoint import TRAIN_STATE, TrainState, resolve_resume
    from training.tracking import end_run, log_cache_input, reopen_run, start_run

    if config.train.eval_every:
        from training.evaluation import check_ready

        check_ready(config)
    spec = cache_spec(config)
    cache_dir = resolve_cache_dir(config, spec)
    manifest = read_manifest(cache_dir)
    check_spec(cache_dir, manifest, spec)
    t = config.train
    check_enough_samples(
        cache_dir,
        sum(s["num_samples"] for s in manifest["shards"]),
        Layout(t.num_workers, max(1, t.num_loader_workers), t.micro_batch_size),
    )
    config = config.model_copy(deep=True)
    config.tracking.uri = config.tracking_uri  # workers must not re-derive it from their env

    newest = newest_tag(config)
    if config.train.resume == "never" and newest is not None:
        raise LdmError(
            f"train.resume=never, but {storage.dirname(newest)} already holds checkpoints "
            f"(newest {storage.basename(newest)}): choose another run.name, delete them, "
            "or resume=auto"
        )
    tag = resolve_resume(config.train.resume, newest)
    resumed = TrainState.load(storage.join(tag, TRAIN_STATE)) if tag else None
    if resumed and resumed.world_size not in (0, t.num_workers) and t.zero_stage == 3:
        raise LdmError(
            f"{tag} was saved by {resumed.world_size} ZeRO-3 ranks: resume it with "
            f"train.num_workers={resumed.world_size} (ZeRO-1/2 checkpoints resume on any count)"
        )
    run_id = resumed.mlflow_run_id if resumed else None
    previous_status = None  # of a reopened run, restored if this job never trains
    tags = lineage_tags(config, cache_dir, manifest)
    if run_id is not None:
        previous_status = reopen_run(config.tracking.uri, run_id, tags)
    else:
        run_id = start_run(
            config.tracking.uri,
            config.tracking.experiment,
            config.run.name,
            config.flat(),
            tags={"ldm.stage": "train", **tags},
            artifact_root=Path(config.run.root) / "mlartifacts",
        )
        log_cache_input(config.tracking.uri, run_id, cache_dir, manifest)
    print(f"train: MLflow run {run_id} at {config.tracking.uri}", flush=True)
    c = config.cluster
    status, trained = "FAILED", False
    stop = _GracefulStop(config.stop_file, config.train.preempt_grace_s)
    storage_path, storage_filesystem = _ray_storage(config)
    try:
        with ray_session(c.address, runtime_env={"env_vars": worker_env()}):
            trainer = TorchTrainer(
                _ray_worker,
                train_loop_config={
                    "config": config.to_dict(),
                    "cache_dir": str(cache_dir),
                    "mlflow_run_id": run_id,
                    "resume_from": tag,
                    "newest_at_start": storage.basename(newest) if newest else None,
                },
                scaling_config=worker_scaling(c, config.train.num_workers),
                run_config=RunConfig(
                    name="ray_train",
                    storage_path=storage_path,
                    storage_filesystem=storage_filesystem,
                    failure_config=FailureConfig(max_failures=config.train.max_failures),
                ),
            )
            with stop:  # installed after ray.init, which sets a SIGTERM handler of its own
                trained = True
                result = trainer.fit()
        status = "KILLED" if stop.signal_name else "FINISHED"
    except _GraceExpired:
        status = "KILLED"
    except Exception as err:
        user_error = _find_user_error(err)
        if user_error is not None:
            raise user_error from None
        raise
    finally:
        if not trained and previous_status:  # e.g. an unreachable cluster: nothing changed
            status = previous_status
        end_run(config.tracking.uri, run_id, status)
        storage.remove(config.stop_file)
    if stop.signal_name:
        newest = newest_tag(config)
        saved = "the checkpoint was saved" if stop.saved_in_time else "the grace period ran out"
        raise Preempted(
            f"stopped by {stop.signal_name}: {saved}; newest checkpoint "
            f"{storage.basename(newest) if newest else '(none)'}; "
            "run the same command again to resume"
        )
    if config.tracking.log_model:
        log_final_model(config, run_id)
    return {
        "run_id": run_id,
        "metrics": dict(result.metrics or {}),
        "checkpoint_dir": config.remote_checkpoints or str(config.checkpoint_dir),
    }


def lineage_tags(config: ExperimentConfig, cache_dir: str, manifest: dict) -> dict[str, str]:
    """What produced this run: code, cluster, job, and the cache and autoencoder it used."""
    import hashlib
    import json

    from data_pipeline import storage

    ae_lineage = config.autoencoder_dir / "lineage.json"
    manifest_bytes = storage.read_bytes(storage.join(cache_dir, "manifest.json"))
    commit = git_commit()
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
        "ldm.autoencoder_run_id": json.loads(ae_lineage.read_text()).get("mlflow_run_id", "")
        if ae_lineage.is_file()
        else "",
        "mlflow.source.git.commit": commit,
    }


def git_commit() -> str:
    """The commit of the code that runs (with `+dirty` for uncommitted changes), if known."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def log_final_model(config: ExperimentConfig, run_id: str) -> None:
    """Export the final checkpoint as a diffusers pipeline into the run's `model` artifact."""
    from training.checkpoint import pull
    from training.export import export_pipeline
    from training.tracking import MLflowTracker

    newest = newest_tag(config)
    if newest is None:
        return
    tag = (
        pull(newest, config.checkpoint_dir / ".pulled")
        if storage.is_remote(newest)
        else Path(newest)
    )
    out = export_pipeline(tag, config.run_dir / "export" / tag.name, overwrite=True)
    tracker = MLflowTracker(
        config.tracking.uri,
        run_id,
        config.run_dir / "mlflow-spool",
        flush_timeout_s=config.tracking.flush_timeout_s,
    )
    tracker.log_artifact(out, "model")
    tracker.log_artifact(tag / "config.yaml", "config")
    tracker.close()
    print(f"train: exported {tag.name} to {out} and logged it as the run's model artifact")


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
