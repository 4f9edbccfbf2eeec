"""Shared test setup: offline models, caches out of $HOME, and the fixture images."""

import os
import sys
from pathlib import Path

import pytest

from orchestrator.cli import set_default_env

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_IMAGES = ROOT / "tests" / "fixtures" / "emoji64"

set_default_env()


def run_ldm(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run the real `ldm` command line in a subprocess; returns the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """Run every stage once; tests below inspect what each produced."""
    work = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{work}/mlflow.db"
    (work / "exp.yaml").write_text(
        f"preset: tiny\nrun:\n  root: {work}/runs\ndata:\n  shards: {work}/shards\n"
        f"tracking:\n  uri: {uri}\n"
    )
    results = {
        "shards": ok(
            run_ldm(
                "shards", str(FIXTURE_IMAGES), str(work / "shards"), "--samples-per-shard", "16"
            )
        ),
        "autoencoder": ok(run_ldm("autoencoder", str(work / "exp.yaml"))),
        "precompute": ok(run_ldm("precompute", str(work / "exp.yaml"))),
        "train": ok(run_ldm("train", str(work / "exp.yaml"))),
    }
    return work, uri, results


@pytest.fixture
def fixture_images() -> Path:
    return FIXTURE_IMAGES


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group in this process, as a Ray Train worker has: DeepSpeed engines
    built in the test process itself, seconds each."""
    import socket

    import torch.distributed as dist

    from training.engine import forget_process_groups

    forget_process_groups()  # DeepSpeed still holds the group an earlier module made
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOCAL_RANK", "0")  # what a launcher would set; DeepSpeed reads it
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        yield
        dist.destroy_process_group()
