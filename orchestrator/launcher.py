"""The one stage launcher: every training stage (the autoencoder and the UNet) runs through it.

`launch` owns what a stage's driver does around its ranks: the job's one MLflow run (started,
or reopened when the job resumes, and ended with the job's status), the Ray session, a
`TorchTrainer` whose workers each run the stage's rank function (restarted up to
`max_failures` times, each time from the newest committed checkpoint), SIGTERM/SIGINT to this
process or SIGTERM to any worker's turned into "checkpoint and stop" within a grace period,
and a one-line error for a user's mistake found inside a worker. One worker on this machine
(no cluster address, not inside a Ray job, no restarts asked for) is that same rank run in
this process: a file rendezvous, nothing listening on a port, no Ray start-up.
"""

from __future__ import annotations

import ctypes
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.distributed as dist

from core import storage
from core.config import ExperimentConfig
from core.errors import LdmError, Preempted
from core.layout import CheckpointPlace, RunLayout
from orchestrator.cluster import (
    alive_nodes,
    check_resources,
    ray_session,
    usable_cores,
    worker_scaling,
)
from orchestrator.ray_worker import pack, rank_function_of, run_rank
from orchestrator.shared_paths import unshared_paths_problem
from training import checkpoint as ckpt
from training.context import RankContext
from training.tracking import end_run, reopen_run, start_run

RankFunction = Callable[[RankContext], dict[str, float]]

# glibc hands large freed blocks back to the OS (above a threshold it moves at run time), so
# a step's big buffers are page-faulted in anew every step. Inside a DeepSpeed engine the
# demo's stage-1 step took ~15,000 page faults (plain torch: ~2,300) and ran at 7.0 steps/s
# against plain torch's 8.0-8.3; with blocks up to 256 MB kept in the heap and 1 GB of free
# heap before trimming: ~40 faults a step and 8.3 steps/s (measured in one process, 2 threads).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824"
_WORKER_ENV = (
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "MLFLOW_DISABLE_TELEMETRY",
    "DO_NOT_TRACK",
    "TOKENIZERS_PARALLELISM",
    "PYTHONWARNINGS",
)


@dataclass
class Stage:
    """One training stage as the launcher runs it."""

    name: str
    """`autoencoder` or `train`: the MLflow `ldm.stage` tag and the prefix of printed lines."""
    rank_function: str
    """`module:function` of the rank code (`RankFunction`), imported only where a rank runs:
    in this process for one local worker, else in every Ray Train worker."""
    num_workers: int
    max_failures: int
    preempt_grace_s: float
    checkpoints: CheckpointPlace
    """Where the stage's tags are: named in the message of a stopped job."""
    run_name: str
    """The MLflow run's name."""
    tags: dict[str, str] = field(default_factory=dict)
    """MLflow tags, set on a new run and refreshed on a reopened one."""
    args: dict[str, Any] = field(default_factory=dict)
    """`RankContext.args`: the same on every rank."""
    data: dict[str, Any] = field(default_factory=dict)
    """`RankContext.data`: large inputs; through Ray's object store to workers."""
    resume_run_id: str | None = None
    """The MLflow run of the checkpoint the job resumes, reopened instead of a new one."""
    on_start: Callable[[str], None] | None = None
    """Called with the run id once the MLflow run exists (e.g. to log the dataset input)."""


@dataclass
class Launched:
    run_id: str
    metrics: dict[str, float]
    """The last metrics rank 0 reported (or returned, in process)."""


def worker_env() -> dict[str, str]:
    """Environment every Ray worker gets: CPU DeepSpeed, offline models, caches kept local,
    fewer page faults, and single (not doubled) output lines."""
    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    env["GLIBC_TUNABLES"] = os.environ.get("GLIBC_TUNABLES", MALLOC_TUNABLES)
    # Ray Train's print patch doubles every line a worker prints (Ray 2.60 tees it whenever
    # stdout is wrapped, and Ray's own wrapper always is in a worker).
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    return env


def in_process(config: ExperimentConfig, num_workers: int, max_failures: int) -> bool:
    """One worker on this machine (no cluster address, not inside a Ray job) and no restarts
    to manage: the rank runs in the launcher's process, without Ray's start-up."""
    return (
        num_workers == 1
        and max_failures == 0
        and config.cluster.address is None
        and not os.environ.get("RAY_ADDRESS")
    )


def check_local_gpu(config: ExperimentConfig, num_workers: int, max_failures: int) -> None:
    """A stage that will run in this process with `cluster.use_gpu` needs a GPU here: drivers
    call this first, before any data is read (a cluster's GPUs are checked on connecting)."""
    if (
        config.cluster.use_gpu
        and in_process(config, num_workers, max_failures)
        and not torch.cuda.is_available()
    ):
        raise LdmError(
            "cluster.use_gpu: this machine has no GPU torch can use; set cluster.use_gpu=false, "
            "or run on a cluster with GPUs (cluster.address)"
        )


def launch(config: ExperimentConfig, layout: RunLayout, stage: Stage) -> Launched:
    """Run `stage` to its end (or to a graceful stop: `Preempted`), tracked in one MLflow run."""
    local = in_process(config, stage.num_workers, stage.max_failures)
    check_local_gpu(config, stage.num_workers, stage.max_failures)
    rank_function = rank_function_of(stage.rank_function) if local else None
    run_id, previous_status = _open_run(config, layout, stage)
    status, trained = "FAILED", False
    stop = _GracefulStop(layout.stop_file, stage.preempt_grace_s, stage.name)
    metrics: dict[str, float] = {}
    try:
        context = RankContext(config, layout, run_id, stage.args, stage.data)
        if local:
            with stop:
                trained = True
                metrics = _run_in_process(rank_function, context)
        else:
            env = {"env_vars": worker_env()}
            with ray_session(config.cluster.address, runtime_env=env) as session:
                # An embedded Ray never grows: no point waiting for more of it.
                wait_s = 0.0 if session.embedded else config.cluster.resource_wait_s
                check_resources(
                    config.cluster, stage.num_workers, f"{stage.name}.num_workers", wait_s
                )
                if (
                    problem := unshared_paths_problem(config, stage.name, alive_nodes())
                ) is not None:
                    raise LdmError(problem)
                with stop:  # installed after ray.init, which sets a SIGTERM handler of its own
                    trained = True
                    metrics = _run_on_ray(config, layout, stage, context, session.embedded)
        # A worker's own SIGTERM stopped the ranks: rank 0 wrote which, in the stop file.
        if stop.signal_name is None and storage.exists(layout.stop_file):
            stop.signal_name = storage.read_bytes(layout.stop_file).decode(errors="replace")[:80]
        status = "KILLED" if stop.signal_name else "FINISHED"
    except _GraceExpired:
        status = "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is not None:
            raise user_error from None
        raise
    finally:
        if not trained and previous_status:  # e.g. an unreachable cluster: nothing changed
            status = previous_status
        end_run(layout.tracking_uri, run_id, status)
        storage.remove(layout.stop_file)
    if stop.signal_name:
        newest = ckpt.newest(stage.checkpoints)
        saved = "the checkpoint was saved" if stop.saved_in_time else "the grace period ran out"
        raise Preempted(
            f"stopped by {stop.signal_name}: {saved}; newest checkpoint "
            f"{storage.basename(newest) if newest else '(none)'}; "
            "run the same command again to resume"
        )
    return Launched(run_id, metrics)


def _open_run(config: ExperimentConfig, layout: RunLayout, stage: Stage) -> tuple[str, str | None]:
    """The job's MLflow run: the resumed checkpoint's, reopened (its status returned, to be
    restored if the job never trains), or a new one."""
    uri = layout.tracking_uri
    run_id, previous_status = stage.resume_run_id, None
    if run_id is not None:
        try:
            previous_status = reopen_run(uri, run_id, stage.tags)
        except Exception as err:  # another tracking store: the checkpoint's run is not there
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            print(
                f"{stage.name}: the checkpoint's MLflow run {run_id} is not in the tracking "
                f"store {uri} (it was tracked in another store, or deleted: {first}); logging "
                "to a new run",
                flush=True,
            )
            run_id = None
    if run_id is None:
        run_id = start_run(
            uri,
            config.tracking.experiment,
            stage.run_name,
            config.flat(),
            tags={"ldm.stage": stage.name, **stage.tags},
            artifact_root=layout.mlflow_artifacts,
        )
        if stage.on_start is not None:
            stage.on_start(run_id)
    print(f"{stage.name}: MLflow run {run_id} at {uri}", flush=True)
    return run_id, previous_status


# --- one rank in this process ---------------------------------------------------------------


def _keep_freed_memory() -> None:
    """MALLOC_TUNABLES for this process, set at run time (see `worker_env`)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its defaults stay
        return
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    libc.mallopt(-3, 1 << 28)  # M_MMAP_THRESHOLD


@contextmanager
def single_rank_group() -> Iterator[None]:
    """A one-rank process group in this process, as a Ray Train worker has one: NCCL on a
    GPU, else gloo; a file rendezvous (a TCP store would listen on every interface)."""
    from training.engine import forget_process_groups  # noqa: PLC0415 - DeepSpeed: ranks only

    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what DeepSpeed reads
    with tempfile.TemporaryDirectory() as tmp:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)
        forget_process_groups()  # of an earlier group in this process, if any
        dist.init_process_group(
            backend, init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1
        )
        try:
            yield
        finally:
            dist.destroy_process_group()
            forget_process_groups()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _run_in_process(rank_function: RankFunction, context: RankContext) -> dict[str, float]:
    _keep_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    try:
        with single_rank_group():
            return rank_function(context)
    finally:
        torch.set_num_threads(threads)


# --- Ray Train workers ----------------------------------------------------------------------


def _ray_storage(layout: RunLayout) -> tuple[str, Any]:
    """Ray Train's storage: a folder in the run's storage (local, or the object-store prefix
    through the same fsspec filesystem and credentials as everything else)."""
    if not storage.is_remote(layout.storage_dir):
        return str(Path(layout.storage_dir).resolve()), None
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(layout.storage_dir)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _run_on_ray(
    config: ExperimentConfig, layout: RunLayout, stage: Stage, context: RankContext, embedded: bool
) -> dict[str, float]:
    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.rendezvous import NodeBoundTorchConfig  # noqa: PLC0415 - imports ray

    class LeanTrainer(TorchTrainer):
        """Ray Train's trainer without the helper actors ldm has no use for, each a process
        started per job: the dataset manager (ldm passes Ray Train no datasets: its ranks
        stream the latent cache), and in an embedded Ray, which ends with this process, the
        placement-group cleaner (it outlives a crashed controller on a cluster)."""

        def _create_default_callbacks(self) -> list:
            unused = {"DatasetsCallback"}
            if embedded:
                unused.add("PlacementGroupCleanerCallback")
            return [
                c for c in super()._create_default_callbacks() if type(c).__name__ not in unused
            ]

    keys = sorted(stage.data)
    data = [ray.put(stage.data[k]) for k in keys]
    context.data = {}  # travels through the object store, not inside the pickled context
    storage_path, filesystem = _ray_storage(layout)
    name = f"ray_{stage.name}"
    trainer = LeanTrainer(
        run_rank,
        torch_config=NodeBoundTorchConfig(timeout_s=config.cluster.collective_timeout_s),
        train_loop_config={
            "rank_function": stage.rank_function,
            "payload": pack(context),
            "stage": stage.name,
            "grace_s": stage.preempt_grace_s,
            "data_keys": keys,
            "data": data,
        },
        scaling_config=worker_scaling(config.cluster, stage.num_workers),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=stage.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        # Tags and their commit markers are the checkpoints; Ray's folder holds only
        # pointers to them, useful to no later job.
        storage.remove_tree(storage.join(layout.storage_dir, name))
    return dict(result.metrics or {})


# --- SIGTERM and user errors ----------------------------------------------------------------


class _GraceExpired(Exception):
    pass


class _GracefulStop:
    """SIGTERM/SIGINT -> ask every rank to checkpoint and stop, within a grace period.

    The request is a file on the run's storage that rank 0 polls each step; SIGALRM ends the
    wait when the grace period runs out, and a second signal ends it at once. Either way the
    newest committed checkpoint stays valid, so only unsaved steps are lost.
    """

    def __init__(self, stop_file: str, grace_s: float, stage: str):
        self.stop_file, self.grace_s, self.stage = stop_file, grace_s, stage
        self.signal_name: str | None = None
        self.saved_in_time = True
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:  # a second signal: stop waiting
            self.saved_in_time = False
            raise _GraceExpired()
        self.signal_name = signal.Signals(signum).name
        storage.makedirs(storage.dirname(self.stop_file))
        storage.write_bytes(self.stop_file, self.signal_name.encode())
        print(
            f"{self.stage}: {self.signal_name}: saving a checkpoint and stopping "
            f"(grace {self.grace_s:g} s)",
            flush=True,
        )
        signal.setitimer(signal.ITIMER_REAL, self.grace_s)

    def _expire(self, signum: int, frame: Any) -> None:
        self.saved_in_time = False
        raise _GraceExpired()

    def __enter__(self) -> _GracefulStop:
        storage.remove(self.stop_file)  # a request left by an earlier, killed job
        for sig, handler in (
            (signal.SIGTERM, self._handle),
            (signal.SIGINT, self._handle),
            (signal.SIGALRM, self._expire),
        ):
            self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def find_user_error(err: BaseException) -> LdmError | None:
    """Ray wraps worker exceptions; surface an LdmError raised inside a worker as itself."""
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, LdmError):
            original = getattr(e, "cause", None) or e  # RayTaskError keeps the original here
            return LdmError(original.args[0] if original.args else str(original))
        # Ray re-raises worker errors as RayTaskError subclasses of the original type, inside
        # a WorkerGroupError that maps ranks to their failures.
        stack += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    return None
