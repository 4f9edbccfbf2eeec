"""Start-up: seconds from launching `ldm train` to its first finished step, vs bare DeepSpeed.

The system is `ldm train CONFIG` as a user runs it (a subprocess; one worker, which the stage
launcher runs in the command's own process, with no Ray: the demo UNet with ZeRO-2 fp32, the
latent cache, MLflow in SQLite). Its first finished step is the MLflow timestamp of the
step-1 `loss` (`train.log_every=1`), taken by rank 0 right after the step.

The baseline is `python bench/bare_deepspeed_step.py` (one rank, the process group set up as
torchrun would but with a file rendezvous: torchrun's store would listen on every interface):
the same UNet,
`deepspeed.initialize` through `training.engine.build_engine` (the same DeepSpeed JSON),
one step on random tensors of a batch's shapes; with DS_ACCELERATOR=cpu, the shared-memory
op skipped as training/engine.py does, and torch's default threads (every core, as the
in-process rank has). Its first step is the time.time() the script records after
`engine.step()`.

Both clocks are this machine's wall clock, read from launch (just before the subprocess
starts). Each side runs `--repeats` times, alternating; the figure is the fastest run of
each (the one least disturbed by other work), all runs are kept in the JSON.

Breakdown of the system (the first from the line the driver prints, the last two MLflow
timestamps): driver ready (imports, config and cache checks, MLflow run created), model +
engine + EMA + loader + FLOPs count ready (`model_gflops_per_sample` at step 0), first step
done. With more workers, or `train.max_failures` > 0, the ranks are Ray Train workers: Ray's
start-up then comes on top (about 11 s here before the in-process path, see the README).

    python -m bench.startup [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import WORK, table, write_result
from bench.overhead import (
    Launched,
    ensure_cache,
    launch_train,
    metric_histories,
    run_command,
    train_config,
)
from core.layout import RunLayout

if TYPE_CHECKING:
    from core.config import ExperimentConfig

OUT = WORK / "startup"
BARE_SCRIPT = Path(__file__).resolve().parent / "bare_deepspeed_step.py"

# (label, text of the first output line that marks it), in the order they happen.
SYSTEM_LINES = [
    ("driver ready (imports, checks, MLflow run)", "train: MLflow run "),
]
BARE_MARKS = [
    ("interpreter start", "script_start"),
    ("import torch", "import_torch"),
    ("import deepspeed", "import_deepspeed"),
    ("import project, load config", "import_project_and_config"),
    ("process group (gloo)", "process_group"),
    ("build UNet (imports diffusers)", "build_unet"),
    ("deepspeed.initialize", "deepspeed_initialize"),
    ("first step", "first_step"),
]


def system_marks(config: ExperimentConfig, run: Launched) -> dict[str, float]:
    """Seconds from launch to each milestone of one `ldm train` run."""
    marks = {label: run.first(text) for label, text in SYSTEM_LINES}
    history = metric_histories(
        RunLayout.of(config).tracking_uri, run.run_id(), ["model_gflops_per_sample", "loss"]
    )
    marks["model, engine, loader ready (MLflow, step 0)"] = (
        history["model_gflops_per_sample"][0].timestamp / 1000
    )
    marks["first step done (MLflow loss, step 1)"] = history["loss"][1].timestamp / 1000
    return {k: (v - run.launched if v is not None else float("nan")) for k, v in marks.items()}


def bare_marks(config: ExperimentConfig, latent_channels: int, index: int) -> dict[str, float]:
    """Seconds from launching the bare script to each milestone it records."""
    yaml_path = OUT / "bare.yaml"
    yaml_path.write_text(config.to_yaml())
    out = OUT / f"bare-marks-{index}.json"
    out.unlink(missing_ok=True)
    job = {
        "config": str(yaml_path),
        "latent_channels": latent_channels,
        "out": str(out),
        "rendezvous": str(OUT / f"rendezvous-{index}"),
    }
    (OUT / f"rendezvous-{index}").unlink(missing_ok=True)
    job_path = OUT / "bare-job.json"
    job_path.write_text(json.dumps(job))
    run = run_command(
        [sys.executable, str(BARE_SCRIPT), str(job_path)],
        OUT / f"bare-{index}.log",
        # gloo on loopback; torch's default threads, as the in-process rank has.
        env={"DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo"},
    )
    if run.returncode != 0 or not out.is_file():
        raise SystemExit(f"bare DeepSpeed failed ({run.returncode}):\n{run.tail()}")
    marks = json.loads(out.read_text())
    return {label: marks[key] - run.launched for label, key in BARE_MARKS}


def main(repeats: int = 2) -> dict[str, Any]:
    """Alternate bare DeepSpeed and `ldm train` launches, print the table, write the JSON."""
    from mlflow.tracking import MlflowClient

    from data_pipeline.cache import read_manifest

    cache = ensure_cache()
    latent_channels = read_manifest(cache)["spec"]["latent_channels"]
    config = train_config("startup", 1, num_steps=2, log_every=1, root=OUT)
    # A user's store exists after their first run: create it before timing, not during.
    MlflowClient(tracking_uri=RunLayout.of(config).tracking_uri).search_experiments()
    systems, bares = [], []
    for i in range(repeats):
        bares.append(bare_marks(config, latent_channels, i))
        print(f"bare DeepSpeed {i + 1}: first step at {bares[-1]['first step']:.1f} s", flush=True)
        systems.append(system_marks(config, launch_train(config)))
        first = systems[-1]["first step done (MLflow loss, step 1)"]
        print(f"ldm train {i + 1}: first step at {first:.1f} s", flush=True)

    system = min(systems, key=lambda m: m["first step done (MLflow loss, step 1)"])
    bare = min(bares, key=lambda m: m["first step"])
    system_s, bare_s = system["first step done (MLflow loss, step 1)"], bare["first step"]
    result = {
        "system_first_step_s": system_s,
        "bare_first_step_s": bare_s,
        "ratio": bare_s / system_s,
        "extra_s": system_s - bare_s,
        "system_marks": system,
        "bare_marks": bare,
        "all_system_runs": systems,
        "all_bare_runs": bares,
        "repeats": repeats,
        "zero_stage": config.train.zero_stage,
        "micro_batch_size": config.train.micro_batch_size,
    }
    write_result("startup", result)
    rows = [
        (
            "launch to first finished step, s",
            f"{system_s:.1f} ldm train",
            f"{bare_s:.1f} bare DeepSpeed",
            f"{bare_s / system_s:.2f}",
        )
    ]
    print(table(rows))
    print(f"\nldm train (fastest of {repeats}), seconds from launch:")
    previous = 0.0
    for label, at in system.items():
        print(f"  {at:6.1f}  (+{at - previous:5.1f})  {label}")
        previous = at
    print(f"bare DeepSpeed (fastest of {repeats}), seconds from launch:")
    previous = 0.0
    for label, at in bare.items():
        print(f"  {at:6.1f}  (+{at - previous:5.1f})  {label}")
        previous = at
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side")
    args = parser.parse_args()
    main(args.repeats)
