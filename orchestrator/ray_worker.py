"""The entry point of every Ray Train worker, kept light on purpose.

Ray Train's controller unpickles the train function and its config before any worker
starts: if they named the rank code (torch, DeepSpeed, diffusers), the controller would
import all of it first (seconds per job). So the launcher names the rank function as a
`module:function` string and sends its `RankContext` as JSON that only the workers read
(data, never pickled objects), and this module imports nothing heavy at the top.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from core import signals, storage
from core.config import ExperimentConfig
from core.layout import RunLayout
from orchestrator.cluster import usable_cores
from training.context import RankContext


def pack(context: RankContext) -> str:
    """The rank function's context as JSON the controller passes on unopened: the config, the
    driver's MLflow URI (the rest of the layout follows from the config), the run and the
    stage's arguments. Large inputs travel apart, through the object store."""
    return json.dumps(
        {
            "config": context.config.to_dict(),
            "tracking_uri": context.layout.tracking_uri,
            "run_id": context.run_id,
            "args": context.args,
        }
    )


def unpack(payload: str) -> RankContext:
    """The context `pack` wrote, rebuilt on a worker: the same config (digest included) and
    the driver's layout."""
    values = json.loads(payload)
    config = ExperimentConfig.model_validate(values["config"])
    layout = RunLayout.of(config, {"MLFLOW_TRACKING_URI": values["tracking_uri"]})
    return RankContext(config, layout, values["run_id"], values["args"])


def rank_function_of(reference: str) -> Any:
    """The rank function a `module:function` reference names, imported where it runs: a
    stage's driver never imports the rank code (DeepSpeed, diffusers: seconds per job)."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def cpu_share(reserved: float, workers_on_node: int) -> int:
    """Torch threads of one worker: its share of its node's CPUs, at least its reservation.

    Ray sets OMP_NUM_THREADS to a worker's CPU reservation (`cluster.num_cpus_per_worker`, 1
    by default), which would leave a lone worker on one core of a many-core node. The node's
    CPUs are what Ray counts there (container limits included), at most the cores this
    process may run on.
    """
    import ray

    node = ray.get_runtime_context().get_node_id()
    counted = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
    cpus = min(int(counted) or usable_cores(), usable_cores())
    return max(1, math.floor(reserved), cpus // max(1, workers_on_node))


def run_rank(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: its share of the cores, the large inputs from the object store,
    then the stage's rank function with a `report` that registers committed checkpoints."""
    import ray
    import ray.train
    import torch  # noqa: PLC0415 - kept out of Ray Train's controller, which imports this module

    context = unpack(loop_config["payload"])
    train_context = ray.train.get_context()
    rank = train_context.get_world_rank()
    # Zero-copy from the node's object store: workers on one node map the same copy.
    context.data = dict(zip(loop_config["data_keys"], ray.get(loop_config["data"]), strict=True))
    node = ray.get_runtime_context().get_node_id()
    stage = loop_config["stage"]
    address = ray.util.get_node_ip_address()
    print(f"{stage}: worker rank {rank} on node {node} ({address}) pid {os.getpid()}", flush=True)
    reserved = context.config.cluster.num_cpus_per_worker
    torch.set_num_threads(cpu_share(reserved, train_context.get_local_world_size()))

    def report(metrics: dict[str, float], tag: str | None) -> None:
        # Ray Train registers a small pointer; the tag on storage (with its commit marker)
        # stays the source of truth, so a large checkpoint is never copied twice.
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0 and tag is not None:
                Path(tmp, "ldm_checkpoint.txt").write_text(str(tag))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(
                metrics,
                checkpoint=checkpoint,
                checkpoint_dir_name=storage.basename(tag) if tag else None,
            )

    context.report = report
    signals.arm(loop_config["grace_s"])  # a SIGTERM to this process now saves and stops
    try:
        rank_function_of(loop_config["rank_function"])(context)
    finally:
        signals.disarm()
