"""Submitting and managing stage runs on a Ray cluster through the Ray Jobs API.

A submitted stage ships a snapshot of the project's code packages plus the resolved
experiment config (`job_config.yaml`) as the job's working_dir, and runs
`python -m orchestrator.cli <stage> job_config.yaml` as the job's driver on the head node.
Every client call goes to the cluster's dashboard over HTTP, sends the Ray auth token when
one is configured (see `orchestrator.cluster.auth_token`), and turns connection, auth and
unknown-job failures into one-line `LdmError`s.

Addresses are dashboard addresses: `http://host:port` or `https://host:port` as given,
`host:port` means `http://host:port`, a bare `host` means `http://host:8265`, and `auto`
means `$RAY_API_SERVER_ADDRESS` or `http://127.0.0.1:8265`. A GCS address (port 6379) or a
`ray://` Ray Client address is not a Jobs API address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.config import STAGES
from core.errors import LdmError
from orchestrator.cluster import auth_hint, auth_token, cache_env, tcp_unreachable

CODE_DIRS = ("core", "models", "data_pipeline", "training", "orchestrator", "configs")
JOB_CONFIG = "job_config.yaml"
SOURCE_COMMIT_ENV = "LDM_SOURCE_COMMIT"
TERMINAL = frozenset({"STOPPED", "SUCCEEDED", "FAILED"})
DEFAULT_DASHBOARD_PORT = 8265
_POLL_S = 0.5


def dashboard_url(address: str) -> str:
    """Normalise a Jobs API address (see the module docstring) to `http(s)://host:port`."""
    address = address.strip()
    if address in ("", "auto"):
        address = os.environ.get("RAY_API_SERVER_ADDRESS") or f"127.0.0.1:{DEFAULT_DASHBOARD_PORT}"
    if address.startswith("ray://"):
        raise LdmError(
            f"jobs address {address}: the Jobs API talks to the dashboard, e.g. "
            f"http://HEAD:{DEFAULT_DASHBOARD_PORT}, not a Ray Client (ray://) address"
        )
    if "://" not in address:
        address = "http://" + address
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LdmError(f"jobs address {address}: expected http://host:port or host:port")
    if parts.port is None and parts.scheme == "http" and not parts.path.strip("/"):
        address = f"http://{parts.netloc}:{DEFAULT_DASHBOARD_PORT}"
    return address.rstrip("/")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _translate(err: Exception, url: str, job_id: str | None) -> LdmError:
    from ray.exceptions import AuthenticationError

    if isinstance(err, AuthenticationError):
        return LdmError(f"the Ray dashboard at {url} refused the request: {auth_hint()}")
    text = str(err)
    if job_id and "404" in text and "does not exist" in text:
        return LdmError(f"no job {job_id} on the Ray cluster at {url} (see `ldm jobs list`)")
    if isinstance(err, OSError):
        return LdmError(f"cannot reach the Ray Jobs API at {url}: {_first_line(err)}")
    return LdmError(f"Ray Jobs API at {url}: {_first_line(err)}")


def cleartext_to_network(scheme: str, host: str | None) -> bool:
    """Whether a request would leave this machine unencrypted (http to a non-loopback host)."""
    if scheme != "http" or host is None:
        return False
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return True


@contextmanager
def _client(address: str, job_id: str | None = None) -> Iterator[Any]:
    """A JobSubmissionClient for address; errors inside the block become LdmErrors."""
    url = dashboard_url(address)
    parts = urlsplit(url)
    # requests gets no timeout from the client: an unreachable host would hang for minutes.
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if reason := tcp_unreachable(parts.hostname, port):
        raise LdmError(
            f"no Ray dashboard at {url} ({reason}): start a cluster with `ray start --head` "
            "or fix the jobs address"
        )
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    if token and cleartext_to_network(parts.scheme, parts.hostname):
        print(
            f"ldm: warning: sending the Ray auth token to {parts.hostname} over plain http; "
            "anyone on the network path can read it (use https, an SSH tunnel, or kubectl "
            "port-forward to 127.0.0.1)",
            file=sys.stderr,
        )
    try:
        # The client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its address argument;
        # inside a job RAY_ADDRESS is the GCS, so hide them: the caller's address is meant.
        with _env_removed("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            client = JobSubmissionClient(url, headers=headers)
        yield client
    except (AuthenticationError, OSError, RuntimeError, ValueError) as err:
        raise _translate(err, url, job_id) from None


@contextmanager
def _env_removed(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def job_env() -> dict[str, str]:
    """Environment variables every job gets: caches out of $HOME, live (unbuffered) logs.

    The auth token is deliberately not forwarded: the driver and workers inherit the
    cluster's own RAY_AUTH_* settings from their node, a client-side RAY_AUTH_TOKEN_PATH
    may not exist on the cluster, and runtime_env values are readable by anyone listing jobs.
    """
    return {**cache_env(), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def source_commit(root: Path | None = None) -> str:
    """The commit of the code that runs (`+dirty` for uncommitted changes), or "unknown".

    A submitted job runs a copy of the code packages without `.git`: `ldm submit` records
    the submitting checkout's commit in the job's environment, and that is what a job
    reports."""
    shipped = os.environ.get(SOURCE_COMMIT_ENV)
    if shipped:
        return shipped
    root = root or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def stop_wait_env(grace_s: float) -> dict[str, str]:
    """How long Ray's job supervisor waits after `ldm jobs stop` (SIGTERM to the driver)
    before it SIGKILLs the job: Ray's default is 3 s, too short for every rank to save a
    checkpoint. The stage's grace period, plus 30 s for the driver to close its MLflow run.
    The supervisor runs in the job's runtime_env, so the job's env_vars set it."""
    return {"RAY_JOB_STOP_WAIT_TIME_S": str(math.ceil(grace_s) + 30)}


def _ignore(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n.startswith(".") or n == "__pycache__" or n.endswith(".pyc")}


def build_staging_dir(project_root: Path, config_yaml: str, dest: Path) -> Path:
    """Fill dest with the project's code packages and the config as `job_config.yaml`.

    Only CODE_DIRS are copied (no .venv, runs, data, .git, caches, bytecode), so the upload
    stays small and a job never sees local outputs.
    """
    project_root = Path(project_root)
    if not (project_root / "orchestrator").is_dir():
        raise LdmError(f"project root {project_root}: no orchestrator/ package there")
    dest.mkdir(parents=True, exist_ok=True)
    for name in CODE_DIRS:
        if (project_root / name).is_dir():
            shutil.copytree(project_root / name, dest / name, ignore=_ignore)
    (dest / JOB_CONFIG).write_text(config_yaml)
    return dest


def stage_entrypoint(stage: str, extra_args: list[str] = (), python: str = "python") -> str:
    """The job's shell command for a stage: `python -m orchestrator.cli ...`, after a check
    that this `python` on the head node is one that has Ray (a cluster started from a virtual
    environment that is not on PATH would otherwise die on `No module named 'ray'`)."""
    if stage not in STAGES:
        raise LdmError(f"stage {stage!r}: jobs run one of {', '.join(STAGES)}")
    hint = (
        f"ldm {stage}: error: `{python}` on the cluster's head node cannot import ray: "
        "submit with --python PATH, the Python of the environment the cluster's Ray runs in"
    )
    check = f"{shlex.join([python, '-c', 'import ray'])} 2>/dev/null"
    command = shlex.join([python, "-m", "orchestrator.cli", stage, JOB_CONFIG, *extra_args])
    return f"{check} || {{ echo {shlex.quote(hint)} >&2; exit 2; }}; exec {command}"


def submit(
    address: str,
    stage: str,
    config_yaml: str,
    project_root: Path,
    extra_args: list[str] = (),
    python: str = "python",
    grace_s: float = 60.0,
) -> str:
    """Submit a stage as a Ray job and return its submission id (it runs asynchronously).

    config_yaml is the resolved experiment config; its paths must be valid on the cluster
    (a shared filesystem), since the driver and workers read and write them there.
    `grace_s`: the stage's preempt_grace_s, which `ldm jobs stop` leaves the job to save in.
    """
    entrypoint = stage_entrypoint(stage, list(extra_args), python)
    if not config_yaml.strip():
        raise LdmError("submit: the config text is empty")
    with tempfile.TemporaryDirectory(prefix="ldm-job-") as tmp:
        staging = build_staging_dir(project_root, config_yaml, Path(tmp) / "src")
        # The client zips and uploads working_dir during submit, so tmp can go afterwards.
        return submit_entrypoint(
            address,
            entrypoint,
            staging,
            env={**stop_wait_env(grace_s), SOURCE_COMMIT_ENV: source_commit(project_root)},
            metadata={"job_name": f"ldm {stage}"},
        )


def submit_entrypoint(
    address: str,
    entrypoint: str,
    working_dir: Path,
    env: dict[str, str] | None = None,
    *,
    metadata: dict[str, str] | None = None,
) -> str:
    """Submit a shell command run in a copy of working_dir; returns the submission id.

    The driver reserves no CPUs, so a training job can use all of the cluster's.
    """
    working_dir = Path(working_dir)
    if not working_dir.is_dir():
        raise LdmError(f"job working dir {working_dir} does not exist")
    runtime_env = {"working_dir": str(working_dir), "env_vars": {**job_env(), **(env or {})}}
    with _client(address) as client:
        return client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata or {}
        )


def cluster_nodes(address: str) -> list[dict[str, float]]:
    """The resources of each alive node of the cluster behind a Jobs API address, from its
    dashboard's State API."""
    with _client(address) as client:
        response = client._do_request("GET", "/api/v0/nodes?limit=10000&detail=true")
        if response.status_code != 200:
            raise LdmError(
                f"the Ray dashboard at {dashboard_url(address)} did not list its nodes "
                f"(HTTP {response.status_code})"
            )
        nodes = response.json()["data"]["result"]["result"]
    return [dict(n.get("resources_total") or {}) for n in nodes if n.get("state") == "ALIVE"]


def _seconds(ms: int | None) -> float | None:
    return ms / 1000 if ms else None


def list_jobs(address: str) -> list[dict[str, Any]]:
    """Submitted jobs, oldest first: id, status, entrypoint, start_time, end_time, message.

    Times are Unix seconds (None while not started / not finished). Plain drivers that
    called ray.init() are not listed: the Jobs API can neither stop them nor show their logs.
    """
    with _client(address) as client:
        details = client.list_jobs()
    jobs = [
        {
            "id": d.submission_id,
            "status": str(d.status),
            "entrypoint": d.entrypoint,
            "start_time": _seconds(d.start_time),
            "end_time": _seconds(d.end_time),
            "message": d.message or "",
        }
        for d in details
        if d.submission_id
    ]
    return sorted(jobs, key=lambda j: j["start_time"] or float("inf"))


def status(address: str, job_id: str) -> str:
    """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    with _client(address, job_id) as client:
        return str(client.get_job_status(job_id))


def stop(address: str, job_id: str) -> bool:
    """Ask Ray to stop the job; False when it had already ended."""
    with _client(address, job_id) as client:
        return bool(client.stop_job(job_id))


def wait(address: str, job_id: str, timeout_s: float) -> str:
    """Block until the job ends and return its terminal status; LdmError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    with _client(address, job_id) as client:
        while True:
            current = str(client.get_job_status(job_id))
            if current in TERMINAL:
                return current
            if time.monotonic() >= deadline:
                raise LdmError(f"job {job_id} is still {current} after {timeout_s:g} s")
            time.sleep(_POLL_S)


def logs(address: str, job_id: str, follow: bool = False) -> Iterator[str]:
    """The job's driver output, line by line (each line keeps its newline).

    With follow, lines stream as the job prints them and the iterator ends when the job
    does; closing the iterator early (Ctrl-C, break) closes the stream cleanly.
    """
    with _client(address, job_id) as client:
        if not follow:
            yield from client.get_job_logs(job_id).splitlines(keepends=True)
            return
        client.get_job_info(job_id)  # unknown ids fail here with a clear error
        pending = ""
        for chunk in _tail(client, job_id):
            *lines, pending = (pending + chunk).split("\n")
            for line in lines:
                yield line + "\n"
        if pending:
            yield pending


def _tail(client: Any, job_id: str) -> Iterator[str]:
    """Drive the client's async log tail from synchronous code on a private event loop."""
    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id)
    try:
        while True:
            try:
                with warnings.catch_warnings():
                    # Ray's own ws_connect call passes ssl=None, which aiohttp deprecates.
                    warnings.filterwarnings("ignore", "ssl=None", DeprecationWarning)
                    chunk = loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        # After Ctrl-C the generator may still be mid-step; cancel what is left.
        for task in asyncio.all_tasks(loop):
            task.cancel()
        try:
            loop.run_until_complete(stream.aclose())
        except (RuntimeError, asyncio.CancelledError):
            pass
        loop.close()
