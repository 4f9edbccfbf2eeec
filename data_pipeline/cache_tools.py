"""`ldm cache info` and `ldm cache verify`: what a latent cache holds, and whether to trust it.

Verify checks every shard against the manifest (present, sha256, sample count), then decodes
a few cached latents with the autoencoder the cache names (after checking its weights hash)
and reports their PSNR against the source images they came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import storage
from core.errors import LdmError
from data_pipeline.cache import (
    bucket_histogram,
    cache_files,
    npy_load,
    read_manifest,
    source_problems,
)
from data_pipeline.images import fit_to, image_bytes, read_shard, to_uint8, try_decode
from models.autoencoder import load_autoencoder
from models.digests import weights_digest
from models.metrics import psnr


def cache_info(cache_dir: str) -> list[str]:
    """A human summary of the manifest, one fact per line."""
    m = read_manifest(cache_dir)
    spec = m["spec"]
    paths = [storage.join(cache_dir, f["name"]) for f in cache_files(m)]
    size = sum(storage.size(p) for p in paths if storage.exists(p))
    n = max(1, m["num_samples"])
    return [
        f"cache        {cache_dir} ({m['format']}, spec {m['spec_digest'][:16]})",
        f"source       {m.get('source', '?')}",
        f"samples      {m['num_samples']} in {len(m['shards'])} shards, {m['num_bad']} bad skipped",
        f"size         {size / 2**20:.1f} MiB, {size / n / 1024:.1f} KiB per sample",
        f"autoencoder  {spec['autoencoder_class']} sha256 {spec['autoencoder_sha256'][:16]} "
        f"(scale {spec['scaling_factor']:.4g}, shift {spec.get('shift_factor', 0.0):.4g})",
        f"text         {spec['text_encoder']} sha256 {spec['text_encoder_sha256'][:16]}, "
        f"up to {spec['text_max_length']} tokens",
        f"images       {spec['resolution']} px, {'center' if spec['center_crop'] else 'random'} "
        f"crop{', and mirrored' if spec['flip'] else ''}",
        f"stored       {spec['dtype']} posterior {spec['latents']}, "
        f"text as {spec['text'].replace('_', ' ')}",
        *_data_lines(m),
    ]


def _data_lines(m: dict[str, Any]) -> list[str]:
    """Buckets and filters, for caches that have them."""
    lines = []
    if "buckets" in m["spec"]:
        sizes = ", ".join(f"{k} {v}" for k, v in bucket_histogram(m).items())
        lines.append(f"buckets      {sizes}")
    if m.get("num_filtered"):
        reasons = ", ".join(f"{k} {v}" for k, v in m["num_filtered"].items())
        lines.append(f"filtered     {sum(m['num_filtered'].values())} ({reasons})")
    return lines


def _check_shards(cache_dir: str, manifest: dict[str, Any], changed: dict[str, str]) -> list[str]:
    problems = []
    for source in manifest["shards"]:
        if source["name"] in changed:
            problems.append(f"{source['name']}: {changed[source['name']]}")
            continue
        problems += _check_files(cache_dir, source.get("parts", [source]))
    return problems


def _check_files(cache_dir: str, entries: list[dict[str, Any]]) -> list[str]:
    problems = []
    for entry in entries:
        path = storage.join(cache_dir, entry["name"])
        if not storage.exists(path):
            problems.append(f"{entry['name']} is missing")
        elif storage.sha256(path) != entry["sha256"]:
            problems.append(f"{entry['name']} does not match its sha256")
        elif (count := sum(1 for _ in read_shard(path))) != entry["num_samples"]:
            problems.append(
                f"{entry['name']} holds {count} samples, manifest says {entry['num_samples']}"
            )
    return problems


def verify_cache(
    cache_dir: str, num_decode: int = 8, autoencoder: Path | None = None
) -> dict[str, Any]:
    """Raise LdmError naming the first problem; else return counts and the decode PSNR."""
    manifest = read_manifest(cache_dir)
    sources_found, changed = source_problems(manifest)
    problems = _check_shards(cache_dir, manifest, changed)
    if problems:
        raise LdmError(
            f"latent cache {cache_dir}: {len(problems)} bad shard(s), first: {problems[0]}; "
            "re-run `ldm precompute CONFIG` (it encodes changed sources again; delete a "
            "damaged shard's .done.json first)"
        )
    result: dict[str, Any] = {"shards": len(manifest["shards"]), "samples": manifest["num_samples"]}
    result["sources_checked"] = sources_found
    spec = manifest["spec"]
    ae_dir = autoencoder or manifest.get("autoencoder_dir")
    if ae_dir is None or not spec["center_crop"]:
        result["psnr_skipped"] = "random crops" if not spec["center_crop"] else "no autoencoder_dir"
        return result
    try:
        ae_local = storage.local_folder(ae_dir)
    except LdmError:
        ae_local = Path(ae_dir)  # not there: refused just below
    if not ae_local.is_dir() or weights_digest(ae_local) != spec["autoencoder_sha256"]:
        raise LdmError(
            f"autoencoder {ae_dir} is missing or is not the one this cache was built with "
            "(weights sha256 differs); pass the right folder with --autoencoder"
        )
    source = next(s for s in manifest["shards"] if s["num_samples"])
    entry = {**source.get("parts", [source])[0], "source": source["source"]}
    if not storage.exists(entry["source"]):
        result["psnr_skipped"] = f"source shard {entry['source']} not found"
        return result
    cached = []
    for sample in read_shard(storage.join(cache_dir, entry["name"])):
        cached.append((json.loads(sample["json"])["source_key"], npy_load(sample["moments.npy"])))
        if len(cached) == num_decode:
            break
    wanted = {key for key, _ in cached}
    sources = {}
    for sample in read_shard(entry["source"]):
        if sample["__key__"] in wanted:
            image = try_decode(image_bytes(sample))
            height, width = entry.get("bucket", (spec["resolution"], spec["resolution"]))
            sources[sample["__key__"]] = fit_to(image, height, width, True)[0]
    vae = load_autoencoder(ae_local)
    means = torch.from_numpy(np.stack([m for _, m in cached]).astype(np.float32))
    with torch.inference_mode():
        mean = means[:, : spec["latent_channels"]]  # moments or means: the mean comes first
        decoded = vae.decode(mean).sample
    result["num_decoded"] = len(cached)
    result["psnr"] = psnr(np.stack([sources[k] for k, _ in cached]), to_uint8(decoded))
    return result
