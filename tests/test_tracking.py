"""The MLflow tracker against a real `mlflow server`: never blocks, survives outages."""

import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.mlflow_server import MlflowServer
from training.tracking import MLflowTracker, start_run

pytestmark = pytest.mark.slow


def history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def wait_for(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_metrics_survive_a_server_outage_and_a_crash(tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    try:
        run_id = start_run(server.uri, "outage", "r", {"a": 1})
        client = MlflowClient(server.uri)
        tracker = MLflowTracker(server.uri, run_id, tmp_path / "spool", retry_max_s=1.0)
        for step in range(1, 4):
            tracker.log_metrics({"loss": 1.0 / step}, step)
        wait_for(lambda: tracker.pending() == 0)

        server.kill()
        started = time.perf_counter()
        for step in range(4, 8):  # the server is down: calls must still return at once
            tracker.log_metrics({"loss": 1.0 / step}, step)
        tracker.log_image(np.zeros((8, 8, 3), np.uint8), "samples", 7)
        assert time.perf_counter() - started < 0.5
        time.sleep(2)  # a few failed delivery attempts
        assert tracker.pending() > 0

        server.start()
        wait_for(lambda: tracker.pending() == 0)
        assert history(client, run_id, "loss") == [(s, 1.0 / s) for s in range(1, 8)]
        assert [a.path for a in client.list_artifacts(run_id, "images")]

        # A crash while the server is down: what was logged stays on disk, and a tracker
        # for the same run (the restarted job) delivers it.
        server.kill()
        tracker.log_metrics({"loss": 0.125}, 8)
        tracker.flush_timeout_s = 0.5
        tracker.close()  # gives up quickly, leaves the record spooled
        server.start()
        again = MLflowTracker(server.uri, run_id, tmp_path / "spool")
        wait_for(lambda: again.pending() == 0)
        again.close()
        assert history(client, run_id, "loss")[-1] == (8, 0.125)
        assert len(history(client, run_id, "loss")) == 8  # nothing delivered twice
    finally:
        server.kill()


def test_a_full_buffer_drops_the_oldest_and_says_so(tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    run_id = start_run(server.uri, "bound", "r", {})
    server.kill()
    tracker = MLflowTracker(server.uri, run_id, tmp_path / "spool", max_pending=5)
    for step in range(20):
        tracker.log_metrics({"x": step}, step)
    assert tracker.pending() == 5
    server.start()
    try:
        wait_for(lambda: tracker.pending() == 0)
        tracker.close()
        client = MlflowClient(server.uri)
        assert [s for s, _ in history(client, run_id, "x")] == list(range(15, 20))
        assert history(client, run_id, "tracking_dropped_records")[-1][1] == 15
    finally:
        server.kill()
