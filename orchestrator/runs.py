"""`ldm runs` and `ldm ui`: the MLflow runs of this project, from the terminal or a browser."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from core.errors import LdmError


def list_runs(uri: str, experiment: str, max_runs: int = 50) -> list[str]:
    """One line per run, newest first: name, stage, status, step, loss, samples/s, id."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        # Opening a SQLite store creates it: a look must not leave a database behind.
        return [f"no MLflow store at {uri.removeprefix('sqlite:///')} (no run has logged there)"]
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        runs = (
            client.search_runs(
                [found.experiment_id], order_by=["attributes.start_time DESC"], max_results=max_runs
            )
            if found
            else []
        )
    except MlflowException as err:
        raise LdmError(f"cannot read MLflow runs at {uri}: {str(err).splitlines()[0]}") from None
    header = ("name", "stage", "status", "step", "loss", "samples/s", "started", "run id")
    rows = [header]
    for run in runs:
        metrics = run.data.metrics
        loss_key = "loss" if "loss" in metrics else "train/l1"
        step = ""
        if loss_key in metrics:
            history = client.get_metric_history(run.info.run_id, loss_key)
            step = str(max(m.step for m in history)) if history else ""
        started = datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        rows.append(
            (
                run.info.run_name or "",
                run.data.tags.get("ldm.stage", ""),
                run.info.status,
                step,
                f"{metrics[loss_key]:.4g}" if loss_key in metrics else "",
                f"{metrics['samples_per_s']:.1f}" if "samples_per_s" in metrics else "",
                started,
                run.info.run_id,
            )
        )
    if len(rows) == 1:
        return [f"no runs in experiment {experiment!r} at {uri}"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def ui_command(uri: str, port: int, artifact_root: Path) -> list[str]:
    """The `mlflow ui` command for a local store, bound to loopback only."""
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if exe is None:
        raise LdmError("the mlflow command is not installed in this environment")
    if "://" in uri and not uri.startswith(("sqlite:", "file:")):
        raise LdmError(
            f"tracking.uri is the server {uri}: open it in a browser; `ldm ui` serves local stores"
        )
    return [
        exe,
        "ui",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        artifact_root.resolve().as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def run_ui(uri: str, port: int, artifact_root: Path) -> int:
    command = ui_command(uri, port, artifact_root)
    print(f"MLflow UI for {uri} at http://127.0.0.1:{port} (Ctrl-C to stop)", flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0
