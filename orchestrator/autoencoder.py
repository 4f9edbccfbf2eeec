"""`ldm autoencoder`: stage 1's driver, the paper's first stage.

It checks what it can before any worker starts (the config, the checkpoint it would resume,
the data), reads the raw shards into memory once, and hands the ranks to the stage launcher:
each runs `training.autoencoder_loop.train_rank`, a DeepSpeed rank training the autoencoder
(and the discriminator) on its own random crops; rank 0 evaluates held out and publishes the
model folder where precompute picks it up. With `autoencoder.pretrained` set there is
nothing to train.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from core import storage
from core.config import ExperimentConfig
from core.errors import LdmError
from core.layout import RunLayout
from data_pipeline.image_set import load_images, train_crop
from orchestrator.launcher import Stage, check_local_gpu, launch
from training import checkpoint as ckpt
from training.autoencoder_loop import resume_settings
from training.autoencoder_losses import perceptual_off


def read_resume_state(
    config: ExperimentConfig, layout: RunLayout
) -> tuple[str, ckpt.TrainState] | None:
    """The newest sound committed checkpoint and its state, after checking that this config
    may continue it; None: start fresh. A damaged newest tag is skipped for an older one."""
    place = layout.autoencoder_checkpoints
    tags = ckpt.committed(place)
    for tag in reversed(tags):
        try:
            if storage.is_remote(tag):
                ckpt.pull(tag, place.local / ".pulled" / "driver")
            else:
                ckpt.verify(Path(tag))  # every file against its sha256
            break
        except LdmError as err:
            print(f"autoencoder: not resuming from a damaged checkpoint: {err}", flush=True)
    else:
        if tags:
            raise LdmError(
                f"{place.root}: no committed checkpoint matches its sha256 (damaged files); "
                f"delete {place.root} to train from scratch"
            )
        return None
    if not storage.exists(storage.join(tag, ckpt.TRAIN_STATE)):
        raise LdmError(
            f"{tag}: a checkpoint of an earlier version of stage 1, which this one cannot "
            f"continue; delete {place.root} to train from scratch"
        )
    state = ckpt.TrainState.load(storage.join(tag, ckpt.TRAIN_STATE))
    now = resume_settings(config)
    for key, value in state.settings.items():
        if now.get(key, value) != value:
            raise LdmError(
                f"{key}: {place.root} holds checkpoints of a run with {key}={value!r}, now "
                f"{now[key]!r}; set it back to continue that run, or delete {place.root} to "
                "train from scratch"
            )
    return tag, state


def train_autoencoder(config: ExperimentConfig, progress: bool = True) -> dict[str, float]:
    """Train (or continue training), evaluate and save the stage-1 autoencoder; returns its
    metrics ({} when `autoencoder.pretrained` is set: nothing to train)."""
    ae = config.autoencoder
    if ae.pretrained:
        print(
            f"autoencoder: autoencoder.pretrained is set ({ae.pretrained}); nothing to train, "
            "precompute uses it directly",
            flush=True,
        )
        return {}
    check_local_gpu(config, ae.num_workers, ae.max_failures)
    layout = RunLayout.of(config)
    started_at = time.time()
    crop = train_crop(config)
    resume = read_resume_state(config, layout)  # before the data: a refused resume costs nothing
    began = time.perf_counter()
    train, test, counts = load_images(config)
    load_seconds = time.perf_counter() - began
    print(
        f"autoencoder: {counts['train']} training images, {counts['holdout']} held out, "
        f"{config.data.resolution}px (training on {crop}px crops), f={ae.downsample_factor}, "
        f"{ae.regularization.upper()}, {ae.num_workers} worker(s) at ZeRO-{ae.zero_stage}",
        flush=True,
    )
    if off := perceptual_off(config):
        print(
            f"autoencoder: perceptual loss OFF: autoencoder.perceptual_weight="
            f"{ae.perceptual_weight}, but {off} (LPIPS needs pretrained VGG16 "
            "weights on disk; nothing is downloaded); training without it",
            flush=True,
        )
    if resume is not None:
        tag, state = resume
        print(
            f"autoencoder: resuming from {tag} (step {state.step} of {ae.num_steps})",
            flush=True,
        )
    facts = {
        "train_images": float(counts["train"]),
        "holdout_images": float(counts["holdout"]),
        "undecodable": float(counts["undecodable"]),
        "load_seconds": load_seconds,
        "started_at": started_at,
    }
    tags = {"ldm.world_size": str(ae.num_workers), "ldm.zero_stage": str(ae.zero_stage)}
    if resume is not None:
        tags["ldm.resumed_from"] = str(resume[1].step)
    launch(
        config,
        layout,
        Stage(
            name="autoencoder",
            rank_function="training.autoencoder_loop:train_rank",
            num_workers=ae.num_workers,
            max_failures=ae.max_failures,
            preempt_grace_s=ae.preempt_grace_s,
            checkpoints=layout.autoencoder_checkpoints,
            run_name=f"{config.run.name}-autoencoder",
            tags=tags,
            args={
                "resume_from": resume[0] if resume else None,
                "newest_at_start": ckpt.newest(layout.autoencoder_checkpoints),
                "facts": facts,
                "progress": progress,
            },
            data={"train": train, "test": test},
            resume_run_id=resume[1].mlflow_run_id if resume else None,
        ),
    )
    metrics = json.loads(storage.read_bytes(storage.join(layout.autoencoder_dir, "metrics.json")))
    f = ae.downsample_factor
    print(
        f"autoencoder: held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
        f"rFD {metrics['rfd_efficientnet_lite0']:.2f} (bicubic x{f}: "
        f"{metrics['psnr_bicubic']:.2f} dB, {metrics['ssim_bicubic']:.4f}, "
        f"{metrics['rfd_efficientnet_lite0_bicubic']:.2f}), scaling factor "
        f"{metrics['scaling_factor']:.4f}, {metrics['seconds']:.0f} s; saved to "
        f"{layout.autoencoder_dir}",
        flush=True,
    )
    return metrics
