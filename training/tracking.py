"""Experiment tracking in MLflow, behind one small interface.

A job's MLflow run is created once, by the driver (`start_run`), and its id is handed to
every worker. Rank 0 logs through `MLflowTracker`; every other rank gets `NullTracker`, so the
training loop calls the same methods everywhere without asking which rank it is.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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


def reopen_run(uri: str, run_id: str, tags: dict[str, str] | None = None) -> str:
    """A resumed job logs into its earlier run: mark it running again, refresh its tags.
    Returns the status it had, to restore if the job never gets to train."""
    client = _client(uri)
    previous = client.get_run(run_id).info.status
    client.update_run(run_id, status="RUNNING")
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    return previous


def log_cache_input(uri: str, run_id: str, cache_dir: str, manifest: dict[str, Any]) -> None:
    """The latent cache as the run's dataset input: where it is, and its spec digest."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    dataset = MetaDataset(
        source=resolve_dataset_source(str(cache_dir)),
        name=f"latent-cache-{manifest['spec_digest'][:16]}",
        digest=manifest["spec_digest"][:36],
    )
    context = InputTag(key="mlflow.data.context", value="training")
    _client(uri).log_inputs(
        run_id, datasets=[DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[context])]
    )


def end_run(uri: str, run_id: str, status: str = "FINISHED", attempts: int = 3) -> None:
    """Mark the run ended; a tracking server that stays unreachable only costs a warning."""
    for attempt in range(attempts):
        try:
            _client(uri).set_terminated(run_id, status=status)
            return
        except Exception as err:  # never let bookkeeping fail a job that did its work
            if attempt == attempts - 1:
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                print(
                    f"tracking: could not mark MLflow run {run_id} {status} at {uri} ({first}); "
                    "it shows as RUNNING until a resumed job ends it",
                    flush=True,
                )
            else:
                time.sleep(2)


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


MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call


class MLflowTracker(NullTracker):
    """Logs into an existing run by id, never blocking the caller and surviving outages.

    Every call appends a record to a write-ahead log on disk (`spool`) and returns; a
    background thread delivers records in order and advances a delivered counter. When the
    tracking server is unreachable, records wait (and training goes on); they are delivered
    once it answers again. Past `max_pending` undelivered records the oldest are dropped and
    counted (`tracking_dropped_records` is logged when delivery resumes). A tracker opened on
    the same spool later (a restarted or resumed job) first delivers what an earlier process
    left undelivered, so a crash loses nothing either. `close()` waits at most
    `flush_timeout_s` for delivery.
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        spool: Path | None = None,
        max_pending: int = 50_000,
        flush_timeout_s: float = 30.0,
        retry_max_s: float = 10.0,
    ):
        # Fail a request fast and let this class retry: MLflow's own retries (7, with
        # exponential backoff, 120 s timeouts) would hold records back for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = _client(uri)
        self.uri, self.run_id = uri, run_id
        self.max_pending, self.flush_timeout_s = max_pending, flush_timeout_s
        self.retry_max_s = retry_max_s
        self.spool = Path(spool or tempfile.mkdtemp(prefix="ldm-mlflow-")) / run_id
        self.spool.mkdir(parents=True, exist_ok=True)
        self._log = self.spool / "records.jsonl"
        self._done = self.spool / "delivered"
        self._lock = threading.Condition()
        self._pending: collections.deque[tuple[int, dict]] = collections.deque()
        self._next_index, self._delivered, self._dropped = 0, 0, 0
        self._closing, self._down_since, self._inflight = False, None, 0
        if self._log.exists():  # what an earlier process of this run left undelivered
            done = int(self._done.read_text() or 0) if self._done.exists() else 0
            lines = self._log.read_text().splitlines()
            for index, line in enumerate(lines):
                if index >= done and line.strip():
                    try:
                        self._pending.append((index, json.loads(line)))
                    except json.JSONDecodeError:  # a line cut short by a crash
                        pass
            self._next_index, self._delivered = len(lines), done
            if self._pending:
                print(f"tracking: delivering {len(self._pending)} records left by an earlier run")
        self._file = open(self._log, "a")  # noqa: SIM115 - kept open for appends
        self._thread = threading.Thread(target=self._deliver_forever, daemon=True)
        self._thread.start()

    # The caller's side: append and return.
    def _put(self, record: dict) -> None:
        with self._lock:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            self._pending.append((self._next_index, record))
            self._next_index += 1
            while len(self._pending) > self.max_pending:
                self._pending.popleft()
                self._dropped += 1
            self._lock.notify()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        values = [[k, float(v), now, step] for k, v in metrics.items()]
        self._put({"kind": "metrics", "metrics": values})

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        path = self.spool / f"{key}_step{step:08d}.png"
        Image.fromarray(image).save(path)
        self._put({"kind": "image", "file": path.name, "key": key, "step": step})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._put({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

    def log_text(self, text: str, file_name: str) -> None:
        path = self.spool / file_name
        path.write_text(text)
        self._put({"kind": "artifact", "path": str(path), "artifact_path": None})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    # The delivery thread.
    def _deliver_forever(self) -> None:
        wait = 0.5
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._lock.wait()
                if not self._pending:
                    return
                batch = self._next_batch()
                self._inflight = len(batch)
                dropped, self._dropped = self._dropped, 0
            try:
                if dropped:
                    self._send(
                        {
                            "kind": "metrics",
                            "metrics": [
                                [
                                    "tracking_dropped_records",
                                    float(dropped),
                                    int(time.time() * 1000),
                                    0,
                                ]
                            ],
                        }
                    )
                self._send(_merged(batch))
            except Exception as err:  # the server is unreachable or refused: keep, retry later
                with self._lock:
                    self._pending.extendleft(reversed(batch))
                    self._inflight = 0
                    self._dropped += dropped
                    while len(self._pending) > self.max_pending:
                        self._pending.popleft()
                        self._dropped += 1
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
                    print(
                        f"tracking: MLflow at {self.uri} is unreachable ({type(err).__name__}: "
                        f"{first}); training goes on, records wait in {self.spool}",
                        flush=True,
                    )
                with self._lock:
                    if self._closing and time.monotonic() > self._close_deadline:
                        return
                    self._lock.wait(wait)
                wait = min(wait * 2, self.retry_max_s)
                continue
            wait = 0.5
            with self._lock:
                self._inflight = 0
                self._delivered = batch[-1][0] + 1
                backlog = len(self._pending)
                if not backlog:  # everything delivered: start the log afresh
                    self._file.truncate(0)
                    self._delivered = self._next_index = 0
                self._done.write_text(str(self._delivered))
            if self._down_since is not None:
                seconds = time.monotonic() - self._down_since
                self._down_since = None
                print(
                    f"tracking: MLflow is back after {seconds:.0f} s; delivering the "
                    f"{backlog + len(batch)} records that waited",
                    flush=True,
                )

    def _next_batch(self) -> list[tuple[int, dict]]:
        """Consecutive metric records merge into one call; anything else goes alone."""
        first = self._pending.popleft()
        batch, count = [first], len(first[1].get("metrics", ()))
        while (
            first[1]["kind"] == "metrics"
            and self._pending
            and self._pending[0][1]["kind"] == "metrics"
            and count + len(self._pending[0][1]["metrics"]) <= MAX_METRICS_PER_BATCH
        ):
            record = self._pending.popleft()
            batch.append(record)
            count += len(record[1]["metrics"])
        return batch

    def _send(self, record: dict) -> None:
        from mlflow.entities import Metric

        kind = record["kind"]
        if kind == "metrics":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
            self.client.log_batch(self.run_id, metrics=metrics)
        elif kind == "image":
            path = self.spool / record["file"]
            if path.exists():
                with Image.open(path) as image:
                    self.client.log_image(
                        self.run_id, image.copy(), key=record["key"], step=record["step"]
                    )
                path.unlink()
        elif kind == "artifact":
            path = Path(record["path"])
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), record["artifact_path"])
            elif path.exists():
                self.client.log_artifact(self.run_id, str(path), record["artifact_path"])
        elif kind == "tags":
            for key, value in record["tags"].items():
                self.client.set_tag(self.run_id, key, value)

    def pending(self) -> int:
        """Records not yet delivered, including any being sent right now."""
        with self._lock:
            return len(self._pending) + self._inflight

    def close(self) -> None:
        """Deliver what is pending, waiting at most `flush_timeout_s`; the rest stays spooled."""
        with self._lock:
            self._closing = True
            self._close_deadline = time.monotonic() + self.flush_timeout_s
            self._lock.notify()
        self._thread.join(self.flush_timeout_s + 1)
        self._file.close()
        left = self.pending()
        if not left:  # all delivered: leave no spool behind
            shutil.rmtree(self.spool, ignore_errors=True)
            try:
                self.spool.parent.rmdir()  # the spool root, if no other run waits in it
            except OSError:
                pass
        if left:
            print(
                f"tracking: {left} records could not reach MLflow at {self.uri}; they stay in "
                f"{self.spool} and are delivered when this run is resumed",
                flush=True,
            )


def _merged(batch: list[tuple[int, dict]]) -> dict:
    if len(batch) == 1:
        return batch[0][1]
    return {"kind": "metrics", "metrics": [m for _, r in batch for m in r["metrics"]]}


def tracker_for(
    rank: int, uri: str | None, run_id: str | None, spool: Path | None = None, **kwargs
) -> NullTracker:
    """Rank 0 with a run gets the real tracker; everyone else the null one."""
    if rank == 0 and uri and run_id:
        return MLflowTracker(uri, run_id, spool, **kwargs)
    return NullTracker()


class SystemMetrics:
    """MLflow's system-metrics monitors (CPU, memory, disk, network, and GPU when present),
    sampled on this node every `every_s` seconds and logged through `tracker` as `system/*`
    on the training step axis, so an outage buffers them like every other metric."""

    def __init__(self, tracker: NullTracker, every_s: float, step: Callable[[], int]):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            self.monitors.append(GPUMonitor())
        except Exception:  # no NVIDIA GPU or no pynvml: CPU metrics only
            pass
        self.tracker, self.every_s, self.step = tracker, every_s, step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            metrics: dict[str, float] = {}
            for monitor in self.monitors:
                try:
                    monitor.collect_metrics()
                    metrics.update(monitor.aggregate_metrics())
                finally:
                    monitor.clear_metrics()
            self.tracker.log_metrics({f"system/{k}": v for k, v in metrics.items()}, self.step())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_s + 5)
