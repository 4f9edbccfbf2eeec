"""Cache speed-up: a training step fed by the latent cache vs one that encodes online.

Both variants train the same demo UNet with the same AdamW on the same micro-batch of demo
images (Twemoji, 64x64) with the same diffusion loss (`training.objective.diffusion_loss`):

- cached: the batch as the training loop gets it from the latent cache, a `CacheBatch` of
  posterior moments and the text encoder's hidden states, built here from these images with
  the cache's own storage dtype and `collate` (what `ldm precompute` writes and the stream
  reads, minus the tar round trip);
- online: every step tokenizes the captions, runs the demo autoencoder's encoder (untrained:
  encoding cost does not depend on the weights' values) and the MiniLM text encoder under
  no_grad, then the same UNet step.

The measured speed-up (online step time / cached step time) is reported next to the ideal
one, (t_encode + t_unet) / t_unet, from timing the encoders alone and the UNet step alone
(forward, loss, backward, AdamW on ready latents) in the same run. Single process, one
torch thread count for every variant; the variants take turns, one step each, so that load
from elsewhere on the machine hits them alike, and the median step time is reported. On a
loaded machine fewer cycles run (at least 3), so the whole run stays within ~3 minutes.

    python -m bench.cache_speedup [--cycles 12] [--budget 90]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.common import Timer, bench_config, decoded_samples, demo_shards, table, write_result


def demo_batch(resolution: int, size: int) -> tuple[np.ndarray, list[str]]:
    """The first `size` images of the first demo shard, decoded and cropped (uint8 NHWC),
    with their captions: what the precompute decoder hands to the encoders."""
    first = itertools.islice(decoded_samples(demo_shards(1), resolution), size)
    pixels, captions = zip(*first, strict=True)
    return np.stack(pixels), list(captions)


class Encoders:
    """The frozen autoencoder and text encoder, run the way `ldm precompute` runs them."""

    def __init__(self, config):
        from core.layout import RunLayout
        from models.autoencoder import load_autoencoder
        from models.text_encoders import load_text_encoder

        self.vae = load_autoencoder(RunLayout.of(config).autoencoder_dir)
        self.text_encoder, self.tokenizer = load_text_encoder(config.text_encoder.name_or_path)
        self.max_length = config.text_encoder.max_length

    @torch.no_grad()  # not inference_mode: the UNet's autograd must accept these tensors
    def __call__(self, pixels: np.ndarray, captions: list[str]):
        """(moments (B, 1, 2C, h, w), hidden states zeroed beyond each caption, mask)."""
        from data_pipeline.cache import CacheBatch
        from data_pipeline.images import to_model_range

        tokens = self.tokenizer(
            captions,
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        posterior = self.vae.encode(to_model_range(pixels)).latent_dist
        moments = torch.cat([posterior.mean, posterior.logvar], dim=1)[:, None]
        hidden = self.text_encoder(**tokens).last_hidden_state
        mask = tokens["attention_mask"].bool()
        return CacheBatch(moments, hidden * mask[..., None], mask)


def as_cached(batch, dtype: str, max_length: int):
    """The same batch after a trip through the cache: stored dtype, real tokens only,
    collated by the function the latent-cache stream uses."""
    from data_pipeline.cache import collate

    store = np.float16 if dtype == "float16" else np.float32
    samples = [
        ([m[0].numpy().astype(store)], c[k].numpy().astype(store))
        for m, c, k in zip(batch.moments, batch.context, batch.mask, strict=True)
    ]
    return collate(samples, max_length)


def median_step_s(
    steps: dict[str, Callable[[], None]], cycles: int, warmup: int, budget_s: float
) -> tuple[dict[str, float], int]:
    """Median seconds per call of each function, and the cycles run. The functions take
    turns one call at a time, so a burst of load from elsewhere on the machine hits all of
    them alike; past `budget_s` no new cycle starts (at least 3 run)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    started = time.perf_counter()
    done = 0
    while done < cycles and (done < 3 or time.perf_counter() - started < budget_s):
        for name, step in steps.items():
            begin = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - begin)
        done += 1
    return {name: statistics.median(t) for name, t in times.items()}, done


def main(cycles: int = 12, warmup: int = 2, budget_s: float = 90.0) -> dict[str, Any]:
    from core.layout import RunLayout
    from data_pipeline.precompute import cache_spec
    from models.schedulers import build_noise_scheduler
    from models.unet import build_unet
    from training.objective import diffusion_loss

    config = bench_config()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)  # every variant runs on these, nothing in parallel
    spec = cache_spec(config, RunLayout.of(config).autoencoder_dir)
    mb = config.train.micro_batch_size
    pixels, captions = demo_batch(config.data.resolution, mb)

    with Timer() as load:
        encoders = Encoders(config)
    torch.manual_seed(0)
    unet = build_unet(config, latent_channels=spec["latent_channels"]).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.train.learning_rate)
    scheduler = build_noise_scheduler(config)
    norm = (spec["shift_factor"], spec["scaling_factor"])
    max_length = spec["text_max_length"]
    empty_batch = encoders(pixels[:1], [""])  # what the cache stores as the empty prompt
    empty = (empty_batch.context[0], empty_batch.mask[0])
    cached = as_cached(encoders(pixels, captions), spec["dtype"], max_length)
    t = config.train

    def train_step(batch) -> None:
        loss, _ = diffusion_loss(
            unet, batch, scheduler, norm, empty, t.caption_dropout, config.diffusion.snr_gamma
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The UNet step alone: latents, noise, timesteps and context ready, nothing drawn.
    latents = (cached.moments[:, 0, : spec["latent_channels"]] - norm[0]) * norm[1]
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (mb,))
    noisy = scheduler.add_noise(latents, noise, timesteps)

    def unet_step() -> None:
        pred = unet(
            noisy,
            timesteps,
            encoder_hidden_states=cached.context,
            encoder_attention_mask=cached.mask,
        ).sample
        (pred - noise).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    variants = {
        "cached": lambda: train_step(cached),
        "online": lambda: train_step(encoders(pixels, captions)),
        "encode": lambda: encoders(pixels, captions),
        "unet": unet_step,
    }
    with Timer() as timed:
        s, done = median_step_s(variants, cycles, warmup, budget_s)
    ideal = (s["encode"] + s["unet"]) / s["unet"]
    speedup = s["online"] / s["cached"]
    result = {
        "micro_batch_size": mb,
        "resolution": config.data.resolution,
        "latent_shape": list(cached.moments.shape[2:]),
        "context_shape": list(cached.context.shape[1:]),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "torch_threads": threads,
        "cycles": done,
        "median_step_s": s,
        "cached_samples_per_s": mb / s["cached"],
        "online_samples_per_s": mb / s["online"],
        "speedup": speedup,
        "ideal_speedup": ideal,
        "speedup_over_ideal": speedup / ideal,
        "cache_path_overhead": s["cached"] / s["unet"],
        "encoder_load_s": load.seconds,
        "timed_s": timed.seconds,
    }
    write_result("cache_speedup", result)
    ms = {k: f"{v * 1e3:.0f} ms" for k, v in s.items()}
    print(
        table(
            [
                (
                    f"train step, micro batch {mb}",
                    f"{ms['cached']} cached",
                    f"{ms['online']} online encode",
                    f"{speedup:.2f}",
                ),
                (
                    "  samples/s",
                    f"{mb / s['cached']:.1f}",
                    f"{mb / s['online']:.1f}",
                    f"{speedup:.2f}",
                ),
                (
                    "ideal speed-up (t_encode + t_unet) / t_unet",
                    f"t_unet {ms['unet']}",
                    f"t_encode {ms['encode']}",
                    f"{ideal:.2f}",
                ),
                (
                    "measured / ideal speed-up",
                    f"{speedup:.2f}",
                    f"{ideal:.2f}",
                    f"{speedup / ideal:.2f}",
                ),
                (
                    "cached step / UNet step alone",
                    f"{ms['cached']}",
                    f"{ms['unet']}",
                    f"{s['cached'] / s['unet']:.2f}",
                ),
            ]
        )
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=12, help="timed steps of each variant")
    parser.add_argument(
        "--budget", type=float, default=90.0, help="seconds of timed cycles (a loaded machine)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    main(args.cycles, budget_s=args.budget)
    print(f"cache_speedup: {time.perf_counter() - started:.0f} s")
