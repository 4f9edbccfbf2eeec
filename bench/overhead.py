"""Orchestration overhead: steady training samples/s of `ldm train` vs a bare PyTorch loop.

The system is the whole training stage as users run it: the `ldm train` command (a
subprocess) whose one worker runs in its own process, or two Ray Train workers on an
embedded local Ray, each a DeepSpeed engine (ZeRO-2,
fp32, as the demo preset) streaming micro-batches from the latent cache through a DataLoader
worker, and rank 0 logging to a real MLflow store (SQLite). The baseline is a bare loop in
this process: the same UNet (`build_unet`, same config and seed), the same micro batch, the
same loss (`diffusion_loss`: DDPM noise-prediction MSE with the config's Min-SNR weighting and
caption dropout), torch's AdamW with the same lr and weight decay, the same gradient clipping
(DeepSpeed clips per `train.grad_clip`, so the bare loop does too) — on batches already in
memory, with no Ray, no DeepSpeed engine, no loader and no logging. It runs half its steps
just before and half just after each `ldm train`, so a slow patch of a shared machine weighs
on both sides. The loop's EMA update is not in the baseline (it is training work, not
orchestration); its cost is timed apart and shown next to the loop's unphased time.

Threads: the stage launcher gives each rank its node's cores divided among the node's
workers. One worker runs in the `ldm train` process itself (no Ray) with every core, so the
one-worker baseline runs at that many torch threads. Two Ray Train workers on this 2-core
machine fill both cores with one thread each: their total is compared with the bare loop at
2 threads (same cores) and their per-worker rate with the bare loop at 1 thread (same
threads per process).

Steady state: the system's throughput comes from what its loop logs to MLflow every
`log_every` steps, read back with MlflowClient. The first logging window (start-up, the FLOPs
trace, first-step warm-up) is excluded; the figure is global batch x steps between the end of
the first window and the last, divided by the difference of the MLflow timestamps of those
two logs (taken by rank 0 when it logs). That wall clock covers everything the loop does
(EMA, stop polling, logging), unlike the loop's own `samples_per_s`, which is shown beside
it. The per-phase split is the loop's `time/*_fraction` metrics times its `step_time_s`.

    python -m bench.overhead [--steps 35] [--log-every 5] [--one-worker] [train.zero_stage=0]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import ROOT, WORK, bench_config, demo_shards, table, write_result
from core.layout import RunLayout
from orchestrator.cluster import usable_cores

if TYPE_CHECKING:
    from core.config import ExperimentConfig

OUT = WORK / "overhead"
CACHE = WORK / "cache-train"
LDM = Path(sys.executable).parent / "ldm"
PHASES = ("data_wait", "forward", "backward", "optimizer")
# One demo shard is held out by the preset, so three shards leave 512 cached samples: enough
# for 2 workers x 1 loader worker x micro batch 16, and quick to encode.
NUM_SHARDS = 3


@dataclass
class Launched:
    """One subprocess: its exit status and every output line with the time it arrived."""

    returncode: int
    launched: float
    """time.time() just before the process was started."""
    seconds: float
    lines: list[tuple[float, str]] = field(default_factory=list)

    def first(self, text: str) -> float | None:
        """Arrival time (time.time()) of the first line containing `text`."""
        return next((t for t, line in self.lines if text in line), None)

    def run_id(self) -> str:
        line = next(line for _, line in self.lines if "train: MLflow run " in line)
        return line.split("train: MLflow run ", 1)[1].split()[0]

    def tail(self, n: int = 30) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def run_command(
    command: list[str], log: Path, env: dict[str, str] | None = None, timeout_s: float = 300.0
) -> Launched:
    """Run `command` from the repo root, timestamping each output line as it arrives; the
    output, with seconds since launch, is kept in `log`."""
    full_env = dict(os.environ)
    # Never join someone else's cluster: a stage must start its own embedded Ray.
    full_env.pop("RAY_ADDRESS", None)
    full_env["PYTHONUNBUFFERED"] = "1"  # line times only mean something if lines are not held
    full_env.update(env or {})
    lines: list[tuple[float, str]] = []
    launched = time.time()
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group, so a timeout can stop all of it
    )

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: `ldm train` saves and stops within its grace period
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(10)
    seconds = time.time() - launched
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("\n".join(f"{t - launched:8.3f} {line}" for t, line in lines) + "\n")
    return Launched(proc.returncode, launched, seconds, lines)


def run_ldm(args: list[str], log: Path, timeout_s: float = 300.0) -> Launched:
    """`ldm ARGS` as a user runs it, from this venv."""
    return run_command([str(LDM), *args], log, timeout_s=timeout_s)


def ensure_cache() -> Path:
    """The latent cache both benchmarks train on, built once by `ldm precompute` (Ray Data).

    Reused while its spec matches the bench config (same autoencoder and text encoder).
    """
    from core.errors import LdmError
    from data_pipeline.cache import check_spec, read_manifest
    from data_pipeline.precompute import cache_spec

    config = base_config()
    if (CACHE / "manifest.json").is_file():
        try:
            check_spec(
                CACHE,
                read_manifest(CACHE),
                cache_spec(config, RunLayout.of(config).autoencoder_dir),
            )
            return CACHE
        except LdmError:
            shutil.rmtree(CACHE)
    yaml_path = OUT / "precompute.yaml"
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(config.to_yaml())
    print(f"building the latent cache {CACHE} (once) with `ldm precompute`", flush=True)
    run = run_ldm(["precompute", str(yaml_path)], OUT / "precompute.log")
    if run.returncode != 0:
        raise SystemExit(f"ldm precompute failed ({run.returncode}):\n{run.tail()}")
    return CACHE


def base_config(overrides: list[str] = ()) -> ExperimentConfig:
    """The bench config (demo preset, untrained demo autoencoder) on the bench's own cache."""
    shards = demo_shards(NUM_SHARDS)
    return bench_config(
        [f"data.shards={shards}", f"precompute.cache_dir={CACHE}", f"run.root={OUT}", *overrides]
    )


def train_config(
    name: str,
    num_workers: int,
    num_steps: int,
    log_every: int,
    root: Path,
    overrides: list[str] = (),
) -> ExperimentConfig:
    """A config for a short training run: only the final checkpoint, a cheap final sample
    grid and no evaluation or model export, so the wall time goes to training steps."""
    mb = base_config(overrides).train.micro_batch_size
    return base_config(
        [
            f"run.root={root}",
            f"run.name={name}",
            f"train.num_workers={num_workers}",
            f"train.global_batch_size={mb * num_workers}",  # no gradient accumulation
            f"train.num_steps={num_steps}",
            f"train.log_every={log_every}",
            "train.checkpoint_every=1000000",
            "train.sample_every=1000000",
            "train.eval_every=0",
            "train.resume=never",
            "sample.num_inference_steps=2",
            "sample.images_per_prompt=1",
            "tracking.log_model=false",
            *overrides,
        ]
    )


def launch_train(config: ExperimentConfig, timeout_s: float = 300.0) -> Launched:
    """`ldm train` on a fresh run folder (a leftover checkpoint would make it resume)."""
    shutil.rmtree(RunLayout.of(config).run_dir, ignore_errors=True)
    RunLayout.of(config).run_dir.mkdir(parents=True)
    yaml_path = RunLayout.of(config).run_dir.parent / f"{config.run.name}.yaml"
    yaml_path.write_text(config.to_yaml())
    run = run_ldm(
        ["train", str(yaml_path)],
        RunLayout.of(config).run_dir.parent / f"{config.run.name}.log",
        timeout_s,
    )
    if run.returncode != 0:
        raise SystemExit(f"ldm train failed ({run.returncode}):\n{run.tail()}")
    return run


def metric_histories(uri: str, run_id: str, keys: list[str]) -> dict[str, dict[int, Any]]:
    """{key: {step: Metric}} as the run's MLflow store holds them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {k: {m.step: m for m in client.get_metric_history(run_id, k)} for k in keys}


def worker_threads(config: ExperimentConfig) -> int:
    """Torch threads of one rank: this machine's cores divided among the workers, as the
    stage launcher sets them (all of them for one worker, which runs in process)."""
    return max(
        1,
        math.floor(config.cluster.num_cpus_per_worker),
        usable_cores() // config.train.num_workers,
    )


def system_steady(
    config: ExperimentConfig, run: Launched, warmup_windows: int = 1
) -> dict[str, Any]:
    """Steady throughput and phase split of a finished `ldm train` run, from MLflow."""
    keys = ["loss", "samples_per_s", "samples_per_s_per_worker", "step_time_s"]
    keys += [f"time/{p}_fraction" for p in PHASES]
    history = metric_histories(RunLayout.of(config).tracking_uri, run.run_id(), keys)
    steps = sorted(history["loss"])
    if len(steps) < warmup_windows + 2:
        raise SystemExit(f"only {len(steps)} logged windows: raise --steps or lower --log-every")
    first, last = steps[warmup_windows], steps[-1]
    seconds = (history["loss"][last].timestamp - history["loss"][first].timestamp) / 1000
    samples = (last - first) * config.train.global_batch_size
    windows = steps[warmup_windows + 1 :]  # each logged at the end of a steady window
    step_time = sum(history["step_time_s"][s].value for s in windows) / len(windows)
    phases = {
        p: sum(
            history[f"time/{p}_fraction"][s].value * history["step_time_s"][s].value
            for s in windows
        )
        / len(windows)
        for p in PHASES
    }
    phases["other"] = step_time - sum(phases.values())  # EMA, stop poll, logging
    # The loop's own figure: samples over its window's timed span, mean over windows.
    loop_rate = len(windows) / sum(1 / history["samples_per_s"][s].value for s in windows)
    return {
        "samples_per_s": samples / seconds,
        "samples_per_s_per_worker": samples / seconds / config.train.num_workers,
        "loop_logged_samples_per_s": loop_rate,
        "steady_steps": last - first,
        "steady_seconds": seconds,
        "step_time_s": step_time,
        "phase_s_per_step": phases,
        "run_id": run.run_id(),
        "wall_s": run.seconds,
    }


def bare_loop(
    config: ExperimentConfig,
    cache: Path,
    threads: int,
    warmup: int,
    steps: int,
    max_seconds: float = 10.0,
) -> dict[str, Any]:
    """Forward, backward, clip, AdamW on in-memory batches, in this process at `threads`:
    `steps` timed steps after `warmup` (fewer once half of `max_seconds` has gone to it), or
    fewer (at least 2) once `max_seconds` have run."""
    import torch
    from diffusers.training_utils import EMAModel

    from data_pipeline.cache import read_empty_prompt, read_manifest
    from data_pipeline.stream import LatentCacheStream
    from models.schedulers import build_noise_scheduler
    from models.unet import build_unet
    from training.objective import diffusion_loss, empty_prompt

    t = config.train
    spec = read_manifest(cache)["spec"]
    stream = iter(LatentCacheStream(cache, 0, 1, t.micro_batch_size, 0, seed=config.run.seed))
    batches = [next(stream) for _ in range(8)]  # read before timing: the loop never waits
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(config.run.seed)
        unet = build_unet(config, latent_channels=spec["latent_channels"])
        unet.train()
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        scheduler = build_noise_scheduler(config)
        empty = empty_prompt(read_empty_prompt(cache), spec["text_max_length"])
        norm = (spec.get("shift_factor", 0.0), spec["scaling_factor"])
        seconds = dict.fromkeys(("forward", "backward", "optimizer"), 0.0)

        def step(i: int, timed: bool) -> None:
            marks = [time.perf_counter()]
            loss, _ = diffusion_loss(
                unet,
                batches[i % len(batches)],
                scheduler,
                norm,
                empty,
                t.caption_dropout,
                config.diffusion.snr_gamma,
            )
            marks.append(time.perf_counter())
            loss.backward()
            marks.append(time.perf_counter())
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            marks.append(time.perf_counter())
            if timed:
                for name, a, b in zip(seconds, marks, marks[1:], strict=False):
                    seconds[name] += b - a

        started = time.perf_counter()
        for i in range(warmup):  # the first steps run slower (allocations, caches)
            step(i, False)
            if time.perf_counter() - started > max_seconds / 2:
                break
        started = time.perf_counter()
        done = 0
        # Bounded in time too: on a busy machine 2 OpenMP threads can run 10-50x slower (each
        # parallel region waits for a descheduled thread), which would blow the time budget.
        while done < steps and (done < 2 or time.perf_counter() - started < max_seconds):
            step(warmup + done, True)
            done += 1
        elapsed = time.perf_counter() - started
        steps = done
        # The training loop also updates an EMA of the weights every step; the bare loop does
        # not (it is not orchestration), so its cost is measured apart to explain the gap.
        ema = EMAModel(unet.parameters(), decay=t.ema_decay)
        ema.step(unet.parameters())
        ema_started = time.perf_counter()
        for _ in range(5):
            ema.step(unet.parameters())
        ema_s = (time.perf_counter() - ema_started) / 5
    finally:
        torch.set_num_threads(previous)
    return {
        "threads": threads,
        "micro_batch_size": t.micro_batch_size,
        "samples_per_s": steps * t.micro_batch_size / elapsed,
        "step_time_s": elapsed / steps,
        "phase_s_per_step": {"data_wait": 0.0, **{k: v / steps for k, v in seconds.items()}},
        "ema_step_s": ema_s,
        "steps": steps,
    }


def merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Bare-loop runs as one: total samples over total time, phases weighted by steps."""
    steps = sum(r["steps"] for r in runs)
    seconds = sum(r["step_time_s"] * r["steps"] for r in runs)
    return {
        "threads": runs[0]["threads"],
        "samples_per_s": steps * runs[0]["micro_batch_size"] / seconds,
        "micro_batch_size": runs[0]["micro_batch_size"],
        "step_time_s": seconds / steps,
        "phase_s_per_step": {
            k: sum(r["phase_s_per_step"][k] * r["steps"] for r in runs) / steps
            for k in runs[0]["phase_s_per_step"]
        },
        "ema_step_s": sum(r["ema_step_s"] for r in runs) / len(runs),
        "steps": steps,
        "runs_samples_per_s": [r["samples_per_s"] for r in runs],
    }


def side_by_side(
    config: ExperimentConfig, cache: Path, threads: int, bare_steps: int
) -> tuple[dict, dict]:
    """The bare loop half before and half after `ldm train`, so a slow patch of a shared
    machine weighs on both sides alike."""
    half = max(1, bare_steps // 2)
    before = bare_loop(config, cache, threads, warmup=4, steps=half)
    system = system_steady(config, launch_train(config))
    after = bare_loop(config, cache, threads, warmup=4, steps=half)
    return system, merged([before, after])


def phase_rows(label: str, system: dict, bare: dict) -> list[tuple[str, str, str, str]]:
    """One row per phase: seconds per step of the system vs the bare loop."""
    rows = []
    for name in (*PHASES, "other"):
        ours = system["phase_s_per_step"][name]
        theirs = bare["phase_s_per_step"].get(name, 0.0)
        note = f" (EMA alone {1000 * bare['ema_step_s']:.1f} ms)" if name == "other" else ""
        rows.append(
            (
                f"  {label} {name} ms/step",
                f"{1000 * ours:.1f}",
                f"{1000 * theirs:.1f}{note}",
                f"{ours / theirs:.2f}" if theirs > 0 else "",
            )
        )
    return rows


def main(
    num_steps: int = 35,
    log_every: int = 5,
    bare_steps: int = 20,
    two_workers: bool = True,
    overrides: list[str] = (),
) -> dict[str, Any]:
    """Run both sides for 1 (and 2) workers, print the table, write the JSON."""
    cache = ensure_cache()
    config1 = train_config("overhead-w1", 1, num_steps, log_every, OUT, overrides)
    threads = worker_threads(config1)
    system1, bare1 = side_by_side(config1, cache, threads, bare_steps)
    print(f"bare loop, {threads} thread(s): {bare1['samples_per_s']:.1f} samples/s", flush=True)
    print(f"ldm train, 1 worker: {system1['samples_per_s']:.1f} samples/s", flush=True)
    result: dict[str, Any] = {
        "micro_batch_size": config1.train.micro_batch_size,
        "zero_stage": config1.train.zero_stage,
        "precision": config1.train.precision,
        "num_steps": num_steps,
        "log_every": log_every,
        "overrides": list(overrides),
        "worker_torch_threads": threads,
        "one_worker": {"system": system1, "bare": bare1},
        "ratio": system1["samples_per_s"] / bare1["samples_per_s"],
    }
    rows = [
        (
            f"train samples/s, 1 worker in process ({threads} threads)",
            f"{system1['samples_per_s']:.1f} ldm train",
            f"{bare1['samples_per_s']:.1f} bare loop",
            f"{result['ratio']:.2f}",
        ),
        (
            "  the loop's own samples_per_s (timed spans)",
            f"{system1['loop_logged_samples_per_s']:.1f}",
            f"{bare1['samples_per_s']:.1f}",
            f"{system1['loop_logged_samples_per_s'] / bare1['samples_per_s']:.2f}",
        ),
        *phase_rows("1w", system1, bare1),
    ]
    if two_workers:
        config2 = train_config("overhead-w2", 2, num_steps, log_every, OUT, overrides)
        per_worker = worker_threads(config2)
        system2, bare2 = side_by_side(config2, cache, 2 * per_worker, bare_steps)
        # The per-worker baseline: one process at one worker's threads.
        bare_one = merged([bare_loop(config2, cache, per_worker, warmup=4, steps=bare_steps)])
        print(f"bare loop, {2 * per_worker} threads: {bare2['samples_per_s']:.1f} samples/s")
        print(f"ldm train, 2 workers: {system2['samples_per_s']:.1f} samples/s", flush=True)
        result["two_workers"] = {"system": system2, "bare": bare2, "bare_one_worker": bare_one}
        result["two_worker_ratio_vs_bare_2_threads"] = (
            system2["samples_per_s"] / bare2["samples_per_s"]
        )
        result["two_worker_per_worker_ratio_vs_bare_1_thread"] = (
            system2["samples_per_s_per_worker"] / bare_one["samples_per_s"]
        )
        rows += [
            (
                f"train samples/s, 2 workers x {per_worker} thread on {os.cpu_count()} cores",
                f"{system2['samples_per_s']:.1f}",
                f"{bare2['samples_per_s']:.1f} bare, {2 * per_worker} threads",
                f"{result['two_worker_ratio_vs_bare_2_threads']:.2f}",
            ),
            (
                "  per worker",
                f"{system2['samples_per_s_per_worker']:.1f}",
                f"{bare_one['samples_per_s']:.1f} bare, {per_worker} thread",
                f"{result['two_worker_per_worker_ratio_vs_bare_1_thread']:.2f}",
            ),
            *phase_rows("2w", system2, bare_one),
        ]
    write_result("overhead", result)
    print(table(rows))
    print(
        f"ldm train: ZeRO-{config1.train.zero_stage}, {config1.train.precision}, micro batch "
        f"{config1.train.micro_batch_size}; steady = MLflow log timestamps after the first "
        f"{log_every}-step window; 2-worker phases are compared with the 1-thread bare loop"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=35, help="training steps per ldm run")
    parser.add_argument("--log-every", type=int, default=5, help="steps per logged window")
    parser.add_argument("--bare-steps", type=int, default=20, help="timed bare-loop steps")
    parser.add_argument("--one-worker", action="store_true", help="skip the 2-worker run")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides for both sides, e.g. train.zero_stage=0"
    )
    args = parser.parse_args()
    main(args.steps, args.log_every, args.bare_steps, not args.one_worker, args.overrides)
