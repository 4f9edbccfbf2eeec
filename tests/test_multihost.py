"""ldm's cluster services on hosts of their own (tests/hosts.py): host A runs the Ray head
(token auth) and the MLflow server, host B a Ray worker node, host C the S3-compatible
server. Each host has its own address and /tmp; they reach each other only by address,
through the switch. What listens where is printed for every host."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.cluster import ray_env
from tests.hosts import Host, hosts, unavailable

why = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(why is not None, reason=why or "")]

BIN = Path(sys.executable).parent
GCS_PORT, DASHBOARD_PORT, MLFLOW_PORT, S3_PORT = 6379, 8265, 5000, 9000


@dataclass
class Cluster:
    a: Host
    b: Host
    c: Host
    env: dict[str, str]
    """What every process of the cluster and its clients gets (token auth, S3)."""

    @property
    def gcs(self) -> str:
        return f"{self.a.address}:{GCS_PORT}"


def _wait(host: Host, script: str, env: dict[str, str], timeout_s: float = 120) -> str:
    """Run a Python `script` on `host` until it exits 0; its output."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = host.run([sys.executable, "-c", script], env, timeout=60)
        if result.returncode == 0:
            return result.stdout
        if time.monotonic() > deadline:
            raise TimeoutError(result.stdout[-2000:] + result.stderr[-2000:])
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with hosts("a", "b", "c") as made:
        a, b, c = made["a"], made["b"], made["c"]
        env = {
            **ray_env(),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            "AWS_ENDPOINT_URL": f"http://{c.address}:{S3_PORT}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
        }
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        c.popen([str(BIN / "moto_server"), "-H", c.address, "-p", str(S3_PORT)], env, **quiet)
        a.popen(
            [str(BIN / "mlflow"), "server", "--host", a.address, "--port", str(MLFLOW_PORT)]
            + ["--backend-store-uri", "sqlite:////tmp/mlflow.db"]
            + ["--artifacts-destination", "/tmp/mlflow-artifacts", "--workers", "1"]
            + ["--allowed-hosts", f"{a.address}:{MLFLOW_PORT},{a.address}"],
            {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            **quiet,
        )
        node = ["--num-cpus=2", "--num-gpus=0", "--disable-usage-stats", "--block"]
        a.popen(
            [str(BIN / "ray"), "start", "--head", f"--node-ip-address={a.address}"]
            + [f"--port={GCS_PORT}", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
            + [f"--dashboard-port={DASHBOARD_PORT}", "--resources", '{"host_a": 1}', *node],
            env,
            **quiet,
        )
        a.wait_for_port(GCS_PORT)
        b.popen(
            [str(BIN / "ray"), "start", f"--address={a.address}:{GCS_PORT}"]
            + [f"--node-ip-address={b.address}", "--resources", '{"host_b": 1}', *node],
            env,
            **quiet,
        )
        running = Cluster(a, b, c, env)
        _wait(
            a,
            "import ray\n"
            f"ray.init(address={running.gcs!r}, logging_level='ERROR')\n"
            "assert sum(n['Alive'] for n in ray.nodes()) == 2\n",
            env,
        )
        for host, port in ((a, MLFLOW_PORT), (c, S3_PORT)):
            host.wait_for_port(port)
        yield running


def test_each_host_runs_its_part_and_only_what_others_need_listens_beyond_loopback(cluster):
    a, b, c = cluster.a, cluster.b, cluster.c
    # A driver on host A places one task on each node: each runs on its own host's address.
    out = a.run(
        [
            sys.executable,
            "-c",
            "import json, ray\n"
            f"ray.init(address={cluster.gcs!r}, logging_level='ERROR')\n"
            "where = ray.remote(lambda: ray.util.get_node_ip_address())\n"
            "print(json.dumps({k: ray.get(where.options(resources={k: 0.01}).remote())\n"
            "                  for k in ('host_a', 'host_b')}))\n",
        ],
        cluster.env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "host_a": a.address,
        "host_b": b.address,
    }
    # Host B reaches MLflow on A and S3 on C by their addresses.
    reach = (
        "import urllib.request as u\n"
        f"print(u.urlopen('http://{a.address}:{MLFLOW_PORT}/health', timeout=5).status)\n"
        f"print(u.urlopen('http://{c.address}:{S3_PORT}/', timeout=5).status)\n"
    )
    assert _wait(b, reach, cluster.env).split() == ["200", "200"]

    # What listens where, on every host.
    beyond_loopback: dict[str, list[str]] = {}
    for host in (a, b, c):
        table = host.listening()
        print(f"\n--- host {host.name} ({host.address}) listens on:\n{table}")
        beyond_loopback[host.name] = [
            line for line in table.splitlines() if line.split()[3].rsplit(":", 1)[0] != "127.0.0.1"
        ]
    # Our own services: MLflow on A's address, S3 on C's, the dashboard (clients on A only)
    # on loopback.
    assert any(f"{a.address}:{MLFLOW_PORT}" in line for line in beyond_loopback["a"])
    assert any(f"{c.address}:{S3_PORT}" in line for line in beyond_loopback["c"])
    assert f"127.0.0.1:{DASHBOARD_PORT}" in a.listening()
    assert not any(f":{DASHBOARD_PORT} " in line for line in beyond_loopback["a"])
    assert [line.split()[3] for line in beyond_loopback["c"]] == [f"{c.address}:{S3_PORT}"]
