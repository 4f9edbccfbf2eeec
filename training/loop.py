"""The training loop of one rank: build -> resume -> loop {step, checkpoint, log, sample}.

It runs inside whatever started the process group (Ray Train workers in production, a
plain torch.distributed group in tests) and knows nothing of Ray: the launcher passes a
`report` function that is called after each committed checkpoint.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from data_pipeline import storage
from data_pipeline.cache import EMPTY_PROMPT, CacheBatch, npy_load, read_manifest
from data_pipeline.stream import DataCursor, LatentCacheStream
from orchestrator.config import ExperimentConfig
from training import checkpoint as ckpt
from training.engine import build_engine, full_state_dict, load_engine, save_engine, to_universal
from training.models import build_denoiser, build_noise_scheduler, empty_like, parts, split_by_part
from training.tracking import NullTracker, tracker_for

# Per stored part (`models.parts`: the UNet, and a text encoder trained with it): EMA and raw
# weights, and the architecture's config.
EMA_FILE, RAW_FILE, CONFIG_FILE = "ema_{}.safetensors", "{}.safetensors", "{}_config.json"
UNET_CONFIG = CONFIG_FILE.format("unet")


class Rank0:
    """Side effects that only the first rank performs: logging, sample grids, small files."""

    def __init__(self, config: ExperimentConfig, tracker: NullTracker, device: torch.device):
        from training.sampling import Sampler

        self.config, self.tracker, self.device = config, tracker, device
        self.sampler = Sampler(config, device)
        self.sample_model = None
        self.evaluator = None
        self.flops_per_sample, self.peak_flops = None, None
        self.system = None
        self._stop_polled = -1.0

    def start_monitoring(self, model: torch.nn.Module, spec: dict, step: Callable[[], int]) -> None:
        """Count the model's FLOPs once, find the device peak, start system metrics."""
        from training.flops import peak_flops, train_flops_per_sample
        from training.tracking import SystemMetrics

        size = self.config.data.resolution // self.config.autoencoder.downsample_factor
        self.flops_per_sample = train_flops_per_sample(model, size, spec["text_max_length"])
        device = next(model.parameters()).device
        self.peak_flops = peak_flops(device, self.config.tracking.peak_tflops)
        self.tracker.log_metrics({"model_gflops_per_sample": self.flops_per_sample / 1e9}, 0)
        if self.config.train.eval_every:  # fail at start, not at the first evaluation
            from training.evaluation import Evaluator

            with torch.random.fork_rng(devices=[]):
                self.evaluator = Evaluator(self.config)
        every = self.config.tracking.system_metrics_every_s
        if every > 0:
            self.system = SystemMetrics(self.tracker, every, step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.flops_per_sample and "samples_per_s" in metrics:
            achieved = metrics["samples_per_s"] * self.flops_per_sample
            metrics = {**metrics, "model_tflops_per_s": achieved / 1e12}
            if self.peak_flops:
                world = self.config.train.num_workers
                metrics["mfu"] = achieved / (self.peak_flops * world)
        self.tracker.log_metrics(metrics, step)
        text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        print(f"step {step}: {text}", flush=True)

    def note(self, text: str) -> None:
        print(text, flush=True)

    def stop_requested(self) -> bool:
        # One rank polls the storage, at most once a second (on an object store each look is
        # a request); _any_rank tells the others.
        now = time.monotonic()
        if now - self._stop_polled < 1.0:
            return False
        self._stop_polled = now
        return storage.exists(self.config.stop_file)

    def clear(self, folder: Path) -> None:
        if folder.exists():
            shutil.rmtree(folder)

    def convert_to_universal(self, tag_dir: Path, out: Path) -> None:
        convert_to_universal(tag_dir, out)

    def _ema_model(self, ema: EMAModel, model: torch.nn.Module) -> torch.nn.Module:
        # Building a model draws from torch's RNG; training's noise stream must not notice.
        with torch.random.fork_rng(devices=[]):
            if self.sample_model is None:
                self.sample_model = empty_like(model).to(self.device)
        ema.copy_to(self.sample_model.parameters())
        return self.sample_model

    def sample(self, ema: EMAModel, model: torch.nn.Module, step: int) -> None:
        from training.sampling import prompt_grid

        sample_model = self._ema_model(ema, model)
        with torch.random.fork_rng(devices=[]):
            image = prompt_grid(self.sampler, sample_model, self.config)
        self.tracker.log_image(image, key="samples", step=step)

    def evaluate(self, ema: EMAModel, model: torch.nn.Module, step: int) -> None:
        from training.evaluation import Evaluator

        started = time.perf_counter()
        sample_model = self._ema_model(ema, model)
        with torch.random.fork_rng(devices=[]):
            if self.evaluator is None:
                self.evaluator = Evaluator(self.config)
            scores = self.evaluator.score(self.sampler, sample_model)
        scores["eval/seconds"] = time.perf_counter() - started
        self.log(scores, step)

    def write_tag_files(
        self,
        tag_dir: Path,
        ema: EMAModel,
        model: torch.nn.Module,
        weights: dict[str, torch.Tensor],
        state: ckpt.TrainState,
    ) -> None:
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
        (tag_dir / "config.yaml").write_text(self.config.to_yaml())
        state.save(tag_dir / ckpt.TRAIN_STATE)

    def commit(self, tag_dir: Path) -> None:
        ckpt.commit(tag_dir)
        ckpt.prune(tag_dir.parent, self.config.train.keep_last)

    def commit_remote(self, remote_tag: str, hashes: dict[str, str], staged: Path) -> None:
        ckpt.commit_remote(remote_tag, hashes)
        ckpt.prune_remote(storage.dirname(remote_tag), self.config.train.keep_last)
        shutil.rmtree(staged, ignore_errors=True)

    def close(self) -> None:
        if self.system is not None:
            self.system.close()
        self.tracker.close()


class NullRank0(Rank0):
    def __init__(self):  # noqa: D107 - nothing to build on other ranks
        pass

    def start_monitoring(self, model, spec, step):  # noqa: D102
        pass

    def evaluate(self, ema, model, step):  # noqa: D102
        pass

    def log(self, metrics, step):  # noqa: D102
        pass

    def sample(self, ema, model, step):  # noqa: D102
        pass

    def write_tag_files(self, tag_dir, ema, model, weights, state):  # noqa: D102
        pass

    def commit(self, tag_dir):  # noqa: D102
        pass

    def commit_remote(self, remote_tag, hashes, staged):  # noqa: D102
        pass

    def note(self, text):  # noqa: D102
        pass

    def stop_requested(self):  # noqa: D102
        return False

    def clear(self, folder):  # noqa: D102
        pass

    def convert_to_universal(self, tag_dir, out):  # noqa: D102
        pass

    def close(self):  # noqa: D102
        pass


def draw_latents(batch: CacheBatch) -> torch.Tensor:
    """One latent per sample: a random cached view (image or mirror), then a draw from q(z|x)."""
    b, num_views = batch.moments.shape[:2]
    chosen = batch.moments[torch.arange(b), torch.randint(0, num_views, (b,))]
    if not batch.has_logvar:
        return chosen
    mean, logvar = chosen.chunk(2, dim=1)
    return mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)


def drop_captions(
    batch: CacheBatch, empty: tuple[torch.Tensor, torch.Tensor], probability: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classifier-free guidance training: each caption becomes the empty prompt with
    `probability`. Returns (context, mask, dropped)."""
    dropped = torch.rand(batch.mask.shape[0]) < probability
    spread = dropped.view(-1, *[1] * (batch.context.dim() - 1))
    context = torch.where(spread, empty[0], batch.context)
    mask = torch.where(dropped[:, None], empty[1], batch.mask)
    return context, mask, dropped


def diffusion_loss(
    model: torch.nn.Module,
    batch: CacheBatch,
    scheduler,
    latent_norm: tuple[float, float],
    empty: tuple[torch.Tensor, torch.Tensor],
    caption_dropout: float,
    snr_gamma: float | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDPM objective on a cached batch: a fresh latent draw, noise, and CFG dropout.

    `latent_norm` is the autoencoder's (shift, scale); `snr_gamma` turns on Min-SNR-gamma
    loss weighting (Hang et al., 2023), which stops the many easy low-noise steps from
    dominating the gradient and converges several times faster. Returns the loss and which
    captions were dropped.
    """
    # Every random draw is made on the CPU, with the generator the checkpoint saves, then
    # moved: a run resumes exactly, and draws the same numbers on any device.
    shift, scale = latent_norm
    latents = (draw_latents(batch) - shift) * scale
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
    noisy = scheduler.add_noise(latents, noise, t)
    context, mask, dropped = drop_captions(batch, empty, caption_dropout)
    epsilon = scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else scheduler.get_velocity(latents, noise, t)
    weight = None
    if snr_gamma is not None:
        alpha_bar = scheduler.alphas_cumprod[t]
        snr = alpha_bar / (1 - alpha_bar)
        weight = snr.clamp(max=snr_gamma) / (snr if epsilon else snr + 1)

    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    layout = torch.channels_last if channels_last else torch.contiguous_format
    # Token ids (a text encoder trained inside `model`) stay integers.
    context_dtype = dtype if context.is_floating_point() else None
    pred = model(
        noisy.to(device, dtype, non_blocking=True, memory_format=layout),
        t.to(device, non_blocking=True),
        encoder_hidden_states=context.to(device=device, dtype=context_dtype, non_blocking=True),
        encoder_attention_mask=mask.to(device, non_blocking=True),
    ).sample
    target = target.to(device, non_blocking=True)
    per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
    if weight is not None:
        per_sample = per_sample * weight.to(device, non_blocking=True)
    return per_sample.mean(), dropped


def empty_prompt(cache_dir: str | Path, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached empty-prompt encoding, padded like a batch row: (context, mask)."""
    stored = npy_load(storage.read_bytes(storage.join(cache_dir, EMPTY_PROMPT)))
    token_ids = stored.ndim == 1
    hidden = torch.from_numpy(stored.astype(np.int64 if token_ids else np.float32))
    context = torch.zeros(max_length, *hidden.shape[1:], dtype=hidden.dtype)
    n = min(len(hidden), max_length)
    context[:n] = hidden[:n]
    mask = torch.zeros(max_length, dtype=torch.bool)
    mask[:n] = True
    return context, mask


def load_ema(tag_dir: Path, model: torch.nn.Module) -> list[torch.Tensor]:
    """The EMA weights a tag stores for `model`, in the order of its parameters."""
    shadow: dict[str, torch.Tensor] = {}
    for part in parts(model):
        stored = load_file(tag_dir / EMA_FILE.format(part))
        prefix = "" if len(parts(model)) == 1 else f"{part}."
        shadow.update({prefix + name: tensor for name, tensor in stored.items()})
    return [shadow[name].clone() for name, _ in model.named_parameters()]


def convert_to_universal(tag_dir: Path, out: Path) -> None:
    started = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    to_universal(tag_dir, out)
    seconds = time.perf_counter() - started
    print(f"train: {tag_dir.name} converted for a new world size in {seconds:.1f} s", flush=True)


def train_worker(
    config: ExperimentConfig,
    cache_dir: str,
    mlflow_run_id: str | None,
    resume_from: str | Path | None = None,
    report: Callable[[dict[str, Any], str | None], None] = lambda metrics, tag: None,
) -> dict[str, float]:
    """One rank's whole job, from `resume_from` (a committed tag, local or on an object
    store) or from scratch.

    Stops early, after saving a checkpoint, once `config.stop_file` appears (the launcher
    writes it on SIGTERM). Returns the final metrics.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    t = config.train
    manifest = read_manifest(cache_dir)
    spec = manifest["spec"]

    remote = resume_from is not None and storage.is_remote(resume_from)
    if remote:  # every rank takes its own verified copy: ranks may be on different nodes
        resume_from = ckpt.pull(str(resume_from), config.checkpoint_dir / ".pulled" / f"rank{rank}")
    elif resume_from is not None:
        resume_from = Path(resume_from)

    # Build: the same seed on every rank gives identical initial weights.
    torch.manual_seed(config.run.seed)
    model = build_denoiser(config, latent_channels=spec["latent_channels"])
    saved = ckpt.TrainState.load(resume_from / ckpt.TRAIN_STATE) if resume_from else None
    # A ZeRO-1/2 checkpoint of another world size loads through DeepSpeed's universal format.
    elastic = saved is not None and saved.world_size not in (0, world) and t.zero_stage in (1, 2)
    engine = build_engine(model, config, world, load_universal=elastic)
    ema = EMAModel(model.parameters(), decay=t.ema_decay)
    scheduler = build_noise_scheduler(config)
    empty = empty_prompt(cache_dir, spec["text_max_length"])
    latent_norm = (spec.get("shift_factor", 0.0), spec["scaling_factor"])
    snr_gamma = config.diffusion.snr_gamma
    state = saved or ckpt.TrainState(mlflow_run_id=mlflow_run_id, config_digest=config.digest())
    tracker = tracker_for(
        rank,
        config.tracking_uri,
        state.mlflow_run_id or mlflow_run_id,
        spool=config.run_dir / "mlflow-spool",
        max_pending=config.tracking.max_pending_records,
        flush_timeout_s=config.tracking.flush_timeout_s,
    )
    main = Rank0(config, tracker, engine.device) if rank == 0 else NullRank0()

    # Resume.
    if resume_from is not None:
        started = time.perf_counter()
        ckpt.verify(resume_from)  # before DeepSpeed unpickles anything
        if elastic and remote:  # no shared folder: each rank converts its own copy
            universal = config.checkpoint_dir / ".universal" / f"rank{rank}" / resume_from.name
            convert_to_universal(resume_from, universal)
            load_engine(engine, universal.parent, universal.name)
            shutil.rmtree(universal.parent, ignore_errors=True)
        elif elastic:
            universal = config.checkpoint_dir / ".universal" / resume_from.name
            main.convert_to_universal(resume_from, universal)
            dist.barrier()
            load_engine(engine, universal.parent, universal.name)
            dist.barrier()
            main.clear(universal.parent)
        else:
            load_engine(engine, resume_from.parent, resume_from.name)
        ema.shadow_params = load_ema(resume_from, model)
        ema.optimization_step = state.step
        main.note(
            f"train: resuming from {resume_from} (step {state.step}), "
            f"loaded in {time.perf_counter() - started:.2f} s"
        )

    stream = LatentCacheStream(
        cache_dir,
        rank,
        world,
        t.micro_batch_size,
        t.num_loader_workers,
        config.run.seed,
        cursor=DataCursor.from_dict(state.data_cursor),
    )
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=t.num_loader_workers,
        persistent_workers=t.num_loader_workers > 0,
    )
    batches = iter(loader)  # draws a worker seed from torch's RNG: set the RNG only after it
    if str(rank) in state.rng:
        ckpt.set_rng_state(state.rng[str(rank)])
    else:  # per-rank noise streams; also a rank that an elastic restart added
        torch.manual_seed(config.run.seed * 1000 + rank + 1 + state.step)
    batches_taken = 0  # by this rank since the stream's start cursor
    accumulation = config.gradient_accumulation_steps
    window = Window()
    metrics: dict[str, float] = {}
    main.start_monitoring(model, spec, lambda: state.step)

    while state.step < t.num_steps:
        engine.train()
        losses = []
        for _ in range(accumulation):
            with window.phase("data_wait"):
                batch = next(batches)
            with window.phase("forward"):
                loss, dropped = diffusion_loss(
                    engine,
                    batch,
                    scheduler,
                    latent_norm,
                    empty,
                    t.caption_dropout,
                    snr_gamma,
                    t.channels_last,
                )
            with window.phase("backward"):  # includes ZeRO's gradient reduction
                engine.backward(loss)
            with window.phase("optimizer"):
                engine.step()
            losses.append(loss.detach())
            window.dropped += int(dropped.sum())
            window.samples += len(dropped)
        ema.step(model.parameters())
        state.step += 1
        window.steps += 1
        batches_taken += accumulation
        state.samples_seen += t.global_batch_size
        final = state.step == t.num_steps
        stopping = _any_rank(main.stop_requested())

        if state.step % t.log_every == 0 or final:
            metrics = window.metrics(torch.stack(losses).mean(), engine, state.samples_seen)
            main.log(metrics, state.step)
            window = Window()

        if state.step % t.checkpoint_every == 0 or final or stopping:
            with window.phase("checkpoint"):
                state.data_cursor = stream.cursor_after(batches_taken).to_dict()
                tag_dir = save_checkpoint(engine, ema, model, state, config, main)
                report(metrics, tag_dir)

        if stopping:
            main.note(f"train: stop requested; saved {storage.basename(tag_dir)}, stopping")
            break
        with window.phase("sample_eval"):
            if state.step % t.sample_every == 0 or final:
                main.sample(ema, model, state.step)
            if t.eval_every and (state.step % t.eval_every == 0 or final):
                main.evaluate(ema, model, state.step)

    main.close()
    return metrics


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
        import psutil

        elapsed = time.perf_counter() - self.start
        training = elapsed - self.seconds["checkpoint"] - self.seconds["sample_eval"]
        world = dist.get_world_size()
        local = [loss.float(), self.dropped, self.samples, self.samples / training]
        totals = torch.tensor([float(v) for v in local], device=_comm_device())
        dist.all_reduce(totals)
        rss = torch.tensor([psutil.Process().memory_info().rss / 2**30], device=_comm_device())
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


def _comm_device() -> torch.device:
    """Where tensors for collectives must be: NCCL (GPU workers) reduces only CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any: ranks must agree before a collective save."""
    value = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def save_checkpoint(
    engine, ema, model, state: ckpt.TrainState, config: ExperimentConfig, main: Rank0
) -> str:
    """All ranks write, then rank 0 commits the tag after a barrier; returns where it is.

    On an object store, ranks write into local staging, upload their own files, and rank 0
    uploads the commit marker with every rank's hashes once all uploads have finished.
    """
    started = time.perf_counter()
    tag = ckpt.tag_for(state.step)
    tag_dir = config.checkpoint_dir / tag
    remote = config.remote_checkpoints
    if remote is not None:  # staging is per node: each rank clears what a crash left there
        shutil.rmtree(tag_dir, ignore_errors=True)
    else:
        main.clear(tag_dir)  # what a crash left half-written, or a tag of an abandoned branch
    dist.barrier()
    # Every rank contributes its RNG state; rank 0 writes them into the one train state.
    rngs: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(rngs, ckpt.rng_state())
    state.rng = {str(r): s for r, s in enumerate(rngs)}
    state.world_size = dist.get_world_size()
    save_engine(engine, config.checkpoint_dir, tag)
    weights = full_state_dict(engine)  # a collective under ZeRO-3: every rank takes part
    main.write_tag_files(tag_dir, ema, model, weights, state)
    dist.barrier()  # every rank's files are on disk before the tag is sealed
    if remote is not None:
        remote_tag = storage.join(remote, tag)
        gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, ckpt.push(tag_dir, remote_tag, dist.get_rank()))
        main.commit_remote(remote_tag, {k: v for h in gathered for k, v in h.items()}, tag_dir)
    else:
        main.commit(tag_dir)
    dist.barrier()
    main.log({"checkpoint_save_s": time.perf_counter() - started}, state.step)
    return storage.join(remote, tag) if remote is not None else str(tag_dir)
