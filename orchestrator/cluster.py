"""Connecting to Ray: an embedded local instance, or an existing cluster, with token auth.

`ray_session` is the one way stages get a Ray runtime. Without an address it starts a
private local Ray (never someone else's cluster found in /tmp/ray); with one it connects,
after quick checks that turn an unreachable address or a rejected token into one-line
`LdmError`s instead of Ray's 20-40 s retry loops. Inside a Ray job it reuses the job's
cluster.

Token auth (Ray >= 2.52): a cluster started with `RAY_AUTH_MODE=token` accepts only clients
sending its token, read from `RAY_AUTH_TOKEN`, else the file at `RAY_AUTH_TOKEN_PATH`, else
`~/.ray/auth_token`. Clients must also run with `RAY_AUTH_MODE=token`; `ray_session` sets
that when a token variable is set (a token sent to a cluster without auth is ignored).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import signals
from core.errors import LdmError

if TYPE_CHECKING:
    from ray.train import ScalingConfig

    from core.config import ClusterConfig

log = logging.getLogger(__name__)

# AF_UNIX socket paths are limited to 107 bytes and Ray puts its sockets at
# <tmp>/ray/session_<date>_<time>_<usec>_<pid>/sockets/<name> (~75 bytes past <tmp>).
_MAX_TMP_LEN = 30
_PROBE_TIMEOUT_S = 3.0
# The GCS probe gives up after about this plus ~10 s of gRPC channel setup.
_GCS_PROBE_TIMEOUT_MS = 1000
# Ray's default is 30% of RAM; an embedded run on a laptop or CI box needs far less.
_EMBEDDED_OBJECT_STORE_MAX = 1 << 30

AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by the Jobs API in a job's driver


@dataclass(frozen=True)
class RaySession:
    """What `ray_session` connected to."""

    address: str
    """GCS address (host:port) of the cluster."""
    dashboard_url: str | None
    """Dashboard (and Jobs API) URL, when the cluster runs a dashboard."""
    embedded: bool
    """True when `ray_session` started this Ray itself and stops it on exit."""


def usable_cores() -> int:
    """The cores this process may run on (respects taskset and container CPU sets)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def short_temp_dir() -> str:
    """The system temp dir when its path is short enough for Ray's sockets, else /tmp."""
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) <= _MAX_TMP_LEN else "/tmp"


def ldm_temp_dir() -> Path:
    """A per-user folder under the short temp dir; holds the embedded Ray's token file."""
    return Path(short_temp_dir()) / f"ldm-{os.getuid()}"


def cache_dir() -> Path:
    """Root of the caches: `$LDM_CACHE_DIR`, else `<system temp>/ldm-cache` (as the Makefile)."""
    return Path(os.environ.get("LDM_CACHE_DIR") or Path(tempfile.gettempdir()) / "ldm-cache")


def cache_env() -> dict[str, str]:
    """Cache and telemetry settings that keep libraries out of $HOME (values already set win).

    These travel to Ray workers and job drivers, so compiled torch extensions, Hugging Face
    files and pip downloads land in one shared cache folder instead of each home directory.
    """
    cache = cache_dir()
    defaults = {
        "LDM_CACHE_DIR": str(cache),
        "XDG_CACHE_HOME": str(cache / "xdg"),
        "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
        "HF_HOME": str(cache / "huggingface"),
        "PIP_CACHE_DIR": str(cache / "pip"),
        "MPLCONFIGDIR": str(cache / "matplotlib"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    return {key: os.environ.get(key, value) for key, value in defaults.items()}


def ray_env() -> dict[str, str]:
    """Environment for Ray processes and their children: quiet, and nothing under $HOME.

    Values already in the environment win. `RAY_TMPDIR` is a short system temp dir, so Ray's
    session folder is `<RAY_TMPDIR>/ray` — the same place `ray start` uses by default, which
    keeps `address="auto"` able to find a cluster started from a plain shell.
    """
    env = {
        "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
        "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", short_temp_dir()),
    }
    env.update(cache_env())
    return env


def auth_token() -> str | None:
    """The token this process would send to a token-protected cluster, if one is configured.

    Same order as Ray: `RAY_AUTH_TOKEN`, then the file at `RAY_AUTH_TOKEN_PATH`, then
    `~/.ray/auth_token` (only read when `RAY_AUTH_MODE=token`, so a default token is never
    sent to a cluster nobody asked to authenticate with).
    """
    if token := os.environ.get(AUTH_TOKEN, "").strip():
        return token
    if path := os.environ.get(AUTH_TOKEN_PATH):
        try:
            return Path(path).expanduser().read_text().strip() or None
        except OSError as err:
            raise LdmError(f"{AUTH_TOKEN_PATH}={path}: cannot read the token ({err})") from None
    default = Path.home() / ".ray" / "auth_token"
    if os.environ.get(AUTH_MODE, "").lower() == "token" and default.is_file():
        return default.read_text().strip() or None
    return None


def auth_hint() -> str:
    """How to fix a missing or rejected token, for error messages."""
    if auth_token() is None:
        return f"the cluster needs a token: set {AUTH_TOKEN} or {AUTH_TOKEN_PATH}"
    return f"the token in {AUTH_TOKEN}/{AUTH_TOKEN_PATH} is not this cluster's token"


def _sync_auth_config() -> None:
    """Make Ray's cached auth mode and token follow the current environment.

    Ray's C++ side reads RAY_AUTH_MODE and the token once and caches them; without this a
    process that changed them (tests, a CLI switching clusters) would keep the old ones.
    """
    if AUTH_MODE not in os.environ and (
        os.environ.get(AUTH_TOKEN) or os.environ.get(AUTH_TOKEN_PATH)
    ):
        os.environ[AUTH_MODE] = "token"
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _embedded_auth_env() -> dict[str, str]:
    """Auth settings for an embedded Ray: token auth on, with a token file outside $HOME.

    Ray 2.60 turns token auth on for a fresh `ray.init()` and otherwise writes a new token
    to ~/.ray/auth_token. The embedded GCS listens on all interfaces, so keep auth on and
    give it a per-user token file instead.
    """
    if os.environ.get(AUTH_MODE, "").lower() == "disabled":
        return {}
    env = {AUTH_MODE: "token"}
    if auth_token() is None and not (Path.home() / ".ray" / "auth_token").is_file():
        folder = private_dir(ldm_temp_dir())
        path = folder / "ray_auth_token"
        if path.exists() or path.is_symlink():
            _check_private(path, stat.S_ISREG, "file")
        if not path.is_file() or not path.read_text().strip():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        env[AUTH_TOKEN_PATH] = str(path)
    return env


def private_dir(folder: Path) -> Path:
    """`folder`, made 0700 if new; refused (one line) unless it is a directory of this user
    that nobody else can read or write: in a shared /tmp another user could have made it
    first, to read the token put in it, or to plant one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    _check_private(folder, stat.S_ISDIR, "folder")
    return folder


def _check_private(path: Path, is_kind, kind: str) -> None:
    info = path.lstat()  # a symlink is refused, not followed
    problem = None
    if not is_kind(info.st_mode):
        problem = f"is not a {kind} (a symlink or another kind of file)"
    elif info.st_uid != os.getuid():
        problem = f"belongs to uid {info.st_uid}, not to you (uid {os.getuid()})"
    elif info.st_mode & 0o077:
        problem = f"has permissions {stat.S_IMODE(info.st_mode):04o}; other users can reach it"
    if problem:
        raise LdmError(
            f"{path} {problem}: it would hold the embedded Ray's auth token; delete it (or "
            f"set {AUTH_TOKEN_PATH} to a token file only you can read) and run again"
        )


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LdmError(
            f"cluster address {address!r}: expected host:port (the GCS port, e.g. "
            "127.0.0.1:6379), ray://host:port or auto"
        )
    return host.strip("[]"), int(port)


def tcp_unreachable(host: str, port: int, timeout_s: float = _PROBE_TIMEOUT_S) -> str | None:
    """Why nothing accepts TCP connections at host:port within timeout_s; None if something does."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as err:
        return "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))


def _check_gcs(address: str) -> None:
    """Fail fast, with one line, when address is not a GCS or rejects our token."""
    host, port = _split_host_port(address)
    hint = "start one with `ray start --head` or fix cluster.address"
    if reason := tcp_unreachable(host, port):
        raise LdmError(f"no Ray cluster at {address} ({reason}): {hint}")
    not_gcs = (
        f"{address} accepts connections but is not a Ray GCS (is it the dashboard or "
        f"Ray Client port?): {hint}"
    )
    if _answers_http1(host, port):  # the dashboard: gRPC's probe would take ~10 s to say so
        raise LdmError(not_gcs)
    from ray._raylet import InnerGcsClient
    from ray.exceptions import AuthenticationError, RpcError

    try:
        InnerGcsClient.standalone(address, None, _GCS_PROBE_TIMEOUT_MS)
    except AuthenticationError:
        raise LdmError(f"Ray cluster at {address} refused the connection: {auth_hint()}") from None
    except RpcError:
        raise LdmError(not_gcs) from None


def _answers_http1(host: str, port: int) -> bool:
    """Whether host:port answers a plain HTTP/1.0 request (a GCS speaks only gRPC over
    HTTP/2, and answers it with a binary frame or by closing the connection)."""
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S) as conn:
            conn.sendall(b"HEAD / HTTP/1.0\r\nHost: ray\r\n\r\n")
            return conn.recv(5) == b"HTTP/"
    except OSError:
        return False


def _resolve_auto() -> str:
    from ray._private import services

    try:
        found = services.canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError):
        found = None
    if not found:
        raise LdmError(
            "cluster address auto: no running Ray cluster found on this machine; start one "
            "with `ray start --head` or set cluster.address to host:port"
        )
    return found


def _without_job_conflicts(runtime_env: dict[str, Any] | None) -> dict[str, Any] | None:
    """Drop what a submitted job already set: Ray refuses to merge conflicting runtime envs."""
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if not runtime_env or not raw:
        return runtime_env
    job_env = json.loads(raw).get("runtime_env") or {}
    kept = {k: v for k, v in runtime_env.items() if k == "env_vars" or k not in job_env}
    if "env_vars" in kept:
        taken = job_env.get("env_vars") or {}
        kept["env_vars"] = {k: v for k, v in kept["env_vars"].items() if k not in taken}
    dropped = sorted(set(runtime_env) - set(kept))
    if dropped:
        log.debug("inside a Ray job: keeping the job's runtime_env for %s", dropped)
    return kept


def _current_session() -> RaySession:
    import ray
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    node = ray._private.worker._global_node
    return RaySession(
        address=ray.get_runtime_context().gcs_address,
        dashboard_url=f"http://{url}" if url else None,
        # This process started the Ray it uses (it ends with it) when its node is the head.
        embedded=bool(node is not None and node.head),
    )


@contextmanager
def ray_session(
    address: str | None = None,
    num_cpus: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    *,
    object_store_memory: int | None = None,
    include_dashboard: bool = False,
) -> Iterator[RaySession]:
    """Run the body with Ray initialised; undo only what this call set up.

    - Ray already initialised in this process: reuse it, shut nothing down.
    - Inside a Ray job (`RAY_ADDRESS` set, as the Jobs API does): connect to that cluster,
      whatever `address` says — the job's own cluster is the right one.
    - `address` None: start a private Ray on this machine (`num_cpus` CPUs, a bounded object
      store, no dashboard unless asked, token auth with a token file outside $HOME) and
      stop it on exit.
    - `address` "auto", "host:port" (GCS) or "ray://host:port" (Ray Client): connect, and
      disconnect on exit. `num_cpus`, `object_store_memory` and `include_dashboard` only
      apply to an embedded Ray.

    Raises LdmError within ~15 s when the cluster is unreachable or refuses our token.
    `runtime_env` applies to every task and actor; inside a job, keys the job already set
    are left to the job.
    """
    import ray
    from ray.exceptions import RayError

    if ray.is_initialized():
        yield _current_session()
        return

    for key, value in ray_env().items():
        os.environ.setdefault(key, value)
    target = os.environ.get("RAY_ADDRESS") or address
    saved_auth = {k: os.environ.get(k) for k in (AUTH_MODE, AUTH_TOKEN_PATH)}
    try:
        kwargs = _init_kwargs(target, num_cpus, object_store_memory, include_dashboard)
        runtime_env = {**(runtime_env or {}), "worker_process_setup_hook": _WORKER_HOOK}
        if target is not None:
            runtime_env = _without_job_conflicts(runtime_env)
        else:
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **_EMBEDDED_ENV}
            if not include_dashboard:
                runtime_env["env_vars"][_QUIET_ENV] = "1"
        try:
            context = ray.init(runtime_env=runtime_env, **kwargs)
        except (ConnectionError, RuntimeError, TimeoutError, ValueError, RayError) as err:
            text = str(err).strip()
            first = text.splitlines()[0] if text else type(err).__name__
            where = f"Ray cluster at {kwargs['address']}" if target else "an embedded local Ray"
            raise LdmError(f"could not start or connect to {where}: {first}") from None
    except BaseException:
        _restore_env(saved_auth)
        raise
    session = RaySession(
        address=context.address_info.get("gcs_address") or kwargs["address"],
        dashboard_url=f"http://{context.dashboard_url}" if context.dashboard_url else None,
        embedded=target is None,
    )
    try:
        yield session
    finally:
        ray.shutdown()
        _restore_env(saved_auth)


def alive_nodes() -> list[dict[str, float]]:
    """The resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def resource_problem(
    cluster: ClusterConfig, num_workers: int, workers_key: str, nodes: list[dict[str, float]]
) -> str | None:
    """Why `nodes` (each node's resources) cannot place the workers now, or None."""
    gpus = int(sum(n.get("GPU", 0.0) for n in nodes))
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    if cluster.use_gpu and gpus < num_workers:
        return (
            f"cluster.use_gpu: {num_workers} workers need {num_workers} GPUs, the Ray cluster "
            f"has {gpus}; set cluster.use_gpu=false, lower {workers_key}, or add GPU nodes"
        )
    need = cluster.num_cpus_per_worker * num_workers
    largest = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    if need > cpus or cluster.num_cpus_per_worker > largest:
        return (
            f"{workers_key}: {num_workers} workers x cluster.num_cpus_per_worker="
            f"{cluster.num_cpus_per_worker:g} need {need:g} CPUs (at most {largest:g} on one "
            f"node), the Ray cluster has {cpus:g} on {len(nodes)} node(s); lower them or add nodes"
        )
    if cluster.placement_strategy == "STRICT_SPREAD" and len(nodes) < num_workers:
        return (
            f"cluster.placement_strategy: STRICT_SPREAD puts each of the {num_workers} workers "
            f"on its own node, the Ray cluster has {len(nodes)}; use SPREAD or add nodes"
        )
    return None


def check_resources(
    cluster: ClusterConfig,
    num_workers: int,
    workers_key: str,
    wait_s: float = 0.0,
    nodes: Callable[[], list[dict[str, float]]] = alive_nodes,
) -> None:
    """Refuse, with the numbers, workers the cluster cannot place: Ray Train would wait for
    them forever. Up to `wait_s` seconds are given to an autoscaler adding nodes."""
    deadline = time.monotonic() + wait_s
    while (problem := resource_problem(cluster, num_workers, workers_key, nodes())) is not None:
        if time.monotonic() >= deadline:
            waited = f" (waited {wait_s:g} s for it to grow: cluster.resource_wait_s)"
            raise LdmError(problem + (waited if wait_s else ""))
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def worker_scaling(cluster: ClusterConfig, num_workers: int) -> ScalingConfig:
    """Ray Train's ScalingConfig for `num_workers` workers placed per the cluster settings:
    `cluster.num_cpus_per_worker` CPUs (and a GPU with `cluster.use_gpu`) each."""
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=num_workers,
        use_gpu=cluster.use_gpu,
        resources_per_worker={
            "CPU": cluster.num_cpus_per_worker,
            **({"GPU": 1} if cluster.use_gpu else {}),
        },
        placement_strategy=cluster.placement_strategy,
    )


_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_WORKER_HOOK = "orchestrator.cluster.on_worker_start"
_QUIET_ENV = "LDM_EMBEDDED_WITHOUT_DASHBOARD"
# Ray Train's PreemptionWatcher actor tells workers that a cloud is about to reclaim their
# node (a Ray node drain); an embedded Ray is this one machine, never drained that way, and
# ldm's ranks stop on SIGTERM instead. Its only visible effect here was an ERROR line from
# the controller for every job ("PreemptionWatcher ... has constructor arguments in the
# object store and max_restarts > 0"): Ray's own warning about Ray's own actor.
_EMBEDDED_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def on_worker_start() -> None:
    """Every Ray worker process of an ldm session runs this first (Ray's
    `worker_process_setup_hook`): SIGTERM handed to a running rank, and, in an embedded Ray
    without a dashboard, Ray Train's placement-group cleaner quiet. That cleaner asks the
    State API, which the dashboard serves, every second whether the controller lives; without
    a dashboard each query fails and logs a warning (545 lines in one demo). Its cleanup only
    matters when the controller dies while the cluster lives on, and an embedded Ray ends
    with its driver: its warnings go unshown."""
    if os.environ.get(_QUIET_ENV) == "1":
        logging.getLogger(_PG_CLEANER_LOGGER).setLevel(logging.ERROR)
    _defer_sigterm_to_rank()


def _defer_sigterm_to_rank() -> None:
    """Ray's worker loop installs, after this hook runs, a SIGTERM handler that exits the
    process at once (through `ray._private.utils.set_sigterm_handler`): a preempted node's
    rank would die mid-step and save nothing. Wrap it: while a rank runs in the process, the
    first SIGTERM asks it to checkpoint and stop (`core.signals`); otherwise, and on a second
    SIGTERM or once the grace period is over, Ray's handler acts as before."""
    import ray._private.utils as ray_utils

    install = ray_utils.set_sigterm_handler

    def install_wrapped(ray_handler: Any) -> None:
        def handler(signum: int, frame: Any) -> None:
            if not signals.on_signal(signal.Signals(signum).name):
                ray_handler(signum, frame)

        install(handler)

    ray_utils.set_sigterm_handler = install_wrapped


def _init_kwargs(
    target: str | None,
    num_cpus: int | None,
    object_store_memory: int | None,
    include_dashboard: bool,
) -> dict[str, Any]:
    """ray.init arguments for target, after the checks and auth setup it needs."""
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if target is None:
        os.environ.update(_embedded_auth_env())
        _sync_auth_config()
        if object_store_memory is None:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            object_store_memory = min(_EMBEDDED_OBJECT_STORE_MAX, total // 10)
        kwargs.update(
            address="local",  # None would join a cluster found in /tmp/ray instead
            num_cpus=num_cpus,
            object_store_memory=object_store_memory,
            include_dashboard=include_dashboard,
            _node_ip_address="127.0.0.1",
        )
        if include_dashboard:
            kwargs["dashboard_host"] = "127.0.0.1"
        return kwargs
    _sync_auth_config()
    if target == "auto":
        target = _resolve_auto()
    if target.startswith("ray://"):
        host, port = _split_host_port(target.removeprefix("ray://"))
        if reason := tcp_unreachable(host, port):
            raise LdmError(f"no Ray Client server at {target} ({reason}): fix cluster.address")
    else:
        _check_gcs(target)
    kwargs["address"] = target
    return kwargs


def _restore_env(saved: dict[str, str | None]) -> None:
    """Put auth variables back so a later session in this process starts from the user's."""
    changed = False
    for key, value in saved.items():
        if os.environ.get(key) != value:
            changed = True
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if changed:
        _sync_auth_config()
