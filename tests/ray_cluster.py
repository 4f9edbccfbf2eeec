"""A real two-node Ray cluster on this machine, with token auth, for tests.

`local_ray_cluster()` starts a head (`ray start --head ... --block`) and one worker node
(`ray start --address ... --block`) as separate subprocesses in their own sessions, on free
ports, under a short private temp dir, and waits until the dashboard reports both nodes
alive. Each node carries a custom resource (`node_head` / `node_worker`) so tests can place
work on a given node, and 2 CPUs, ~3 GB memory and a 300 MB object store.

Teardown stops both `ray start` processes, then kills anything still carrying this cluster's
tag in its environment — job drivers run in their own sessions, so a process-group kill
alone would miss them — and checks that nothing is left.

Use from a test module:

    @pytest.fixture(scope="module")
    def cluster():
        with local_ray_cluster() as c:
            yield c
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from orchestrator.cluster import ray_env, short_temp_dir

_TAG = "LDM_TEST_RAY_CLUSTER"
# Variables of the calling process that would point the nodes at another cluster or token.
_SCRUB = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")


@dataclass
class LocalRayCluster:
    """A running test cluster: where it is and how clients authenticate to it."""

    gcs_address: str
    """`127.0.0.1:PORT`, for `ray.init(address=...)` / `ray_session`."""
    dashboard_url: str
    """`http://127.0.0.1:PORT`, for the Jobs API."""
    token: str
    token_path: Path
    temp_dir: Path
    client_env: dict[str, str]
    """RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH: set these in a client to be let in."""
    node_env: dict[str, str] = field(repr=False)
    processes: list[subprocess.Popen] = field(default_factory=list, repr=False)
    tag: str = ""
    startup_s: float = 0.0

    @property
    def sessions(self) -> set[int]:
        """The sessions its `ray start` processes lead: every process of a node is in one."""
        return {proc.pid for proc in self.processes}

    def logs(self) -> str:
        """The `ray start` output of both nodes (for failure messages)."""
        return "\n".join(
            p.read_text(errors="replace")[-4000:] for p in sorted(self.temp_dir.glob("*.log"))
        )

    def leftover_processes(self) -> list[psutil.Process]:
        """Live processes that belong to this cluster (its tag, or its nodes' sessions)."""
        return _tagged(self.tag, self.sessions)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop both nodes and everything they started; raise if something survives.
        A test cluster holds nothing worth a graceful shutdown: every process of it gets
        SIGTERM at once (a node's `ray start` alone would stop its children one by one,
        ~20 s), and whatever is left after timeout_s is killed."""
        procs = _tagged(self.tag, self.sessions)
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(procs, timeout=timeout_s)
        left += [p for p in _tagged(self.tag, self.sessions) if p not in left]
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=5)
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
        survivors = _tagged(self.tag, self.sessions)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if survivors:
            raise RuntimeError(f"test Ray cluster left processes running: {survivors}")


def _tagged(tag: str, sessions: set[int] = frozenset()) -> list[psutil.Process]:
    """Processes of a test cluster: those whose environment carries its tag, and those in
    the sessions of its nodes (`ray start` leads one each). Ray's agents rename themselves
    (setproctitle), which wipes their environment block, so the tag alone misses them."""
    found = []
    me = os.getpid()
    marker = f"{_TAG}={tag}".encode()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if os.getsid(proc.pid) in sessions:
                found.append(proc)
            elif marker in Path(f"/proc/{proc.pid}/environ").read_bytes():
                found.append(proc)
        except OSError:  # gone, or not ours to read
            continue
    return found


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (outside Ray's default worker range 10002-19999)."""
    socks, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if not 10002 <= port <= 19999:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _ray_cli() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


def _alive_nodes(dashboard_url: str, token: str) -> list[dict]:
    request = urllib.request.Request(
        f"{dashboard_url}/api/v0/nodes?limit=100",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        body = json.load(response)
    nodes = body["data"]["result"]["result"]
    return [n for n in nodes if n.get("state") == "ALIVE"]


def start_cluster(
    num_cpus: int = 2,
    memory: int = 3 * 10**9,
    object_store_memory: int = 300 * 10**6,
    timeout_s: float = 120.0,
) -> LocalRayCluster:
    """Start the head and one worker node; return once both are alive (see module doc)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ldmrc-", dir=short_temp_dir()))
    token = os.urandom(32).hex()
    token_path = temp_dir / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    gcs_port, dash_port, client_port, head_agent, worker_agent = free_ports(5)
    tag = temp_dir.name

    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(ray_env())
    venv_bin = str(Path(sys.executable).parent)
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_TMPDIR": str(temp_dir),
            # Job entrypoints say `python`: make that this interpreter, with ray installed.
            "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
            _TAG: tag,
        }
    )
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    cluster = LocalRayCluster(
        gcs_address=f"127.0.0.1:{gcs_port}",
        dashboard_url=f"http://127.0.0.1:{dash_port}",
        token=token,
        token_path=token_path,
        temp_dir=temp_dir,
        client_env=client_env,
        node_env=env,
        tag=tag,
    )
    common = [
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--memory={memory}",
        f"--object-store-memory={object_store_memory}",
        "--disable-usage-stats",
        "--block",
    ]
    head = [
        _ray_cli(),
        "start",
        "--head",
        f"--port={gcs_port}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        # Fixed Ray defaults (10001, 52365) would clash with any other cluster on the machine.
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={head_agent}",
        f"--temp-dir={temp_dir / 'head'}",
        '--resources={"node_head": 1}',
        *common,
    ]
    worker = [
        _ray_cli(),
        "start",
        f"--address={cluster.gcs_address}",
        f"--dashboard-agent-listen-port={worker_agent}",
        # Its own session dir: sharing the head's makes both log monitors forward every
        # worker log line, so drivers would print each line twice.
        f"--temp-dir={temp_dir / 'worker'}",
        '--resources={"node_worker": 1}',
        *common,
    ]
    start = time.monotonic()
    deadline = start + timeout_s
    try:
        cluster.processes.append(_spawn(head, env, temp_dir / "head.log"))
        # The worker node may start as soon as the GCS accepts connections.
        while not _accepts(gcs_port):
            _check_running(cluster, deadline)
            time.sleep(0.2)
        cluster.processes.append(_spawn(worker, env, temp_dir / "worker.log"))
        while True:
            _check_running(cluster, deadline)
            try:
                if len(_alive_nodes(cluster.dashboard_url, token)) >= 2:
                    break
            except (OSError, KeyError, ValueError):
                pass  # dashboard not up yet
            time.sleep(0.5)
    except BaseException as err:
        logs = cluster.logs()
        cluster.stop()
        if not isinstance(err, Exception):
            raise
        raise RuntimeError(f"test Ray cluster did not start ({err}):\n{logs}") from None
    cluster.startup_s = time.monotonic() - start
    return cluster


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _check_running(cluster: LocalRayCluster, deadline: float) -> None:
    for proc in cluster.processes:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {proc.returncode}")
    if time.monotonic() > deadline:
        raise TimeoutError("nodes not alive in time")


@contextmanager
def local_ray_cluster(**kwargs) -> Iterator[LocalRayCluster]:
    """`start_cluster(**kwargs)`, stopped (and checked for leftovers) on exit."""
    cluster = start_cluster(**kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()


@contextmanager
def client_env(cluster: LocalRayCluster, **extra: str) -> Iterator[None]:
    """Set the cluster's client auth variables (plus extra) in os.environ for the block."""
    values = {**cluster.client_env, **extra}
    saved = {k: os.environ.get(k) for k in (*values, "RAY_AUTH_TOKEN")}
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
