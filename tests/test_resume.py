"""Checkpoints that can be trusted: exact resume, crash during save, preemption, recovery.

Every run here is a real `ldm train` on the latent cache the session's `pipeline` fixture
built, its one rank in the command's own process. Preemption sends SIGTERM to `ldm train`
running as a process of its own, as a scheduler does. (SIGTERM to one Ray Train worker of two,
as a preempted pod gets it: test_autoencoder_resume, through the same launcher and stop
agreement. `ldm jobs stop`, a lost node and a lost MLflow server on a 2-rank job:
test_multihost.)
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import (
    QUIET,
    ROOT,
    ldm,
    ok,
    one_line_error,
)

pytestmark = pytest.mark.slow


def _experiment(work: Path) -> list[str]:
    """The fixture's config, for runs of other names that share its autoencoder and cache."""
    return [
        str(work / "exp.yaml"),
        f"autoencoder.pretrained={work / 'runs' / 'tiny' / 'autoencoder'}",
    ]


def _train_run(uri: str, name: str):
    client = MlflowClient(uri)
    runs = [
        r
        for r in client.search_runs(client.get_experiment_by_name("ldm").experiment_id)
        if r.data.tags.get("ldm.stage") == "train" and r.info.run_name == name
    ]
    assert len(runs) == 1, f"{len(runs)} MLflow runs named {name}"
    return client, runs[0]


def _losses(uri: str, name: str) -> list[tuple[int, float]]:
    client, run = _train_run(uri, name)
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))


def _tags(work: Path, name: str) -> list[str]:
    folder = work / "runs" / name / "checkpoints"
    return sorted(p.name for p in folder.glob("step_*") if (p / "COMMITTED.json").is_file())


def _weights(work: Path, name: str, tag: str):
    return load_file(work / "runs" / name / "checkpoints" / tag / "unet.safetensors")


def _same_weights(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_one_rank_in_process_resumes_exactly_past_a_crash_during_save(pipeline):
    """One worker runs in the `ldm train` process itself (no Ray): killed after step 3, with
    a half-written step 6 left behind, it resumes into an uninterrupted run's weights."""
    work, uri, _ = pipeline
    exp = [*_experiment(work), "train.num_workers=1"]
    ok(ldm("train", *exp, "run.name=full1", "train.num_steps=6", *QUIET))
    first = ok(ldm("train", *exp, "run.name=split1", "train.num_steps=3", *QUIET))
    assert "worker rank" not in first.stdout  # no Ray Train worker was started
    broken = work / "runs" / "split1" / "checkpoints" / "step_00000006"
    broken.mkdir()
    (broken / "unet.safetensors").write_bytes(b"half-written")
    resumed = ok(ldm("train", *exp, "run.name=split1", "train.num_steps=6", *QUIET))
    assert "resuming from" in resumed.stdout and "step_00000003 (step 3)" in resumed.stdout
    assert _tags(work, "split1") == ["step_00000003", "step_00000006"]
    # Same losses at every step and bitwise-equal weights: nothing repeated, nothing skipped.
    losses = _losses(uri, "full1")
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert _losses(uri, "split1") == losses
    final = "step_00000006"
    assert _same_weights(_weights(work, "full1", final), _weights(work, "split1", final)) == 0.0

    # Continued against another tracking store: said in one line, logged to a new run there.
    other = f"sqlite:///{work}/other-mlflow.db"
    moved = ok(
        ldm("train", *exp, "run.name=split1", "train.num_steps=7", f"tracking.uri={other}", *QUIET)
    )
    (line,) = [x for x in moved.stdout.splitlines() if "is not in the tracking store" in x]
    assert line.startswith("train: the checkpoint's MLflow run ") and other in line, line
    assert [s for s, _ in _losses(other, "split1")] == [7]


def test_a_stopped_job_owes_its_sample_grid_to_the_next(pipeline, monkeypatch):
    """A stop at a sample step saves at once and skips the grid; the job that continues from
    that tag draws it first (the tag's EMA weights), so no step's grid is missing."""
    import training.loop

    work, uri, _ = pipeline
    args = [*_experiment(work), "run.name=owed", "train.num_workers=1", "train.log_every=1"]
    args += ["train.sample_every=4", "train.checkpoint_every=100", "tracking.log_model=false"]
    calls = []

    def stop_at_step_4(main):
        calls.append(1)
        return len(calls) == 4

    monkeypatch.setattr(training.loop, "agree_to_stop", stop_at_step_4)
    ok(ldm("train", *args, "train.num_steps=6"))
    assert _tags(work, "owed") == ["step_00000004"]
    state = json.loads((work / "runs/owed/checkpoints/step_00000004/train_state.json").read_text())
    assert state["owed"] == ["sample"]
    monkeypatch.undo()
    ok(ldm("train", *args, "train.num_steps=6"))
    client, run = _train_run(uri, "owed")
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    steps = sorted(int(g.split("+step+")[1].split("+")[0]) for g in grids if g.endswith(".png"))
    assert steps == [4, 6], grids


class _Job:
    """A background `ldm train` whose output is collected line by line."""

    def __init__(self, *args: str):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "train", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "RAY_DEDUP_LOGS": "0"},  # every worker's own lines, pids included
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, predicate, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, "".join(self.lines[-60:])
            assert time.monotonic() < deadline, "".join(self.lines[-60:])
            time.sleep(0.2)

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code, "".join(self.lines)


def test_sigterm_saves_then_the_same_command_continues(pipeline):
    """SIGTERM to a one-worker `ldm train` (its rank runs in the command's process): it
    saves a committed checkpoint and exits 143; the same command then continues the run."""
    work, uri, _ = pipeline
    exp = _experiment(work)
    job = _Job(
        *exp,
        "run.name=preempt",
        "train.num_workers=1",
        "train.num_steps=100000",
        "train.checkpoint_every=100000",
        *QUIET,
    )
    job.wait_for(lambda: any("train: step 3/" in line for line in job.lines))
    job.proc.send_signal(signal.SIGTERM)
    code, out = job.finish(timeout=120)
    assert code == 143, out[-3000:]
    assert "stopped by SIGTERM: the checkpoint was saved" in out
    assert "worker rank" not in out  # one worker ran in the command's process, not on Ray
    # The console holds ldm's lines only; everything is in the run's log, named first.
    assert all(line.startswith(("train: ", "ldm train: ")) for line in out.splitlines()), out
    log = Path(out.splitlines()[0].split(" in ", 1)[1])
    assert log.parent == work / "runs" / "preempt" / "logs"
    logged = log.read_text()
    assert "train: step 3/" in logged and len(logged.splitlines()) > len(out.splitlines())
    (tag,) = _tags(work, "preempt")
    step = int(tag.split("_")[1])
    assert step >= 3
    assert not (work / "runs" / "preempt" / "STOP_REQUESTED").exists()

    resumed = ok(
        ldm(
            "train",
            *exp,
            "run.name=preempt",
            "train.num_workers=1",
            f"train.num_steps={step + 2}",
            *QUIET,
        )
    )
    assert f"{tag} (step {step})" in resumed.stdout
    steps = [s for s, _ in _losses(uri, "preempt")]
    assert steps == list(range(1, step + 3))  # one MLflow run, nothing repeated or skipped


def test_resume_never_refuses_a_folder_with_checkpoints(pipeline):
    work, _, _ = pipeline
    one_line_error(
        ldm("train", str(work / "exp.yaml"), "train.resume=never"), "resume=never", "run.name"
    )
