"""`ldm demo`: every stage, in order, on the real emoji data — what `make demo` runs.

Each stage is skipped when its output is already complete, so re-running is cheap and an
interrupted demo continues where it stopped. Stage timings are printed and written to
`<run>/timings.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from core import storage
from core.config import ExperimentConfig
from core.layout import RunLayout
from core.loader import load_config
from data_pipeline.emoji import fetch_emoji
from data_pipeline.shards import write_shards
from orchestrator.autoencoder import train_autoencoder
from orchestrator.precompute import precompute
from orchestrator.sample import sample_from_checkpoint
from orchestrator.train import train
from training import checkpoint as ckpt
from training.sampling import grid


def _stage(name: str, timings: dict[str, float]):
    class _Timer:
        def __enter__(self):
            print(f"\n=== {name} ===", flush=True)
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.start, 1)
            print(f"=== {name}: {timings[name]} s ===", flush=True)

    return _Timer()


def run_demo(config_path: Path, overrides: list[str] = ()) -> dict[str, float]:
    """Fetch the emoji data, then shards -> autoencoder -> precompute -> train -> sample."""
    config: ExperimentConfig = load_config(config_path, overrides)
    layout = RunLayout.of(config)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    shards = Path(config.data.shards)
    images = shards.parent / "emoji"

    with _stage("fetch demo data", timings):
        cache = Path(os.environ.get("LDM_CACHE_DIR", Path(tempfile.gettempdir()) / "ldm-cache"))
        fetch_emoji(images, npm_cache=cache / "npm")
    with _stage("shards", timings):
        if (shards / "_summary.json").is_file():
            print(f"shards: already written at {shards}")
        else:
            summary = write_shards(images, shards, config.data.samples_per_shard)
            print(f"shards: {summary.num_samples} samples in {summary.num_shards} shards")
    with _stage("autoencoder", timings):
        if storage.exists(storage.join(layout.autoencoder_dir, "config.json")):
            print(f"autoencoder: already trained at {layout.autoencoder_dir}")
        else:
            train_autoencoder(config)
    with _stage("precompute", timings):
        precompute(config)
    with _stage("train", timings):
        latest = ckpt.newest(layout.checkpoints)
        done = (
            latest is not None
            and ckpt.TrainState.load(storage.join(latest, ckpt.TRAIN_STATE)).step
            >= config.train.num_steps
        )
        if done:
            print(f"train: already at step {config.train.num_steps} ({latest})")
        else:
            train(config)
    with _stage("sample", timings):
        tag = ckpt.local_tag(ckpt.newest(layout.checkpoints), layout.checkpoints)
        out = layout.run_dir / "samples"
        s = config.sample
        paths = sample_from_checkpoint(
            tag,
            s.prompts,
            out,
            s.images_per_prompt,
            s.seed,
            s.num_inference_steps,
            s.guidance_scale,
        )
        rows = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
        Image.fromarray(grid(rows, s.images_per_prompt)).save(out / "grid.png")
        print(
            f"sample: {len(paths)} images and grid.png in {out} (one row per prompt: {s.prompts})"
        )
    timings["total"] = round(time.perf_counter() - started, 1)
    (layout.run_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    print("\nDemo finished. Stage timings (s):")
    for name, seconds in timings.items():
        print(f"  {name:18s} {seconds:8.1f}")
    print(f"MLflow: `ldm ui` (store {layout.tracking_uri}); samples: {layout.run_dir / 'samples'}")
    return timings
