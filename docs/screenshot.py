"""Screenshot a real run in the MLflow UI with headless Chromium (the README's picture).

    python docs/screenshot.py [--store sqlite:///runs/mlflow.db] [--run demo] \
        [--out docs/mlflow-run.png]

Starts `mlflow ui` on a free loopback port against the store, shoots the run's "Model
metrics" page (charts by step) and its newest sample grid in the artifacts view with headless
Chromium (`apt-get install chromium`), puts the two side by side, and stops the UI.
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


def latest_grid(store: str, run_id: str) -> str:
    """The newest sample grid logged with the run (the highest step)."""
    from mlflow.tracking import MlflowClient

    grids = [
        a.path
        for a in MlflowClient(store).list_artifacts(run_id, "images")
        if a.path.endswith(".png") and "+step+" in a.path
    ]
    if not grids:
        raise SystemExit(f"run {run_id} has no sample grids")
    return max(grids, key=lambda p: int(p.split("+step+")[1].split("+")[0]))


def shoot(chromium: str, url: str, out: Path, size: str, tmp: str) -> None:
    subprocess.run(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",  # containers run as root
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp}/profile",
            f"--window-size={size}",
            "--virtual-time-budget=120000",  # let the app fetch and draw its charts
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )


def side_by_side(left: Path, right: Path, out: Path) -> None:
    from PIL import Image

    a, b = Image.open(left).convert("RGB"), Image.open(right).convert("RGB")
    height = min(a.height, b.height, 900)  # the first screenful: charts and the grid
    canvas = Image.new("RGB", (a.width + b.width, height), "white")
    canvas.paste(a.crop((0, 0, a.width, height)), (0, 0))
    canvas.paste(b.crop((0, 0, b.width, height)), (a.width, 0))
    canvas = canvas.resize((canvas.width * 2 // 3, height * 2 // 3), Image.Resampling.LANCZOS)
    canvas.save(out, optimize=True)


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
        run_url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
        grid = latest_grid(args.store, run_id)
        with tempfile.TemporaryDirectory() as tmp:
            charts, images = Path(tmp) / "charts.png", Path(tmp) / "grid.png"
            shoot(chromium, f"{run_url}/model-metrics", charts, args.size, tmp)
            shoot(chromium, f"{run_url}/artifacts/{grid}", images, args.size, tmp)
            side_by_side(charts, images, Path(args.out))
        print(f"wrote {args.out} ({run_url}: model metrics, and {grid} in the artifacts view)")
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


if __name__ == "__main__":
    main()
