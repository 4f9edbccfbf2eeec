"""Aspect-ratio buckets vs square crops: training samples/s on the same data.

Real img2dataset output (the tests' builder: mixed sizes and aspect ratios, downloaded by the
real tool from a local HTTP server) is encoded twice with the demo's model sizes, once with
`data.buckets=auto` (64x64, 48x80, 80x48 at 64 px) and once as square 64 px crops, through
the precompute job's own decoder, encoder and writer classes. Then the same demo UNet trains
on each cache the same way (the real `LatentCacheStream` through a DataLoader, forward,
backward, AdamW; one process; the two alternate, best of 2 rounds each): the ratio is what
training from buckets costs or saves per sample. Buckets keep about as many pixels as the
square (their pixel counts are printed): a bucket's micro-batch holds one size, so nothing is
padded or wasted.

    python -m bench.buckets [--images 192] [--steps 12]
"""

from __future__ import annotations

import argparse
import shutil

import torch

from bench.common import WORK, Timer, bench_config, table, unet_training, write_result
from bench.precompute import bare_precompute
from core.layout import RunLayout

DATA = WORK / "buckets-data"
ROUNDS = 2


def web_shards(num_images: int) -> list[str]:
    """img2dataset output of `num_images` mixed-size images, downloaded once."""
    from data_pipeline.images import list_shards
    from tests.img2dataset_data import build_img2dataset_output

    output = DATA / "img2dataset"
    if not (output / f"{num_images}.done").is_file():
        shutil.rmtree(DATA, ignore_errors=True)
        DATA.mkdir(parents=True)
        build_img2dataset_output(DATA, num_images=num_images, samples_per_shard=64)
        (output / f"{num_images}.done").write_text("")
    return list_shards(str(output))


def encode(buckets: str, shards: list[str]) -> tuple[object, str, dict]:
    """The cache of `shards` with `data.buckets=buckets`: (config, folder, manifest)."""
    from data_pipeline.precompute import cache_spec, write_cache_manifest

    config = bench_config(
        [
            f"data.buckets={buckets}",
            f"data.shards={shards[0].rsplit('/', 1)[0]}",
            "data.holdout_shards=0",
        ]
    )
    spec = cache_spec(config, RunLayout.of(config).autoencoder_dir)
    cache = WORK / f"cache-buckets-{buckets}"
    shutil.rmtree(cache, ignore_errors=True)
    bare_precompute(config, spec, shards, cache)
    names = [s.rsplit("/", 1)[1] for s in shards]
    ae = RunLayout.of(config).autoencoder_dir
    manifest = write_cache_manifest(config, spec, str(cache), names, ae, None)
    return config, str(cache), manifest


def train_samples_per_s(config, cache: str, num_steps: int) -> tuple[float, float]:
    """(samples/s, mean pixels per sample) of demo-UNet steps on micro-batches from the cache."""
    from data_pipeline.stream import LatentCacheStream
    from training.objective import diffusion_loss

    unet, optimizer, scheduler, empty, norm, _ = unet_training(config, cache)
    mb = config.train.micro_batch_size
    stream = LatentCacheStream(cache, 0, 1, mb, 1, seed=0)
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1))
    factor = config.autoencoder.downsample_factor

    def step() -> int:
        batch = next(batches)
        loss, _ = diffusion_loss(unet, batch, scheduler, norm, empty, 0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch.moments.shape[-2] * batch.moments.shape[-1] * factor * factor

    for _ in range(2):  # warm-up: loader start, first-call allocations
        step()
    with Timer() as timer:
        pixels = [step() for _ in range(num_steps)]
    return num_steps * mb / timer.seconds, sum(pixels) / len(pixels)


def main(num_images: int = 192, num_steps: int = 12) -> dict:
    shards = web_shards(num_images)
    bucketed_config, bucketed, bucketed_manifest = encode("auto", shards)
    square_config, square, square_manifest = encode("off", shards)
    # Alternated, best of each: a slow moment of the machine does not land on one side only.
    bucket_runs, square_runs = [], []
    for _ in range(ROUNDS):
        bucket_runs.append(train_samples_per_s(bucketed_config, bucketed, num_steps))
        square_runs.append(train_samples_per_s(square_config, square, num_steps))
    bucket_rate, bucket_pixels = max(bucket_runs)
    square_rate, square_pixels = max(square_runs)
    result = {
        "num_images": bucketed_manifest["num_samples"],
        "resolution": bucketed_config.data.resolution,
        "micro_batch_size": bucketed_config.train.micro_batch_size,
        "num_steps": num_steps,
        "rounds": ROUNDS,
        "bucket_histogram": bucketed_manifest["bucket_histogram"],
        "buckets_samples_per_s": bucket_rate,
        "square_samples_per_s": square_rate,
        "ratio": bucket_rate / square_rate,
        "buckets_pixels_per_sample": bucket_pixels,
        "square_pixels_per_sample": square_pixels,
        "ratio_per_pixel": (bucket_rate * bucket_pixels) / (square_rate * square_pixels),
    }
    write_result("buckets", result)
    sizes = ", ".join(f"{k}: {v}" for k, v in result["bucket_histogram"].items())
    print(f"{result['num_images']} img2dataset images (mixed sizes); buckets {sizes}")
    print(
        table(
            [
                (
                    f"train samples/s (demo UNet, micro batch {result['micro_batch_size']})",
                    f"{bucket_rate:.1f} buckets",
                    f"{square_rate:.1f} square crops",
                    f"{result['ratio']:.2f}",
                ),
                (
                    "  pixels per sample",
                    f"{bucket_pixels:.0f}",
                    f"{square_pixels:.0f}",
                    f"{bucket_pixels / square_pixels:.2f}",
                ),
                ("  pixels/s", "", "", f"{result['ratio_per_pixel']:.2f}"),
            ]
        )
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192, help="images img2dataset downloads")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per cache")
    args = parser.parse_args()
    main(args.images, args.steps)
