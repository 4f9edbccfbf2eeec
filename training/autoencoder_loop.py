"""Stage 1's rank code: build -> resume -> loop {step, maybe_log, maybe_checkpoint} ->
finish (rank 0 evaluates and publishes).

Each rank is a DeepSpeed rank with the autoencoder's loss and the discriminator's loss in an
engine each (`autoencoder.zero_stage`), drawing its share of the global batch of random
crops with its own seeded generator. Checkpoints go through the same `Checkpointer` as the
UNet stage's: both engines' DeepSpeed checkpoints (a subfolder each), every rank's RNG
states and the settings a continuing run must share, sealed by a commit marker.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from core import storage
from core.config import ExperimentConfig
from core.layout import RunLayout
from data_pipeline.image_set import random_crops, train_crop
from models.autoencoder import build_autoencoder, fold_vq_shift
from models.discriminator import NLayerDiscriminator
from models.metrics import bicubic_baseline
from training.autoencoder_eval import (
    GRID_IMAGES,
    codebook_usage,
    latent_normalization,
    publish,
    reconstruct,
    reconstruction_metrics,
)
from training.autoencoder_losses import (
    AdversarialStep,
    AutoencoderLoss,
    Critics,
    DiscriminatorLoss,
    lr_factor,
    perceptual_loss,
    perceptual_off,
)
from training.checkpoint import Checkpointer, TrainState
from training.collectives import mean_over_ranks
from training.context import RankContext
from training.engine import autoencoder_deepspeed_config, build_module_engine
from training.preemption import agree_to_stop
from training.rank0 import Rank0, eta, rank0_only
from training.sampling import grid

# A checkpoint tag holds one DeepSpeed checkpoint per engine, in these subfolders.
AUTOENCODER_ENGINE, DISCRIMINATOR_ENGINE = "autoencoder", "discriminator"
# Settings that do not change what is trained: a checkpoint resumes under any value of these.
_NOT_RESUME_RELEVANT = {
    "log_every",
    "checkpoint_every",
    "keep_last",
    "max_failures",
    "preempt_grace_s",
}


def resume_settings(config: ExperimentConfig) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that continues it (`num_workers`
    among them: each rank's crop stream is in the checkpoint)."""
    ae = config.autoencoder.model_dump(mode="json", exclude=_NOT_RESUME_RELEVANT)
    settings = {f"autoencoder.{k}": v for k, v in ae.items()}
    d = config.data
    settings.update(
        {
            "data.shards": d.shards,
            "data.resolution": d.resolution,
            "data.center_crop": d.center_crop,
            "run.seed": config.run.seed,
        }
    )
    return settings


def rank_generator(seed: int, rank: int) -> torch.Generator:
    """Seed this rank's random streams from (seed, rank): torch's global RNG (KL posterior
    samples) and the returned generator of its crops. Ranks draw different crops and noise;
    a rerun draws the same ones."""
    crops, noise = np.random.SeedSequence([seed, rank]).generate_state(2)
    torch.manual_seed(int(noise))
    return torch.Generator().manual_seed(int(crops))


def train_rank(ctx: RankContext) -> dict[str, float]:
    """One rank's whole stage 1: build both engines, resume from the tag in `ctx.args`
    (or a newer one this job wrote), train to `autoencoder.num_steps`, checkpoint; rank 0
    then evaluates and publishes. Stops early, after a checkpoint, on a SIGTERM to the
    launcher or to any rank's process.
    Returns the published metrics on rank 0, {} elsewhere and when stopped early."""
    run = AutoencoderTraining(ctx)
    run.resume()
    while run.step < run.config.autoencoder.num_steps:
        run.train_step()
        stopping = agree_to_stop(run.main)
        run.maybe_log()
        run.maybe_checkpoint(force=stopping)
        if stopping:
            run.main.note(f"autoencoder: stop requested; saved {storage.basename(run.tag)}")
            break
    return run.finish()


class AutoencoderTraining:
    """One rank's built state: both engines, the crop generator, the checkpointer, rank 0's
    side effects, and the logging window."""

    def __init__(self, ctx: RankContext):
        self.config, self.layout, self.report = ctx.config, ctx.layout, ctx.report
        self.args, self.run_id = ctx.args, ctx.run_id
        self.train_images, self.test_images = ctx.data["train"], ctx.data["test"]
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        ae = self.config.autoencoder
        self.crop, self.micro_batch = train_crop(self.config), ae.batch_size // self.world

        # The same seed on every rank gives identical initial weights.
        torch.manual_seed(self.config.run.seed)
        self.vae = build_autoencoder(self.config).train()
        disc = None
        if ae.discriminator_weight > 0:
            disc = NLayerDiscriminator(num_layers=ae.discriminator_layers).train()
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=ae.learning_rate, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(ae.num_steps))
        self.critics = Critics(lpips=None, disc=disc)
        size = sum(p.numel() for p in self.vae.parameters())
        self.engine = build_module_engine(
            AutoencoderLoss(self.config, self.vae, self.critics),
            optimizer,
            autoencoder_deepspeed_config(self.config, self.world, size),
            scheduler,
        )
        self.engines = {AUTOENCODER_ENGINE: self.engine}
        d_engine = None
        if disc is not None:
            # Adam with beta1 = 0.5 and a constant rate, as the paper's code trains it.
            d_optimizer = torch.optim.Adam(
                disc.parameters(),
                lr=ae.discriminator_learning_rate or ae.learning_rate,
                betas=(0.5, 0.9),
            )
            size = sum(p.numel() for p in disc.parameters())
            d_engine = build_module_engine(
                DiscriminatorLoss(disc),
                d_optimizer,
                autoencoder_deepspeed_config(self.config, self.world, size),
            )
            self.engines[DISCRIMINATOR_ENGINE] = d_engine
        self.device = self.engine.device
        self.critics.lpips = perceptual_loss(self.config, self.device)
        self.step_fn = AdversarialStep(self.config, self.engine, d_engine, self.critics)
        self.generator = rank_generator(self.config.run.seed, self.rank)
        self.checkpointer = Checkpointer(
            self.layout.autoencoder_checkpoints, self.config.autoencoder.keep_last
        )
        self.main = AutoencoderRank0(
            self.rank, self.config, self.layout, self.run_id, ctx.args.get("progress", True)
        )
        self.step, self.start_step = 0, 0
        self.last: dict[str, float] = {}
        self.tag: str | None = None

    def resume(self) -> None:
        resume_from = self.checkpointer.restart_point(
            self.args.get("resume_from"), self.args.get("newest_at_start")
        )
        if resume_from is not None:
            tag_dir, state = self.checkpointer.open(resume_from)
            self.checkpointer.load_engines(tag_dir, self.engines)
            self.checkpointer.restore_rng(state, {"crops": self.generator})
            self.step = self.start_step = state.step
            self.last = state.metrics
            if resume_from != self.args.get("resume_from"):  # Ray Train restarted the ranks
                self.main.note(
                    f"autoencoder: restarted from {storage.basename(resume_from)} "
                    f"(step {state.step}) after a worker failure"
                )
        self.main.start(self.critics.lpips is not None, self.step)
        self.sums: dict[str, float] = {}
        self.seen: dict[str, int] = {}
        self.loop_start = self.window_start = time.perf_counter()
        self.window_steps = 0

    def train_step(self) -> None:
        self.step += 1
        x = random_crops(self.train_images, self.micro_batch, self.crop, self.generator)
        for name, value in self.step_fn(x.to(self.device), self.step).items():
            self.sums[name] = self.sums.get(name, 0.0) + value.item()
            self.seen[name] = self.seen.get(name, 0) + 1
        self.window_steps += 1

    def _due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.config.autoencoder.num_steps

    def maybe_log(self) -> None:
        if not self._due(self.config.autoencoder.log_every):
            return
        self.last = mean_over_ranks({k: self.sums[k] / self.seen[k] for k in self.sums})
        now = time.perf_counter()
        self.last["steps_per_second"] = self.window_steps / (now - self.window_start)
        self.last["learning_rate"] = self.engine.get_lr()[0]
        self.main.log(self.last, self.step)
        self.sums, self.seen = {}, {}
        self.window_start, self.window_steps = now, 0

    def maybe_checkpoint(self, force: bool = False) -> None:
        if not (force or self._due(self.config.autoencoder.checkpoint_every)):
            return
        state = TrainState(
            mlflow_run_id=self.run_id,
            config_digest=self.config.digest(),
            settings=resume_settings(self.config),
            metrics=self.last,
        )
        self.tag = self.checkpointer.save(
            self.step, self.engines, state, lambda tag_dir: None, {"crops": self.generator}
        )
        self.report(self.last, self.tag)

    def finish(self) -> dict[str, float]:
        """Rank 0 evaluates and publishes, once every step is done (not after a stop)."""
        ae = self.config.autoencoder
        if self.step < ae.num_steps:
            self.main.close()
            return {}
        train_seconds = time.perf_counter() - self.loop_start
        trained_steps = ae.num_steps - self.start_step
        facts = {
            **self.args.get("facts", {}),
            "steps": float(ae.num_steps),
            "resumed_at_step": float(self.start_step),
            "final_loss": self.last.get("loss", math.nan),
            "train_crop": float(self.crop),
            "world_size": float(self.world),
            "perceptual_loss_enabled": float(self.critics.lpips is not None),
            "mean_steps_per_second": trained_steps / train_seconds if trained_steps else 0.0,
            "train_seconds": train_seconds,
        }
        try:
            metrics = self.main.finish(
                self.vae, self.train_images, self.test_images, self.generator, facts
            )
        finally:
            self.main.close()
        return metrics or {}


class AutoencoderRank0(Rank0):
    """Stage 1's side effects: MLflow, progress lines, and at the end the held-out
    evaluation and the published model."""

    def __init__(
        self,
        rank: int,
        config: ExperimentConfig,
        layout: RunLayout,
        run_id: str | None,
        progress: bool,
    ):
        super().__init__(rank, config, layout, run_id)
        self.run_id, self.progress = run_id, progress

    @rank0_only
    def start(self, perceptual: bool, step: int) -> None:
        started = {"perceptual_loss_enabled": float(perceptual)}
        started["torch_threads_per_worker"] = float(torch.get_num_threads())
        self.tracker.log_metrics(started, step)
        if off := perceptual_off(self.config):
            self.tracker.set_tags({"ldm.perceptual_loss": f"off: {off}"})

    @rank0_only
    def log(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)
        if self.progress:
            total, rate = self.config.autoencoder.num_steps, metrics["steps_per_second"]
            print(
                f"autoencoder: step {step}/{total} loss {metrics['loss']:.4f}, "
                f"{rate:.2f} steps/s, ETA {eta((total - step) / max(rate, 1e-9))}",
                flush=True,
            )

    @rank0_only
    def finish(
        self,
        vae: torch.nn.Module,
        train: np.ndarray,
        test: np.ndarray,
        generator: torch.Generator,
        facts: dict[str, float],
    ) -> dict[str, float]:
        """Evaluate held out, set the latent normalisation, publish the model; its metrics."""
        ae = self.config.autoencoder
        vae.eval()
        recon = reconstruct(vae, test)
        baseline = bicubic_baseline(test, ae.downsample_factor)
        shift, scaling = latent_normalization(vae, train, generator)
        metrics = reconstruction_metrics(test, recon, baseline)
        if ae.regularization == "vq":
            metrics["codebook_usage"] = codebook_usage(vae, test)
            fold_vq_shift(vae, shift)
            vae.register_to_config(scaling_factor=scaling)
        else:
            vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
        metrics.update({"scaling_factor": scaling, "shift_factor": shift, **facts})
        started_at = metrics.pop("started_at", None)  # when the driver started the job
        metrics["seconds"] = time.time() - started_at if started_at else facts["train_seconds"]
        vae.cpu()
        location = self.layout.autoencoder_dir
        # On an object store (every node reads it there) the model is made on this node first.
        remote = storage.is_remote(location)
        target = self.layout.run_dir / "autoencoder" if remote else Path(location)
        # Saved before anything else is logged, so a tracking hiccup cannot cost the training.
        publish(vae, metrics, target)
        # Which MLflow run trained these weights: training runs link back to it.
        (target / "lineage.json").write_text(json.dumps({"mlflow_run_id": self.run_id}))
        if remote:  # config.json last: a reader that finds it finds a whole model
            storage.put_folder(target, location, last="config.json")
        self.tracker.log_metrics(metrics, ae.num_steps)
        shown = min(GRID_IMAGES, len(test))
        # Rows: originals, autoencoder reconstructions, bicubic baseline.
        self.tracker.log_image(
            grid(np.concatenate([test[:shown], recon[:shown], baseline[:shown]]), shown),
            "reconstructions",
            ae.num_steps,
        )
        self.tracker.log_artifact(target / "metrics.json")
        return metrics
