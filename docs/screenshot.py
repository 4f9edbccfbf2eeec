"""Screenshot a real run in the MLflow UI with headless Chromium (the README's picture).

    python docs/screenshot.py [--store sqlite:///runs/mlflow.db] [--run demo] \
        [--out docs/mlflow-run.png]

Starts `mlflow ui` on a free loopback port against the store, opens the run's "Model
metrics" page (loss, throughput, the FID-style score and the sample grids logged by step)
in headless Chromium (`apt-get install chromium`), writes the PNG, and stops the UI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_run(store: str, run_name: str) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"attributes.run_name = '{run_name}' and tags.`ldm.stage` = 'train'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise SystemExit(f"no training run named {run_name!r} in {store}: run `make demo` first")
    return runs[0].info.experiment_id, runs[0].info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=f"sqlite:///{ROOT / 'runs' / 'mlflow.db'}")
    parser.add_argument("--artifacts", default=str(ROOT / "runs" / "mlartifacts"))
    parser.add_argument("--run", default="demo")
    parser.add_argument("--out", default=str(ROOT / "docs" / "mlflow-run.png"))
    parser.add_argument("--size", default="1600,1500", help="window width,height in pixels")
    args = parser.parse_args()

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("headless Chromium is needed: apt-get install chromium")
    experiment_id, run_id = find_run(args.store, args.run)
    port = free_port()
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    ui = subprocess.Popen(
        [mlflow, "ui", "--backend-store-uri", args.store, "--host", "127.0.0.1"]
        + ["--port", str(port), "--default-artifact-root", Path(args.artifacts).as_uri()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1).close()
                break
            except OSError:
                if ui.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("mlflow ui did not start") from None
                time.sleep(0.3)
        url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics"
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [
                    chromium,
                    "--headless=new",
                    "--no-sandbox",  # containers run as root
                    "--disable-gpu",
                    "--hide-scrollbars",
                    f"--user-data-dir={profile}",
                    f"--window-size={args.size}",
                    "--virtual-time-budget=30000",  # let the app fetch and draw its charts
                    f"--screenshot={args.out}",
                    url,
                ],
                check=True,
                capture_output=True,
                timeout=180,
            )
        print(f"wrote {args.out} ({url})")
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


if __name__ == "__main__":
    main()
