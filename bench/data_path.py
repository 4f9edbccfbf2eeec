"""The data path: can the latent-cache stream and the raw-shard reader keep training fed?

1. Latent-cache stream samples/s per loader worker (the real `LatentCacheStream` through a
   DataLoader with 0, 1 and 2 workers) against what one training step of the demo UNet
   consumes (samples/s of forward + backward + AdamW on one process).
2. Raw-shard decode samples/s (`read_shard` + decode + resize/crop, what the autoencoder
   stage and precompute run) against a bare loop of `tarfile` + the same PIL pixel work over
   the same files: the ratio is the cost of the shard-reading layer.

Needs the cache that `python -m bench.precompute` writes.

    python -m bench.data_path
"""

from __future__ import annotations

import tarfile
import time

import torch
from PIL import Image

from bench import precompute
from bench.common import Timer, bench_config, demo_shards, table, unet_training, write_result

# Built by the precompute benchmark, which `make bench` runs first.
NEEDS = precompute.PRODUCES


def stream_samples_per_s(cache, num_workers: int, micro_batch_size: int, num_batches: int):
    from data_pipeline.stream import LatentCacheStream

    stream = LatentCacheStream(cache, 0, 1, micro_batch_size, num_workers, seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    with Timer() as timer:
        for _ in range(num_batches):
            next(batches)
    return num_batches * micro_batch_size / timer.seconds


def train_step_samples_per_s(config, cache, num_steps: int = 12) -> float:
    """One process, one rank: what a training step of this model eats per second."""
    from data_pipeline.stream import LatentCacheStream
    from training.objective import diffusion_loss

    unet, optimizer, scheduler, empty, norm, _ = unet_training(config, cache)
    mb = config.train.micro_batch_size
    batch = next(iter(LatentCacheStream(cache, 0, 1, mb, 0, seed=0)))

    def step():
        loss, _ = diffusion_loss(unet, batch, scheduler, norm, empty, 0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with Timer() as timer:
        for _ in range(num_steps):
            step()
    return num_steps * mb / timer.seconds


def ours_decode(shards, resolution: int) -> int:
    from data_pipeline.images import image_bytes, read_shard, resize_crop, try_decode

    n = 0
    for shard in shards:
        for sample in read_shard(shard):
            resize_crop(try_decode(image_bytes(sample)), resolution)
            n += 1
    return n


def bare_decode(shards, resolution: int) -> int:
    """tarfile + the same PIL pixel work (alpha onto white, resize): no webdataset, no checks."""
    from data_pipeline.images import decode_rgb

    n = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".png"):
                    image = decode_rgb(data)
                    if image.size != (resolution, resolution):
                        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
                    n += 1
    return n


def main() -> dict:
    from data_pipeline.images import list_shards

    config = bench_config()
    (cache,) = NEEDS
    if not (cache / "manifest.json").is_file():
        raise SystemExit("no bench cache: run `python -m bench.precompute` first")
    mb = config.train.micro_batch_size
    consumed = train_step_samples_per_s(config, cache)
    per_worker = {}
    for workers in (0, 1, 2):
        rate = stream_samples_per_s(cache, workers, mb, num_batches=200)
        per_worker[workers] = rate / max(1, workers)

    shards = list_shards(demo_shards(4))
    res = config.data.resolution
    start = time.perf_counter()
    n_ours = ours_decode(shards, res)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    n_bare = bare_decode(shards, res)
    bare_s = time.perf_counter() - start
    assert n_ours == n_bare
    result = {
        "micro_batch_size": mb,
        "train_step_samples_per_s": consumed,
        "stream_samples_per_s_per_worker": {str(k): v for k, v in per_worker.items()},
        "stream_over_train": {str(k): v / consumed for k, v in per_worker.items()},
        "decode_samples_per_s": n_ours / ours_s,
        "bare_decode_samples_per_s": n_bare / bare_s,
        "decode_ratio": bare_s / ours_s,
    }
    write_result("data_path", result)
    rows = [
        (
            f"cache stream samples/s, {'in-process' if k == 0 else f'{k} worker(s), per worker'}",
            f"{v:.0f}",
            f"{consumed:.0f} train step",
            f"{v / consumed:.1f}",
        )
        for k, v in per_worker.items()
    ]
    rows.append(
        (
            "raw shard decode samples/s",
            f"{n_ours / ours_s:.0f}",
            f"{n_bare / bare_s:.0f} tarfile+PIL",
            f"{bare_s / ours_s:.2f}",
        )
    )
    print(table(rows))
    return result


if __name__ == "__main__":
    main()
