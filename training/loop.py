"""The UNet stage's rank code: build -> resume -> loop {step, maybe_log, maybe_checkpoint,
maybe_sample, maybe_eval} -> finish.

It runs inside whatever started the process group (Ray Train workers, or one rank in the
launcher's own process; a plain torch.distributed group in tests) and knows nothing of Ray:
everything it needs arrives in a `RankContext`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from core import storage
from core.config import ExperimentConfig
from core.layout import RunLayout
from data_pipeline.cache import read_empty_prompt, read_manifest, spec_digest
from data_pipeline.stream import DataCursor, LatentCacheStream
from models.flops import peak_flops, train_flops_per_sample
from models.schedulers import build_noise_scheduler
from models.unet import build_denoiser, empty_like, parts, split_by_part
from training.checkpoint import (
    AT_ROOT,
    CONFIG_FILE,
    CONFIG_YAML,
    EMA_FILE,
    RAW_FILE,
    Checkpointer,
    TrainState,
)
from training.collectives import comm_device
from training.context import RankContext
from training.engine import build_engine, compiled_graphs, full_parameters, full_state_dict
from training.evaluation import Evaluator
from training.init_from import load_source, staged, start_ema
from training.objective import diffusion_loss, empty_prompt
from training.preemption import agree_to_stop
from training.rank0 import Rank0, eta, rank0_only
from training.sampling import Sampler, prompt_grid
from training.tracking import SystemMetrics


def train_rank(ctx: RankContext) -> dict[str, float]:
    """One rank's whole UNet stage, from a committed tag or from scratch, to
    `train.num_steps`. Stops early, after a checkpoint, on a SIGTERM to the launcher or to any
    rank's process (see `training.preemption`).
    Returns the last logged metrics."""
    run = UNetTraining(ctx)
    try:
        run.resume()
        while run.state.step < run.config.train.num_steps:
            run.step()
            stopping = agree_to_stop(run.main)
            run.maybe_log()
            # Before the checkpoint: a tag at a sample step has its grid logged, so a crash
            # right after the save loses none. A stopping job saves first and owes them.
            run.maybe_sample(skip=stopping)
            run.maybe_eval(skip=stopping)
            run.maybe_checkpoint(force=stopping)
            if stopping:
                run.main.note(f"train: stop requested; saved {storage.basename(run.tag)}")
                break
        return run.finish()
    finally:
        run.close_loader()


class UNetTraining:
    """One rank's built state: the model in its engine, EMA, data stream, checkpointer, and
    rank 0's side effects."""

    def __init__(self, ctx: RankContext):
        self.config, self.layout, self.report = ctx.config, ctx.layout, ctx.report
        t = self.config.train
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cache_dir = ctx.args["cache_dir"]
        spec = read_manifest(self.cache_dir)["spec"]
        self.checkpointer = Checkpointer(self.layout.checkpoints, t.keep_last)
        self.resume_from = self.checkpointer.restart_point(
            ctx.args.get("resume_from"), ctx.args.get("newest_at_start")
        )
        self.tag_dir, saved = (
            self.checkpointer.open(self.resume_from) if self.resume_from else (None, None)
        )
        # The same seed on every rank gives identical initial weights, made on the rank's
        # device: an SD-size UNet initialises in seconds on a GPU, in minutes on its host CPU.
        torch.manual_seed(self.config.run.seed)
        with torch.device(comm_device()):
            self.model = build_denoiser(self.config, latent_channels=spec["latent_channels"])
        # A new run from another model's weights (`train.init_from`, which the driver checked
        # and passes only to a run without a tag of its own): loaded before the engine is
        # built, since ZeRO-3 partitions what the module holds then.
        init_from = ctx.args.get("init_from") if self.tag_dir is None else None
        staging = Path(self.layout.run_dir) / "staging"
        init = load_source(staged(init_from, staging), self.model) if init_from else None
        # A ZeRO-1/2 checkpoint of another world size loads through DeepSpeed's universal
        # format (ZeRO-3 ones are refused by the driver; ZeRO-0 ones load as they are).
        self.elastic = (
            saved is not None and saved.world_size not in (0, self.world) and t.zero_stage in (1, 2)
        )
        self.engine = build_engine(self.model, self.config, self.world, self.elastic)
        with full_parameters(self.engine):  # ZeRO-3: the whole weights, not this rank's part
            self.ema = EMAModel(self.model.parameters(), decay=t.ema_decay)
        if init is not None:
            start_ema(self.ema, self.model, init)
        self.scheduler = build_noise_scheduler(self.config)
        self.empty = empty_prompt(read_empty_prompt(self.cache_dir), spec["text_max_length"])
        self.latent_norm = (spec.get("shift_factor", 0.0), spec["scaling_factor"])
        self.state = saved or TrainState(config_digest=self.config.digest())
        # What the driver compares when a later job continues this checkpoint.
        self.state.settings["cache_spec_digest"] = spec_digest(spec)
        self.state.mlflow_run_id = ctx.run_id or self.state.mlflow_run_id
        self.main = UNetRank0(
            self.rank, self.config, self.layout, self.state.mlflow_run_id, self.engine.device
        )
        self.spec = spec
        self.window = Window()
        self.metrics: dict[str, float] = {}
        self.losses: list[torch.Tensor] = []
        self.tag: str | None = None
        self.batches: Iterator | None = None  # the loader's iterator, made in `resume`

    def resume(self) -> None:
        """Engine, EMA and RNG states of the tag to resume from; then the data stream at the
        tag's cursor."""
        t, state = self.config.train, self.state
        if self.tag_dir is not None:
            started = time.perf_counter()
            self.checkpointer.load_engines(self.tag_dir, {AT_ROOT: self.engine}, self.elastic)
            self.ema.shadow_params = load_ema(self.tag_dir, self.model)
            self.ema.optimization_step = state.step
            self.main.note(
                f"train: resuming from {self.resume_from} (step {state.step}), "
                f"loaded in {time.perf_counter() - started:.2f} s"
            )
        self.stream = LatentCacheStream(
            self.cache_dir,
            self.rank,
            self.world,
            t.micro_batch_size,
            t.num_loader_workers,
            self.config.run.seed,
            cursor=DataCursor.from_dict(state.data_cursor),
        )
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,
            num_workers=t.num_loader_workers,
            persistent_workers=t.num_loader_workers > 0,
        )
        self.batches = iter(loader)  # draws a worker seed from torch's RNG: set it only after
        if not self.checkpointer.restore_rng(state, None):
            # Per-rank noise streams; also a rank that an elastic restart added.
            torch.manual_seed(self.config.run.seed * 1000 + self.rank + 1 + state.step)
        self.batches_taken = 0  # by this rank since the stream's start cursor
        self.accumulation = t.gradient_accumulation_steps(self.world)
        self.main.start_monitoring(self.model, self.spec, lambda: self.state.step)
        self.pay_owed()

    def step(self) -> None:
        """One optimizer step: `accumulation` micro-batches, then the EMA."""
        t, window, engine = self.config.train, self.window, self.engine
        engine.train()
        self.losses = []
        for _ in range(self.accumulation):
            with window.phase("data_wait"):
                batch = next(self.batches)
            with window.phase("forward"):
                loss, dropped = diffusion_loss(
                    engine,
                    batch,
                    self.scheduler,
                    self.latent_norm,
                    self.empty,
                    t.caption_dropout,
                    self.config.diffusion.snr_gamma,
                    t.channels_last,
                )
            with window.phase("backward"):  # includes ZeRO's gradient reduction
                engine.backward(loss)
            with window.phase("optimizer"):
                engine.step()
            self.losses.append(loss.detach())
            window.dropped += int(dropped.sum())
            window.samples += len(dropped)
        with full_parameters(engine):
            self.ema.step(self.model.parameters())
        self.state.step += 1
        window.steps += 1
        self.batches_taken += self.accumulation
        self.state.samples_seen += t.global_batch_size

    def _due(self, every: int) -> bool:
        return self.state.step % every == 0 or self.state.step == self.config.train.num_steps

    def maybe_log(self) -> None:
        if self._due(self.config.train.log_every):
            loss = torch.stack(self.losses).mean()
            self.metrics = self.window.metrics(loss, self.engine, self.state.samples_seen)
            if self.config.train.compile != "off":
                self.metrics["compiled_graphs"] = compiled_graphs()
            self.main.log(self.metrics, self.state.step)
            self.window = Window()

    def maybe_checkpoint(self, force: bool = False) -> None:
        """Collective: all ranks save, then rank 0 commits; the launcher hears of the tag."""
        if not (force or self._due(self.config.train.checkpoint_every)):
            return
        with self.window.phase("checkpoint"):
            started = time.perf_counter()
            self.state.data_cursor = self.stream.cursor_after(self.batches_taken).to_dict()
            self.state.metrics = self.metrics
            weights = full_state_dict(self.engine)  # a collective under ZeRO-3
            self.tag = self.checkpointer.save(
                self.state.step,
                {AT_ROOT: self.engine},
                self.state,
                lambda tag_dir: self.main.write_tag_files(tag_dir, self.ema, self.model, weights),
            )
            self.main.log({"checkpoint_save_s": time.perf_counter() - started}, self.state.step)
            self.report(self.metrics, self.tag)

    def maybe_sample(self, skip: bool = False) -> None:
        if self._due(self.config.train.sample_every):
            if skip:
                self.state.owed.append("sample")
                return
            with self.window.phase("sample_eval"):
                self.main.sample(self.ema, self.model, self.state.step)

    def maybe_eval(self, skip: bool = False) -> None:
        every = self.config.train.eval_every
        if every and self._due(every):
            if skip:
                self.state.owed.append("eval")
                return
            with self.window.phase("sample_eval"):
                self.main.evaluate(self.ema, self.model, self.state.step)

    def pay_owed(self) -> None:
        """The sample grid and evaluation a stopped job skipped at the tag's step: the EMA
        weights are the tag's, so they come out as they would have then."""
        owed, self.state.owed = self.state.owed, []
        if "sample" in owed:
            self.main.sample(self.ema, self.model, self.state.step)
        if "eval" in owed:
            self.main.evaluate(self.ema, self.model, self.state.step)

    def finish(self) -> dict[str, float]:
        self.main.close()
        return self.metrics

    def close_loader(self) -> None:
        """Stop the loader's worker processes now. Left to garbage collection, a finished
        iterator's workers are joined whenever it is collected (in a later run in the same
        process: one rank in the launcher's process), and that join waited out its 5 s
        timeout every time."""
        shutdown = getattr(self.batches, "_shutdown_workers", None)  # no public close
        if shutdown is not None:
            shutdown()


class UNetRank0(Rank0):
    """The UNet stage's side effects: metrics (with MFU), sample grids, the FID-style
    evaluation, and the files a tag holds besides the engine's."""

    def __init__(
        self,
        rank: int,
        config: ExperimentConfig,
        layout: RunLayout,
        run_id: str | None,
        device: torch.device,
    ):
        super().__init__(rank, config, layout, run_id)
        self.device = device
        # Built before the noise stream is seeded: loading the encoders may draw from it.
        self.sampler = Sampler(config, layout.autoencoder_dir, device) if rank == 0 else None
        self.sample_model: torch.nn.Module | None = None
        self.evaluator: Evaluator | None = None
        self.flops_per_sample: float | None = None
        self.peak_flops: float | None = None
        self.system: SystemMetrics | None = None

    @rank0_only
    def start_monitoring(self, model: torch.nn.Module, spec: dict, step) -> None:
        """Count the model's FLOPs once, find the device peak, start system metrics; build
        the evaluator now, so that missing held-out data fails at the start."""
        device = next(model.parameters()).device
        size = self.config.data.resolution // self.config.autoencoder.downsample_factor
        self.flops_per_sample = train_flops_per_sample(model, size, spec["text_max_length"])
        self.peak_flops = peak_flops(device, self.config.tracking.peak_tflops)
        self.tracker.log_metrics({"model_gflops_per_sample": self.flops_per_sample / 1e9}, 0)
        if self.config.train.eval_every:
            with torch.random.fork_rng(devices=[]):
                self.evaluator = Evaluator(self.config)
        every = self.config.tracking.system_metrics_every_s
        if every > 0:
            self.system = SystemMetrics(self.tracker, every, step)

    @rank0_only
    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.flops_per_sample and "samples_per_s" in metrics:
            achieved = metrics["samples_per_s"] * self.flops_per_sample
            metrics = {**metrics, "model_tflops_per_s": achieved / 1e12}
            if self.peak_flops:
                world = self.config.train.num_workers
                metrics["mfu"] = achieved / (self.peak_flops * world)
        self.tracker.log_metrics(metrics, step)
        # The console gets progress and evaluation; every metric is in MLflow.
        total = self.config.train.num_steps
        if "loss" in metrics:
            left = eta(metrics["step_time_s"] * (total - step))
            print(
                f"train: step {step}/{total} loss {metrics['loss']:.4f}, "
                f"{metrics['samples_per_s']:.1f} samples/s, ETA {left}",
                flush=True,
            )
        scores = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if scores:
            text = " ".join(f"{k}={v:.4g}" for k, v in scores.items())
            print(f"train: step {step}: {text}", flush=True)

    def _ema_model(self, ema: EMAModel, model: torch.nn.Module) -> torch.nn.Module:
        # Building a model draws from torch's RNG; training's noise stream must not notice.
        with torch.random.fork_rng(devices=[]):
            if self.sample_model is None:
                self.sample_model = empty_like(model).to(self.device)
        ema.copy_to(self.sample_model.parameters())
        return self.sample_model

    @rank0_only
    def sample(self, ema: EMAModel, model: torch.nn.Module, step: int) -> None:
        sample_model = self._ema_model(ema, model)
        with torch.random.fork_rng(devices=[]):
            image = prompt_grid(self.sampler, sample_model, self.config)
        self.tracker.log_image(image, key="samples", step=step)

    @rank0_only
    def evaluate(self, ema: EMAModel, model: torch.nn.Module, step: int) -> None:
        started = time.perf_counter()
        sample_model = self._ema_model(ema, model)
        with torch.random.fork_rng(devices=[]):
            if self.evaluator is None:
                self.evaluator = Evaluator(self.config)
            scores = self.evaluator.score(self.sampler, sample_model)
        scores["eval/seconds"] = time.perf_counter() - started
        self.log(scores, step)

    @rank0_only
    def write_tag_files(
        self,
        tag_dir: Path,
        ema: EMAModel,
        model: torch.nn.Module,
        weights: dict[str, torch.Tensor],
    ) -> None:
        """EMA and raw weights per model part, each part's architecture, the config."""
        names = [name for name, _ in model.named_parameters()]
        shadow = dict(zip(names, ema.shadow_params, strict=True))
        split_ema, split_raw = split_by_part(model, shadow), split_by_part(model, weights)
        for part, module in parts(model).items():
            ema_part = {n: p.detach().contiguous() for n, p in split_ema[part].items()}
            save_file(ema_part, tag_dir / EMA_FILE.format(part))
            raw = {n: w.contiguous() for n, w in split_raw[part].items()}
            save_file(raw, tag_dir / RAW_FILE.format(part))
            # diffusers models write their own config; transformers models keep it in .config
            write_config = getattr(module, "to_json_file", None) or module.config.to_json_file
            write_config(str(tag_dir / CONFIG_FILE.format(part)))
        (tag_dir / CONFIG_YAML).write_text(self.config.to_yaml())

    @rank0_only
    def close(self) -> None:
        if self.system is not None:
            self.system.close()
        self.tracker.close()


def load_ema(tag_dir: Path, model: torch.nn.Module) -> list[torch.Tensor]:
    """The EMA weights a tag stores for `model`, in the order of its parameters."""
    shadow: dict[str, torch.Tensor] = {}
    for part in parts(model):
        stored = load_file(tag_dir / EMA_FILE.format(part))
        prefix = "" if len(parts(model)) == 1 else f"{part}."
        shadow.update({prefix + name: tensor for name, tensor in stored.items()})
    # On the parameters' device: a GPU rank's EMA step adds the two.
    return [shadow[name].to(param.device, copy=True) for name, param in model.named_parameters()]


class Window:
    """What this rank did in one logging interval, turned into metrics at its end."""

    # Checkpoints, sample grids and evaluation pause training: their time is shown as
    # fractions but left out of the throughput figures.
    PHASES = ("data_wait", "forward", "backward", "optimizer", "checkpoint", "sample_eval")

    def __init__(self):
        self.start = time.perf_counter()
        self.samples, self.dropped, self.steps = 0, 0, 0
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        yield
        if torch.cuda.is_available():  # kernels run asynchronously: time them, not launches
            torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - started

    def metrics(self, loss: torch.Tensor, engine, samples_seen: int) -> dict[str, float]:
        """Collective: every rank calls it at the same step (one all-reduce for all sums)."""
        elapsed = time.perf_counter() - self.start
        training = elapsed - self.seconds["checkpoint"] - self.seconds["sample_eval"]
        world = dist.get_world_size()
        local = [loss.float(), self.dropped, self.samples, self.samples / training]
        totals = torch.tensor([float(v) for v in local], device=comm_device())
        dist.all_reduce(totals)
        rss = torch.tensor([psutil.Process().memory_info().rss / 2**30], device=comm_device())
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
        metrics = {
            "loss": totals[0].item() / world,
            "caption_dropout_rate": totals[1].item() / max(1.0, totals[2].item()),
            "lr": engine.get_lr()[0],
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "samples_per_s": totals[2].item() / training,
            "samples_per_s_per_worker": totals[3].item() / world,
            "step_time_s": training / max(1, self.steps),
            "samples_seen": samples_seen,
            "memory/rss_gib_max_rank": rss.item(),
        }
        for name, seconds in self.seconds.items():
            metrics[f"time/{name}_fraction"] = seconds / elapsed
        if torch.cuda.is_available():
            metrics["memory/device_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return metrics
