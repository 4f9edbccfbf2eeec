"""Precompute throughput: the Ray Data job vs a bare single-process loop of the same encoders.

Both encode the same demo shards with the same decoder and encoder code, batch for batch,
so their caches must come out byte-identical (checked): the ratio is what Ray Data's
scheduling, serialisation and actor pipeline cost or gain on this machine. Also reports the
bytes a cached sample takes against storing the text embeddings padded to max length.

    python -m bench.precompute [--shards 8]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np

from bench.common import WORK, Timer, bench_config, demo_shards, table, write_result
from core.layout import RunLayout

# The cache the Ray Data job writes: the data-path benchmark reads it (bench/run.py orders).
RAY_CACHE = WORK / "cache-ray"
PRODUCES = (RAY_CACHE,)


def in_process_stages(config, spec: dict):
    """The precompute job's decoder and encoder actors' classes, built here, in this process,
    as the job builds them: (decoder, encoder)."""
    from data_pipeline.precompute import Encoder, ShardDecoder
    from models.text_encoders import text_encoder_path

    decoder = ShardDecoder(
        str(text_encoder_path(config.text_encoder.name_or_path)),
        config.text_encoder.max_length,
        config.data.resolution,
        config.data.center_crop,
        config.run.seed,
        config.precompute.batch_size,
        config.data.caption,
        config.data.filters.active(),
        spec.get("buckets"),
    )
    encoder = Encoder(
        str(RunLayout.of(config).autoencoder_dir),
        config.text_encoder.name_or_path,
        spec,
        os.cpu_count() or 1,
    )
    return decoder, encoder


def bare_precompute(config, spec: dict, shards: list[str], out: Path) -> list[tuple[float, int]]:
    """The same decode and encode steps in one process: no Ray, no pipelining. Returns the
    seconds and samples of each encoder call (its outputs reach the host inside the call, so
    a GPU's work is in its time)."""
    from core import storage
    from data_pipeline.cache import spec_digest
    from data_pipeline.precompute import ShardWriter

    out.mkdir(parents=True)
    decoder, encoder = in_process_stages(config, spec)
    fingerprints = storage.fingerprints(shards)
    encoded = []
    for shard in shards:
        writer = ShardWriter(
            str(out),
            Path(shard).name,
            shard,
            fingerprints[shard],
            spec_digest(spec),
            out,
            bucketed="buckets" in spec,
        )
        for batch in decoder({"shard": shard}):
            started = time.perf_counter()
            rows = encoder({k: [v] for k, v in batch.items()})
            encoded.append((time.perf_counter() - started, int((rows["index"] >= 0).sum())))
            for i in range(len(rows["index"])):
                writer.add({k: v[i] for k, v in rows.items()})
        assert writer.complete
        writer.publish()
    return encoded


def cache_bytes(cache: Path, max_length: int) -> dict[str, float]:
    """Bytes per sample as stored, and as they would be with padded text embeddings.

    A tar member rounds up to 512-byte blocks; the padded text members are counted the same.
    """
    num_samples, total, text, text_blocks, padded = 0, 0, 0, 0, 0
    for shard in sorted(cache.glob("*.tar")):
        total += shard.stat().st_size
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".text.npy"):
                    num_samples += 1
                    stored = np.load(io.BytesIO(tar.extractfile(member).read()))
                    text += member.size
                    text_blocks += -(-member.size // 512) * 512
                    pad_bytes = (max_length - len(stored)) * stored.shape[1] * stored.itemsize
                    padded += -(-(member.size + pad_bytes) // 512) * 512
    return {
        "bytes_per_sample": total / num_samples,
        "bytes_per_sample_padded": (total - text_blocks + padded) / num_samples,
        "text_bytes_per_sample": text / num_samples,
    }


def steady_images_per_s(cache: Path) -> float:
    """Throughput between the first and the last finished shard: start-up excluded."""
    entries = sorted(
        (m.stat().st_mtime, json.loads(m.read_text())["num_samples"])
        for m in cache.glob("*.done.json")
    )
    if len(entries) < 2:
        return float("nan")
    return sum(n for _, n in entries[1:]) / (entries[-1][0] - entries[0][0])


def main(num_shards: int = 8, overrides: list[str] = ()) -> dict:
    import ray

    from data_pipeline.images import list_shards
    from data_pipeline.precompute import cache_spec
    from orchestrator.cluster import ray_session
    from orchestrator.precompute import precompute

    shards = list_shards(demo_shards(num_shards))
    config = bench_config(overrides)
    spec = cache_spec(config, RunLayout.of(config).autoencoder_dir)
    bare_dir, ray_dir = WORK / "cache-bare", RAY_CACHE
    for folder in (bare_dir, ray_dir):
        shutil.rmtree(folder, ignore_errors=True)

    with Timer() as bare:
        bare_precompute(config, spec, shards, bare_dir)
    config.data.shards = str(Path(shards[0]).parent)
    config.precompute.cache_dir = str(ray_dir)
    with Timer() as ray_start, ray_session():
        ray.cluster_resources()  # start-up alone, timed apart from the job below
    with ray_session():
        with Timer() as ray_job:
            precompute(config, progress=False)
    manifest = json.loads((ray_dir / "manifest.json").read_text())
    num_images = manifest["num_samples"]
    identical = all(
        (ray_dir / e["name"]).read_bytes() == (bare_dir / e["name"]).read_bytes()
        for e in manifest["shards"]
    )
    sizes = cache_bytes(ray_dir, config.text_encoder.max_length)
    # Stable Diffusion pads every caption to CLIP's 77 tokens: what that would cost here.
    sizes["bytes_per_sample_padded_77"] = cache_bytes(ray_dir, 77)["bytes_per_sample_padded"]
    result = {
        "num_images": num_images,
        "resolution": config.data.resolution,
        "batch_size": config.precompute.batch_size,
        "num_encoders": config.precompute.num_encoders,
        "bare_images_per_s": num_images / bare.seconds,
        "ray_images_per_s": num_images / ray_job.seconds,
        "ratio": bare.seconds / ray_job.seconds,
        "bare_steady_images_per_s": steady_images_per_s(bare_dir),
        "ray_steady_images_per_s": steady_images_per_s(ray_dir),
        "ray_start_s": ray_start.seconds,
        "steady_ratio": steady_images_per_s(ray_dir) / steady_images_per_s(bare_dir),
        "ratio_with_ray_start": bare.seconds / (ray_job.seconds + ray_start.seconds),
        "caches_identical": identical,
        **sizes,
        "padded_over_stored": sizes["bytes_per_sample_padded"] / sizes["bytes_per_sample"],
        "text_max_length": config.text_encoder.max_length,
    }
    write_result("precompute", result)
    print(
        table(
            [
                (
                    f"precompute images/s ({num_images} images)",
                    f"{result['ray_images_per_s']:.1f} Ray Data",
                    f"{result['bare_images_per_s']:.1f} bare loop",
                    f"{result['ratio']:.2f}",
                ),
                (
                    "  steady state (first shard to last)",
                    f"{result['ray_steady_images_per_s']:.1f}",
                    f"{result['bare_steady_images_per_s']:.1f}",
                    f"{result['steady_ratio']:.2f}",
                ),
                (
                    "  incl. Ray start-up",
                    f"+{result['ray_start_s']:.1f} s",
                    "",
                    f"{result['ratio_with_ray_start']:.2f}",
                ),
                (
                    "cache bytes/sample",
                    f"{sizes['bytes_per_sample']:.0f} real tokens",
                    f"{sizes['bytes_per_sample_padded']:.0f} padded",
                    f"{1 / result['padded_over_stored']:.2f}",
                ),
                (
                    "  vs padding to 77 tokens (SD)",
                    "",
                    f"{sizes['bytes_per_sample_padded_77']:.0f} padded",
                    f"{sizes['bytes_per_sample'] / sizes['bytes_per_sample_padded_77']:.2f}",
                ),
            ]
        )
    )
    print(f"caches byte-identical: {identical}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8, help="demo shards of 256 images")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. precompute.num_encoders=2"
    )
    args = parser.parse_args()
    main(args.shards, args.overrides)
