"""What every benchmark shares: the demo data, an encoder to time, and how results are kept.

Benchmarks time real work on the real demo data (Twemoji, 64x64) at demo model sizes, run
the system and its baseline side by side in the same process tree, and write one JSON file
per benchmark to `bench/results/` next to a printed table. Figures are ratios against the
baseline measured in the same run, never absolute timings compared across machines.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench"
RESULTS = ROOT / "bench" / "results"


def demo_shards(num_shards: int) -> Path:
    """The first `num_shards` demo shards (256 images each), fetched and written once."""
    from data_pipeline.emoji import fetch_emoji
    from data_pipeline.shards import write_shards

    images = ROOT / "data" / "emoji"
    cache = Path(os.environ.get("LDM_CACHE_DIR", Path(tempfile.gettempdir()) / "ldm-cache"))
    fetch_emoji(images, npm_cache=cache / "npm")
    every = WORK / "shards-all"
    if not (every / "_summary.json").is_file():
        write_shards(images, every, 256, progress=False)
    subset = WORK / f"shards-{num_shards}"
    subset.mkdir(parents=True, exist_ok=True)
    for shard in sorted(every.glob("*.tar"))[:num_shards]:
        link = subset / shard.name
        if not link.exists():
            link.symlink_to(shard)
    return subset


def decoded_samples(
    shards: str | Path, resolution: int, captions: set[str] | None = None
) -> Iterator[tuple[np.ndarray, str]]:
    """(center-cropped uint8 image, caption) of each decodable sample in a shard folder, in
    order; with `captions`, only of samples with one of them (the rest are not decoded)."""
    from data_pipeline.images import (
        caption_of,
        image_bytes,
        list_shards,
        read_shard,
        resize_crop,
        try_decode,
    )

    for shard in list_shards(str(shards)):
        for sample in read_shard(shard):
            caption = caption_of(sample)
            if captions is not None and caption not in captions:
                continue
            image = try_decode(image_bytes(sample))
            if image is not None:
                yield resize_crop(image, resolution), caption


def bench_config(overrides: list[str] = ()):
    """The demo preset, rooted in the bench folder, with an untrained demo-size autoencoder.

    Encoding cost does not depend on the weights' values, so no training is needed.
    """
    from core.loader import build_config
    from models.autoencoder import build_autoencoder

    config = build_config({"preset": "demo", "run": {"root": str(WORK)}}, overrides)
    folder = WORK / "autoencoder"
    if not (folder / "config.json").is_file():
        import torch

        torch.manual_seed(0)
        build_autoencoder(config).save_pretrained(folder)
    config.autoencoder.pretrained = str(folder)
    return config


def unet_training(config, cache):
    """What one process needs to train the config's UNet on a cache by hand: (unet, AdamW,
    noise scheduler, empty-prompt encoding, latent normalisation, cache spec)."""
    import torch

    from data_pipeline.cache import read_empty_prompt, read_manifest
    from models.schedulers import build_noise_scheduler
    from models.unet import build_unet
    from training.objective import empty_prompt

    spec = read_manifest(cache)["spec"]
    torch.manual_seed(0)
    unet = build_unet(config, latent_channels=spec["latent_channels"])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    empty = empty_prompt(read_empty_prompt(cache), spec["text_max_length"])
    norm = (spec["shift_factor"], spec["scaling_factor"])
    return unet, optimizer, build_noise_scheduler(config), empty, norm, spec


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, **result, "machine": machine()}, indent=2))
    return path


def table(
    rows: list[tuple[str, ...]], header: tuple[str, ...] = ("figure", "system", "baseline", "ratio")
) -> str:
    """Rows (by default: figure, system, baseline, ratio) as aligned text."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
