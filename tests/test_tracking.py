"""MLflow tracking against a real `mlflow server`: never blocks, survives outages and crashes;
the FID-style evaluator; `ldm runs` and `ldm ui`."""

import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import FIXTURE_IMAGES, ldm, ok
from tests.mlflow_server import MlflowServer
from training.tracking import MLflowTracker, start_run


def history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def wait_for(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_logging_survives_a_server_outage_a_crash_and_a_full_buffer(tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    try:
        client = MlflowClient(server.uri)
        crashed_run = start_run(server.uri, "outage", "crashed", {"a": 1})
        bounded_run = start_run(server.uri, "outage", "bounded", {})
        spool = tmp_path / "spool"
        crashed = MLflowTracker(server.uri, crashed_run, spool, retry_max_s=1.0)
        for step in range(1, 4):
            crashed.log_metrics({"loss": 1.0 / step}, step)
        wait_for(lambda: crashed.pending() == 0)

        server.kill()
        bounded = MLflowTracker(server.uri, bounded_run, spool, max_pending=5, retry_max_s=1.0)
        started = time.perf_counter()
        for step in range(4, 8):  # the server is down: every call still returns at once
            crashed.log_metrics({"loss": 1.0 / step}, step)
        crashed.log_image(np.zeros((8, 8, 3), np.uint8), "samples", 7)
        for step in range(20):
            bounded.log_metrics({"x": step}, step)
        assert time.perf_counter() - started < 0.5
        time.sleep(1.5)  # failed delivery attempts
        assert crashed.pending() == 5 and bounded.pending() == 5  # 15 oldest dropped
        # The job dies while the server is down: what it logged stays in the spool.
        crashed.flush_timeout_s = 0.5
        crashed.close()

        server.start()
        # The live tracker delivers its backlog by itself; the restarted job's tracker
        # (same run, same spool) delivers what the dead one left.
        restarted = MLflowTracker(server.uri, crashed_run, spool)
        wait_for(lambda: bounded.pending() == 0 and restarted.pending() == 0)
        restarted.close()
        bounded.close()
        assert history(client, crashed_run, "loss") == [(s, 1.0 / s) for s in range(1, 8)]
        assert [a.path for a in client.list_artifacts(crashed_run, "images")]
        assert [s for s, _ in history(client, bounded_run, "x")] == list(range(15, 20))
        assert history(client, bounded_run, "tracking_dropped_records")[-1][1] == 15
    finally:
        server.kill()


def test_frechet_distance_and_the_feature_network(fixture_images):
    from PIL import Image

    from training.evaluation import FeatureNet, frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + [1.0, 2.0, 0.0]) == pytest.approx(5.0, rel=1e-9)
    b = rng.normal(size=(400, 3)) * 2  # covariance 4I: Tr(I + 4I - 2*2I) = 3
    assert frechet_distance(a, b) == pytest.approx(3.0, rel=0.2)

    paths = sorted(FIXTURE_IMAGES.glob("*.png"))[:32]
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((64, 64))) for p in paths])
    features = FeatureNet()(images)
    assert features.shape == (32, 1280) and np.isfinite(features).all()
    noise = rng.integers(0, 256, size=images.shape, dtype=np.uint8)
    real_vs_real = frechet_distance(features[0::2], features[1::2])
    real_vs_noise = frechet_distance(features[0::2], FeatureNet()(noise[1::2]))
    assert real_vs_real < real_vs_noise / 2  # a pretrained network tells emoji from noise


@pytest.mark.slow
def test_runs_lists_and_ui_serves_the_local_store(pipeline):
    import subprocess
    import sys
    import urllib.request

    from tests.conftest import ROOT
    from tests.ray_cluster import free_ports

    work, _, _ = pipeline
    listed = ok(ldm("runs", str(work / "exp.yaml"))).stdout
    header, *rows = listed.splitlines()
    assert header.split()[:6] == ["name", "stage", "status", "step", "loss", "samples/s"]
    train = [r for r in rows if r.split()[:3] == ["tiny", "train", "FINISHED"]]
    assert train and float(train[0].split()[4]) > 0
    assert any(r.split()[:2] == ["tiny-autoencoder", "autoencoder"] for r in rows)

    (port,) = free_ports(1)
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "ui",
            str(work / "exp.yaml"),
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    assert r.status == 200
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, "ldm ui did not start"
                time.sleep(0.3)
    finally:
        import os
        import signal

        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def test_runs_in_an_empty_folder_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    listed = ok(ldm("runs")).stdout
    assert "no MLflow store at" in listed and "no run has logged there" in listed
    assert list(tmp_path.iterdir()) == []
