"""Shared test setup: offline models, caches out of $HOME, the fixture images, and two ways
to run the real `ldm` command line: in this process (`ldm`, seconds) or as a subprocess
(`run_ldm`, for what needs a process of its own: signals, kills, a clean interpreter)."""

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from orchestrator.cli import main, set_default_env

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_IMAGES = ROOT / "tests" / "fixtures" / "emoji64"

set_default_env()
# Ray Train's controller looks at its workers every 2 s by default: in these short runs that
# is seconds of waiting per run, for a finished worker group to be noticed.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def run_ldm(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run the real `ldm` command line in a subprocess; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def ldm(*args: str) -> subprocess.CompletedProcess:
    """Run the real `ldm` command line in this process (argument parsing, the command, its
    one-line errors and exit status), without a new interpreter's imports; returns what
    `run_ldm` returns."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse refusing the arguments
            code = exit_.code
    return subprocess.CompletedProcess(["ldm", *args], code, out.getvalue(), err.getvalue())


_SHARED_RAY = ExitStack()
_SESSION = ExitStack()
_S3_ENV: dict[str, str] = {}
_WANT_S3 = False


def pytest_collection_modifyitems(session, config, items) -> None:
    """The tests that need this process without Ray (`no_ray`) run last, so the suite's
    embedded Ray starts once, not again after each of them; after them the multi-host tests,
    whose clusters run on hosts of their own while the embedded Ray is down. When S3 tests
    were collected, their server starts with the embedded Ray (see `shared_s3`)."""
    global _WANT_S3

    def place(item) -> int:
        return 2 if item.path.name == "test_multihost.py" else int("no_ray" in item.fixturenames)

    items.sort(key=place)  # stable: otherwise in order
    _WANT_S3 = any(item.path.name == "test_s3.py" for item in items)


def _session_s3_env() -> dict[str, str]:
    """The session's one S3 server (moto), started on first use. Its endpoint and
    credentials are set in this process's environment, where the embedded Ray's processes
    find them too, as a cluster's nodes find theirs."""
    if not _S3_ENV:
        from tests.s3_server import local_s3

        _S3_ENV.update(_SESSION.enter_context(local_s3()))
        os.environ.update(_S3_ENV)
    return _S3_ENV


@contextmanager
def shared_s3() -> Iterator[dict[str, str]]:
    """For one test: the session's S3 server's environment. The test starts and ends with
    no S3 filesystem cached in this process (a cached one holds an event loop thread that a
    forked loader worker must not inherit)."""
    from tests.s3_server import forget_filesystems

    env = _session_s3_env()
    forget_filesystems()
    try:
        yield env
    finally:
        forget_filesystems()


def start_shared_ray() -> None:
    """The suite's embedded Ray in this process, started once: every `ray_session` of an
    in-process run reuses it (each start and stop costs seconds and spawns Ray's own
    processes). It stays up until a test needs this process without Ray (`no_ray`). In a
    session with S3 tests it starts inside the S3 server's settings."""
    import ray

    from orchestrator.cluster import ray_session
    from orchestrator.launcher import worker_env

    if not ray.is_initialized():
        if _WANT_S3:
            _session_s3_env()
        _SHARED_RAY.enter_context(ray_session(runtime_env={"env_vars": worker_env()}))


@pytest.fixture
def embedded_ray() -> None:
    """In-process multi-worker runs on the suite's one embedded Ray."""
    start_shared_ray()


def stop_shared_ray() -> None:
    _SHARED_RAY.close()


@pytest.fixture
def no_ray() -> None:
    """This process without Ray, for tests of `ray_session` itself and of addresses: a
    running Ray would be reused instead of the one they name."""
    stop_shared_ray()


def pytest_sessionfinish(session, exitstatus) -> None:
    stop_shared_ray()
    _SESSION.close()


def _ray_processes(name: str) -> list:
    """Processes under this one (its embedded Ray's) whose command line names `name` (Ray
    renames a worker after the actor it runs)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if name in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def kill_a_train_worker(sig: int = signal.SIGKILL) -> int | None:
    """Send `sig` to one Ray Train worker of this process's embedded Ray (SIGKILL: as a lost
    node or an OOM kill would; SIGTERM: as a preempted node's pod gets); its pid, or None
    when there is none."""
    import psutil

    for proc in _ray_processes("RayTrainWorker"):
        try:
            proc.send_signal(sig)
            return proc.pid
        except psutil.Error:
            pass
    return None


def train_helper_actors() -> list[str]:
    """Ray Train helper actors running under this process's embedded Ray that ldm turns off
    (see `orchestrator.launcher.LeanTrainer`)."""
    names = ("DatasetManager", "PlacementGroupCleaner")
    return [name for name in names for _ in _ray_processes(name)]


def train_worker_listeners() -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening socket of this process's Ray Train workers."""
    import psutil

    found = []
    for proc in _ray_processes("RayTrainWorker"):
        try:
            found += [
                (proc.pid, c.laddr.ip, c.laddr.port)
                for c in proc.net_connections("inet")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.Error:
            pass
    return found


def when_file_appears(path: Path, action, timeout_s: float = 300) -> threading.Thread:
    """In the background: run `action()` once `path` exists."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not path.is_file():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@contextmanager
def sigterm_to_this_process_when(path: Path) -> Iterator[list[int]]:
    """SIGTERM to this process once `path` exists, as a scheduler or Ctrl-C stops an `ldm`
    command run in it (`ldm`): the command's handler, installed while it runs, takes it.
    Should it come when no command runs, a handler here records it (in the list yielded)
    instead of ending the test session."""
    stray: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stray.append(signum))
    try:
        watcher = when_file_appears(path, lambda: os.kill(os.getpid(), signal.SIGTERM))
        yield stray
        watcher.join(timeout=5)
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    """Run every stage once through the `ldm` command line (in this process, on the shared
    embedded Ray); tests below inspect what each produced."""
    work = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{work}/mlflow.db"
    (work / "exp.yaml").write_text(
        f"preset: tiny\nrun:\n  root: {work}/runs\ndata:\n  shards: {work}/shards\n"
        f"tracking:\n  uri: {uri}\n"
    )
    exp = str(work / "exp.yaml")
    results = {
        "shards": ok(
            ldm("shards", str(FIXTURE_IMAGES), str(work / "shards"), "--samples-per-shard", "16")
        ),
        "autoencoder": ok(ldm("autoencoder", exp)),  # one worker: in this process, no Ray
    }
    start_shared_ray()
    results["precompute"] = ok(ldm("precompute", exp))
    # 2 Ray Train workers, ZeRO-2, on the reference schedule (see `reference`).
    results["train"] = ok(ldm("train", exp, *REFERENCE_SCHEDULE, "train.sample_every=10"))
    return work, uri, results


# The schedule of the uninterrupted 2-worker run that preempted, stopped and recovered runs
# must end in: the pipeline's own training run.
REFERENCE_STEPS, REFERENCE_EVERY = 20, 5
REFERENCE_SCHEDULE = (
    f"train.num_steps={REFERENCE_STEPS}",
    f"train.checkpoint_every={REFERENCE_EVERY}",
    "train.log_every=1",
)
QUIET = ("train.sample_every=100000", "train.log_every=1", "tracking.log_model=false")


def unet_weights(work: Path, name: str, step: int) -> dict:
    from safetensors.torch import load_file

    tag = work / "runs" / name / "checkpoints" / f"step_{step:08d}"
    return load_file(tag / "unet.safetensors")


@pytest.fixture(scope="session")
def reference(pipeline):
    """The uninterrupted run on 2 Ray Train workers (ZeRO-2) on the reference schedule (the
    pipeline's training run; its sample grids draw from a forked RNG): its logged
    (step, loss) pairs and final UNet weights."""
    from mlflow.tracking import MlflowClient

    work, uri, _ = pipeline
    client = MlflowClient(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("ldm").experiment_id],
        "attributes.run_name = 'tiny' and tags.`ldm.stage` = 'train'",
    )
    losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    return losses, unet_weights(work, "tiny", REFERENCE_STEPS)


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


@pytest.fixture(scope="session")
def img2dataset_output(tmp_path_factory) -> dict:
    """Real img2dataset output, built once: webdataset shards with their parquet and
    `_stats.json` files, downloaded by the real img2dataset from a local HTTP server (48
    images of mixed sizes and formats, 3 failing URLs). Shared by the session: read it, never
    change it. See `tests.img2dataset_data.build_img2dataset_output` for the summary's keys."""
    from tests.img2dataset_data import build_img2dataset_output, img2dataset_missing

    missing = img2dataset_missing()
    if missing:
        pytest.fail(missing, pytrace=False)
    return build_img2dataset_output(tmp_path_factory.mktemp("img2dataset"))
