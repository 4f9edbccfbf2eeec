"""Web-scale data as users have it: real img2dataset output (mixed sizes, LAION-style
metadata, failed downloads) read as it is, filtered, bucketed by aspect ratio, trained on and
sampled at a bucket's size; shard lists at 100,000-shard scale; bad input in one line."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from core.errors import LdmError
from core.layout import RunLayout
from core.loader import build_config, load_config
from data_pipeline.cache import spec_digest
from data_pipeline.filters import SampleFilter
from data_pipeline.images import expand_braces, list_shards, read_shard
from data_pipeline.precompute import cache_names, plan_precompute
from tests.conftest import ldm, ok, one_line_error

WHERE = "aesthetic >= 4"
MIN_WIDTH, MAX_ASPECT = 48, 3.0
BUCKETS = [(24, 40), (32, 32), (40, 24)]  # `auto` at 32 px for the tiny UNet (unit 8)


def expected_counts(tars: list) -> tuple[dict[str, int], dict[str, int]]:
    """What the filters and buckets must give, worked out here from the samples' JSON."""
    filtered: dict[str, int] = {}
    buckets: dict[str, int] = {}
    for tar in tars:
        for sample in read_shard(str(tar)):
            meta = json.loads(sample["json"])
            width, height = meta["original_width"], meta["original_height"]
            why = None
            if meta["aesthetic"] < 4:
                why = WHERE
            elif width < MIN_WIDTH:
                why = f"min_width {MIN_WIDTH}"
            elif max(width, height) / min(width, height) > MAX_ASPECT:
                why = f"max_aspect_ratio {MAX_ASPECT:g}"
            if why:
                filtered[why] = filtered.get(why, 0) + 1
                continue
            ratio = width / height
            h, w = min(BUCKETS, key=lambda b: abs(math.log(b[1] / b[0] / ratio)))
            buckets[f"{h}x{w}"] = buckets.get(f"{h}x{w}", 0) + 1
    return filtered, buckets


def encode_in_process(config) -> None:
    """The precompute job's decoder, encoder and writer classes, run here in order (as
    `bench/precompute.py`'s bare loop runs them), then its manifest: the cache `ldm
    precompute` writes, without the seconds a Ray Data job spends starting its actors (the
    32 px cache above is the real job's)."""
    from bench.precompute import bare_precompute
    from data_pipeline.precompute import (
        cache_spec,
        cached_shards,
        resolve_cache_dir,
        write_cache_manifest,
    )

    layout = RunLayout.of(config)
    spec = cache_spec(config, layout.autoencoder_dir)
    shards = cached_shards(config)
    cache_dir = resolve_cache_dir(config, spec)
    bare_precompute(config, spec, shards, Path(cache_dir))
    names = [Path(s).name for s in shards]
    write_cache_manifest(config, spec, cache_dir, names, Path(layout.autoencoder_dir), None)


def test_img2dataset_output_filtered_bucketed_trained_and_sampled(
    pipeline, img2dataset_output, embedded_ray, tmp_path
):
    work, uri, _ = pipeline
    out = img2dataset_output["output_dir"]
    autoencoder = RunLayout.of(load_config(work / "exp.yaml")).autoencoder_dir
    exp = tmp_path / "web.yaml"
    exp.write_text(
        f"preset: tiny\nrun:\n  name: web\n  root: {tmp_path}/runs\n"
        f"data:\n  shards: '{out}/{{00000..00003}}.tar'\n  caption: caption_recaptioned\n"
        f"  buckets: auto\n  filters:\n    min_width: {MIN_WIDTH}\n"
        f"    max_aspect_ratio: {MAX_ASPECT}\n    where: ['{WHERE}']\n"
        f"autoencoder:\n  pretrained: {autoencoder}\ntracking:\n  uri: {uri}\n"
    )
    # A filter naming a field no sample has: one line, before any work.
    typo = ldm("precompute", str(exp), "data.filters.where=['aesthtic >= 4']")
    one_line_error(typo, "data.filters.where", "'aesthtic'", "aesthetic")  # names what is there
    assert not (tmp_path / "runs" / "cache").exists()

    result = ok(ldm("precompute", str(exp)))
    (cache,) = (tmp_path / "runs" / "cache").iterdir()
    manifest = json.loads((cache / "manifest.json").read_text())
    filtered, buckets = expected_counts(img2dataset_output["tars"])
    assert manifest["num_filtered"] == filtered and len(filtered) == 3
    assert manifest["bucket_histogram"] == buckets and set(buckets) == {"24x40", "32x32", "40x24"}
    assert manifest["num_bad"] == 0  # filtered samples are not bad samples
    kept = img2dataset_output["successes"] - sum(filtered.values())
    assert manifest["num_samples"] == kept
    assert manifest["spec"]["filters"]["where"] == [WHERE]
    assert manifest["spec"]["buckets"] == [list(b) for b in BUCKETS]
    per_shard = {e["name"]: sum(e["num_filtered"].values()) for e in manifest["shards"]}
    assert sum(per_shard.values()) == sum(filtered.values()) and len(per_shard) == 4
    assert f"{sum(filtered.values())} samples filtered out" in result.stdout
    # One tar per bucket and raw shard; each sample's latent has its bucket's shape and
    # records the original size and crop; the caption is the JSON field's.
    for entry in manifest["shards"]:
        for part in entry["parts"]:
            height, width = part["bucket"]
            for sample in read_shard(str(cache / part["name"])):
                meta = json.loads(sample["json"])
                assert meta["bucket"] == [height, width]
                assert np.load(__import__("io").BytesIO(sample["moments.npy"])).shape[1:] == (
                    height // 4,
                    width // 4,
                )
                assert len(meta["original_size"]) == 2 and len(meta["crop"]) == 2
                assert sample["txt"].decode().startswith("a picture of ")

    # Training draws each micro-batch from one bucket; the sample grids and `ldm sample` take
    # any bucket's size.
    ok(
        ldm(
            "train",
            str(exp),
            "train.num_workers=1",
            "train.num_loader_workers=0",
            "train.num_steps=2",
            "train.checkpoint_every=2",
            "sample.height=24",
            "sample.width=40",
            "tracking.log_model=false",
        )
    )
    # MLflow shows the histogram: the precompute run's metrics, the training run's tags.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = {
        r.data.tags["ldm.stage"]: r
        for r in client.search_runs(
            [client.get_experiment_by_name("ldm").experiment_id], "attributes.run_name LIKE 'web%'"
        )
    }
    metrics = runs["precompute"].data.metrics
    assert {k: int(v) for k, v in metrics.items() if k.startswith("bucket_")} == {
        f"bucket_{size}": n for size, n in buckets.items()
    }
    assert metrics["num_filtered"] == sum(filtered.values())
    assert json.loads(runs["train"].data.tags["ldm.cache_buckets"]) == buckets
    assert json.loads(runs["train"].data.tags["ldm.cache_filtered"]) == filtered

    tag = tmp_path / "runs" / "web" / "checkpoints" / "step_00000002"
    images = ok(
        ldm(
            "sample",
            str(tag),
            "--prompt",
            "a picture of a heart",
            "--num-images",
            "1",
            "--steps",
            "2",
            "--height",
            "40",
            "--width",
            "24",
            "--out",
            str(tmp_path / "samples"),
        )
    )
    (path,) = images.stdout.split()
    assert Image.open(path).size == (24, 40)  # PIL: (width, height)
    one_line_error(
        ldm("sample", str(tag), "--prompt", "x", "--height", "30", "--out", str(tmp_path)),
        "--height 30",
        "multiples of 8",
    )

    # Stable Diffusion's recipe at fixture scale: continue at twice the resolution from the
    # 32 px run's checkpoint, as a new run with a cache of its own (256 -> 512 px there).
    hires = ("run.name=web64", "data.resolution=64")
    encode_in_process(load_config(exp, list(hires)))  # the job's own pieces, without Ray
    continued = ok(
        ldm(
            "train",
            str(exp),
            *hires,
            f"train.init_from={tag}",
            "train.num_workers=1",
            "train.num_loader_workers=0",
            "train.num_steps=1",
            "tracking.log_model=false",
        )
    )
    assert f"a new run from the weights of {tag}" in continued.stdout
    caches = [json.loads((c / "manifest.json").read_text()) for c in cache.parent.iterdir()]
    assert sorted(m["spec"]["resolution"] for m in caches) == [32, 64]
    state = json.loads(
        (
            tmp_path / "runs" / "web64" / "checkpoints" / "step_00000001" / "train_state.json"
        ).read_text()
    )
    assert state["step"] == 1  # a new run: its own steps, from the 32 px weights


def test_shard_lists_and_planning_at_100k_shards(tmp_path):
    """Brace ranges, list files and prefixes name shards; 100,000 of them are planned (which
    to encode, which a resumed job already has) in seconds, without 100,000 files."""
    started = time.perf_counter()
    shards = expand_braces("s3://bucket/laion/{00000..99999}.tar")
    names = cache_names(shards)
    fingerprints = {s: {"size": 1 << 28, "version": f"etag:{i}"} for i, s in enumerate(shards)}
    digest = spec_digest({"resolution": 512})
    entries = {  # a job killed half way: every other shard done, one changed since
        name: {
            "name": name,
            "num_samples": 9000,
            "spec_digest": digest,
            "source_identity": {**fingerprints[shard], "sha256": "x"},
        }
        for shard, name in list(zip(shards, names, strict=True))[::2]
    }
    entries["00002.tar"]["spec_digest"] = "another"
    plan = plan_precompute(shards, names, fingerprints, entries, digest)
    seconds = time.perf_counter() - started
    assert len(shards) == 100_000 and shards[-1] == "s3://bucket/laion/99999.tar"
    assert len(plan.done) == 49_999 and len(plan.todo) == 50_001
    assert plan.stale == {"00002.tar": "cached under another spec"}
    assert seconds < 20, seconds  # a generous bound: it takes well under a second here
    print(f"planned 100,000 shards in {seconds:.2f} s")

    # The other ways to name shards, on real files.
    for i in range(3):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "a" / f"part-{i}.tar").write_bytes(b"")
        (tmp_path / "b" / f"part-{i}.tar").write_bytes(b"")
    (tmp_path / "a" / "other.tar").write_bytes(b"")
    listing = tmp_path / "shards.txt"
    listing.write_text(
        "# two folders\na/part-0.tar\n\nb/part-0.tar\n" + f"{tmp_path}/b/part-1.tar\n"
    )
    listed = list_shards(str(listing))
    assert listed == [str(tmp_path / p) for p in ("a/part-0.tar", "b/part-0.tar", "b/part-1.tar")]
    assert cache_names(listed) == ["a__part-0.tar", "b__part-0.tar", "b__part-1.tar"]
    assert list_shards(str(tmp_path / "a" / "part-")) == [
        str(tmp_path / "a" / f"part-{i}.tar") for i in range(3)
    ]
    assert expand_braces("x/{a,b}-{01..02}.tar") == [
        "x/a-01.tar",
        "x/a-02.tar",
        "x/b-01.tar",
        "x/b-02.tar",
    ]
    with pytest.raises(LdmError, match="runs backwards"):
        expand_braces("{9..1}.tar")
    with pytest.raises(LdmError, match="listed more than once"):
        cache_names([str(listed[0]), str(listed[0])])


def test_a_filter_reads_the_parquet_when_the_json_lacks_the_field(tmp_path):
    """Datasets whose per-sample JSON lacks a column still filter on it: img2dataset's
    parquet beside the shard has every column of the URL list."""
    shard = tmp_path / "00000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(3):
            sink.write({"__key__": f"{i:09d}", "txt": "a cat", "json": json.dumps({"k": i})})
    table = pa.table({"key": [f"{i:09d}" for i in range(3)], "punsafe": [0.01, 0.9, 0.05]})
    pq.write_table(table, tmp_path / "00000.parquet")
    keep = SampleFilter("txt", {"where": ["punsafe < 0.1"]}, str(shard))
    verdicts = [
        keep.reject_metadata(s["__key__"], "a cat", json.loads(s["json"]))
        for s in read_shard(str(shard))
    ]
    assert verdicts == [None, "punsafe < 0.1", None]


def test_bucket_and_filter_config_errors_name_the_key():
    with pytest.raises(LdmError, match=r"data.buckets: 36x40 has a height of 36, not a multiple"):
        build_config({"preset": "tiny", "data": {"buckets": [[36, 40], [32, 32]]}})
    with pytest.raises(LdmError, match="data.filters.where: 'aesthetic > high'"):
        build_config({"preset": "tiny"}, ["data.filters.where=['aesthetic > high']"])
    config = build_config({"preset": "tiny"}, ["data.buckets=auto", "data.filters.min_width=64"])
    assert config.image_sizes() == BUCKETS and config.data.filters.active() == {"min_width": 64}


def test_the_readme_recipe_config_loads_at_both_resolutions():
    """`configs/sd1-laion.yaml`, with each of the README recipe's overrides."""
    from core.loader import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "sd1-laion.yaml"
    at_256 = load_config(path)
    at_512 = load_config(path, ["run.name=sd512", "data.resolution=512"])
    assert at_256.data.shards == "s3://my-bucket/laion/{00000..41455}.tar"
    assert len(expand_braces(at_256.data.shards)) == 41_456
    assert at_256.image_sizes() == [(192, 320), (256, 256), (320, 192)]
    assert len(at_512.image_sizes()) == 9 and (512, 512) in at_512.image_sizes()
    assert at_512.data.filters.active()["where"] == [
        "aesthetic >= 5",
        "punsafe < 0.1",
        "pwatermark < 0.5",
    ]
