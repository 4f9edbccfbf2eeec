"""`ldm drain` on real processes: it signals the ldm drivers and Ray Train workers under it,
waits for them to exit, and leaves every other process alone."""

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ldm, ok

# Saves (writes its file) on SIGTERM and exits, as a rank does after its checkpoint.
_SAVES_ON_SIGTERM = """
import signal, sys, time
def stop(*_):
    time.sleep(0.3)  # a checkpoint takes a while: drain must wait for it
    open(sys.argv[1], "w").write("saved")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""


def _start(*argv: str) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_drain_signals_ldm_processes_waits_for_them_and_spares_the_rest(tmp_path: Path):
    script = tmp_path / "rank.py"
    script.write_text(_SAVES_ON_SIGTERM)
    # A Ray Train worker (Ray titles them ray::RayTrainWorker...), a stage's driver, and a
    # process of the same shape that is neither.
    worker = _start(sys.executable, str(script), str(tmp_path / "worker"), "ray::RayTrainWorker")
    driver = _start(sys.executable, str(script), str(tmp_path / "driver"), "ldm", "train", "x")
    other = _start(sys.executable, str(script), str(tmp_path / "other"), "ldm", "runs")
    try:
        started = time.monotonic()
        out = ok(ldm("drain", "--grace", "20", "--under", str(os.getpid()))).stdout
        assert time.monotonic() - started < 15
        assert out.strip() == "drain: sent SIGTERM to 2 ldm process(es); 0 still running"
        assert worker.wait(timeout=1) == 0 and driver.wait(timeout=1) == 0
        assert (tmp_path / "worker").read_text() == "saved"
        assert (tmp_path / "driver").read_text() == "saved"
        assert other.poll() is None and not (tmp_path / "other").exists()
    finally:
        for proc in (worker, driver, other):
            proc.kill()
            proc.wait()
