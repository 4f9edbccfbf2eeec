"""Experiment tracking in MLflow, behind one small interface.

A job's MLflow run is created once, by the driver (`start_run`), and its id is handed to
every worker. Rank 0 logs through `MLflowTracker`; every other rank gets `NullTracker`, so the
training loop calls the same methods everywhere without asking which rank it is.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str] | None = None,
    artifact_root: Path | None = None,
) -> str:
    """Create the job's one MLflow run with its params; returns the run id for all ranks."""
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        # A local store keeps artifacts beside it; a tracking server decides for itself.
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        location = artifact_root.resolve().as_uri() if artifact_root and local else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


def reopen_run(uri: str, run_id: str) -> None:
    """A resumed job logs into its earlier run: mark it running again."""
    _client(uri).update_run(run_id, status="RUNNING")


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status=status)


class NullTracker:
    """Accepts every call and does nothing: what non-zero ranks log through."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def close(self) -> None:
        pass


class MLflowTracker(NullTracker):
    """Logs into an existing run by id (never opens a run of its own)."""

    def __init__(self, uri: str, run_id: str):
        self.client = _client(uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=False)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self.client.log_image(self.run_id, image, key=key, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, file_name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / file_name
            target.write_text(text)
            self.client.log_artifact(self.run_id, str(target))

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def close(self) -> None:
        import mlflow

        # Asynchronous metric batches must land before the process exits.
        mlflow.flush_async_logging()


def tracker_for(rank: int, uri: str | None, run_id: str | None) -> NullTracker:
    """Rank 0 with a run gets the real tracker; everyone else the null one."""
    if rank == 0 and uri and run_id:
        return MLflowTracker(uri, run_id)
    return NullTracker()
