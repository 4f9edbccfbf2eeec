"""`ldm precompute` as a user runs it: killed and rerun, and fed broken data (on S3:
test_s3). Each test compares against the cache the session's `pipeline` fixture built
without interruption: a cache's bytes must not depend on how the job was run. The killed
run is a process of its own, a driver of the suite's embedded Ray; every other run is the
command line in this process, on that Ray.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import webdataset as wds

from core.errors import LdmError
from core.loader import load_config
from data_pipeline.cache import check_sources, read_manifest
from data_pipeline.images import read_shard
from data_pipeline.precompute import cache_spec, resolve_cache_dir
from orchestrator.precompute import precompute
from tests.conftest import ROOT, ldm, ok, one_line_error

pytestmark = pytest.mark.slow


def reference_cache(work):
    """The pipeline's cache (other tests add caches of other specs and datasets beside it)."""

    def spec(path):
        return json.loads((path / "manifest.json").read_text())["spec"]

    (cache,) = [
        path
        for path in (work / "runs" / "cache").iterdir()
        if (path / "manifest.json").is_file()
        and spec(path)["text"] == "hidden_states"
        and spec(path)["dataset"] == str(work / "shards")
    ]
    return cache, json.loads((cache / "manifest.json").read_text())


def _same_entries(entries: list[dict], expected: list[dict]) -> bool:
    """Cache manifest entries that describe the same shards, encoded from sources of the same
    bytes (wherever those lie: the dataset, and so the spec, is named by its location)."""

    def held(entry: dict) -> dict:
        where = ("source", "source_identity", "spec_digest")
        return {
            **{k: v for k, v in entry.items() if k not in where},
            "source_sha256": entry["source_identity"]["sha256"],
        }

    return [held(e) for e in entries] == [held(e) for e in expected]


def test_killed_precompute_reruns_to_an_identical_cache_and_redoes_a_changed_shard(
    pipeline, embedded_ray, tmp_path
):
    """`ldm precompute`, a process of its own on the suite's Ray, SIGKILLed (no handler
    runs: an OOM kill) after its first shard: the rerun keeps the finished shards, redoes
    what a kill can leave half done, and writes the cache an uninterrupted run wrote, byte for
    byte. A source shard changed after that (re-captioned under the same name) is caught by
    `ldm train`'s check and `ldm cache verify`, and the next precompute encodes it again;
    one only touched (same bytes) is kept."""
    import ray

    work, _, _ = pipeline
    reference, expected = reference_cache(work)
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    shutil.copytree(work / "shards", raw)
    args = ["precompute", str(work / "exp.yaml"), f"data.shards={raw}"]
    job = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args, f"precompute.cache_dir={cache}"]
        + [f"cluster.address={ray.get_runtime_context().gcs_address}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list(cache.glob("*.done.json")):
        assert job.poll() is None and time.monotonic() < deadline, "precompute never wrote a shard"
        time.sleep(0.05)
    job.kill()  # the driver, which writes the cache; Ray ends its actors with it
    job.wait()
    done = sorted(p.name for p in cache.glob("*.done.json"))
    assert 1 <= len(done) < 4 and not (cache / "manifest.json").exists()
    # What a kill can leave besides: a half-written shard, and a shard moved into place whose
    # sidecar was never written. Both must be redone, not trusted.
    (cache / ".00003.tar.partial").write_bytes(b"half a tar")
    (cache / "00003.tar").write_bytes(b"a shard without its sidecar")
    (cache / "00003.done.json").unlink(missing_ok=True)

    rerun = ok(ldm(*args, f"precompute.cache_dir={cache}"))
    skipped = len(done) - ("00003.done.json" in done)
    assert f"{skipped} of 4 shards already cached" in rerun.stdout
    manifest = json.loads((cache / "manifest.json").read_text())
    assert _same_entries(manifest["shards"], expected["shards"])
    assert manifest["spec"] == {**expected["spec"], "dataset": str(raw)}
    assert {e["spec_digest"] for e in manifest["shards"]} == {manifest["spec_digest"]}
    for entry in expected["shards"]:
        assert (cache / entry["name"]).read_bytes() == (reference / entry["name"]).read_bytes()
    assert not list(cache.glob(".*.partial"))
    check_sources(cache, read_manifest(cache))

    _recaption(raw / "00001.tar", "a fixed caption")
    later = time.time() + 5
    os.utime(raw / "00000.tar", (later, later))  # touched: a new mtime, the same bytes
    with pytest.raises(LdmError, match=r"00001.tar: .*00001.tar changed since it was encoded"):
        check_sources(cache, read_manifest(cache))  # what `ldm train` checks first
    one_line_error(ldm("cache", "verify", str(cache)), "00001.tar changed since it was encoded")

    again = ok(ldm(*args, f"precompute.cache_dir={cache}"))
    assert "3 of 4 shards already cached" in again.stdout
    assert "00001.tar: " in again.stdout and "encoding it again" in again.stdout
    assert "00000.tar: " not in again.stdout  # same bytes: not encoded again
    (first_sample, *_) = read_shard(str(cache / "00001.tar"))
    assert first_sample["txt"] == b"a fixed caption"
    manifest = read_manifest(cache)
    check_sources(cache, manifest)
    entry = {e["name"]: e for e in manifest["shards"]}["00001.tar"]
    assert (
        entry["source_identity"]["sha256"]
        == hashlib.sha256((raw / "00001.tar").read_bytes()).hexdigest()
    )


def _clean(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("_")}


def _broken_shards(work, folder):
    raw = sorted((work / "shards").glob("*.tar"))
    folder.mkdir()
    # 00000: 16 samples, of which one has bytes that are no image, one a PNG cut in half, and
    # one no image at all.
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        for i, sample in enumerate(read_shard(str(raw[0]))):
            sample = _clean(sample)
            if i == 3:
                sample["png"] = b"this is not an image"
            elif i == 5:
                sample["png"] = sample["png"][: len(sample["png"]) // 2]
            elif i == 7:
                del sample["png"]
            sink.write(sample)
    data = raw[1].read_bytes()
    (folder / "00001.tar").write_bytes(data[: len(data) // 2 + 100])  # a truncated download
    (folder / "00002.tar").write_bytes(os.urandom(3000))  # not a tar at all
    shutil.copy(raw[2], folder / "00003.tar")
    return folder


def test_corrupt_samples_and_broken_tars_are_counted_and_skipped(pipeline, embedded_ray, tmp_path):
    work, _, _ = pipeline
    shards = _broken_shards(work, tmp_path / "shards")
    args = ["precompute", str(work / "exp.yaml"), f"data.shards={shards}"]
    result = ok(
        ldm(*args, f"precompute.cache_dir={tmp_path / 'cache'}", "precompute.max_bad_fraction=0.5")
    )
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    counts = {e["name"]: (e["num_samples"], e["num_bad"]) for e in manifest["shards"]}
    truncated_good = counts["00001.tar"][0]
    assert 0 < truncated_good < 16
    assert counts == {
        "00000.tar": (13, 3),
        "00001.tar": (truncated_good, 1),
        "00002.tar": (0, 1),
        "00003.tar": (16, 0),
    }
    assert manifest["num_bad"] == 5
    assert "00000.tar: 3 bad samples skipped" in result.stdout
    assert "00002.tar: 1 bad samples skipped, e.g. tar:" in result.stdout

    with pytest.raises(LdmError) as refused:  # the default budget: 1%
        precompute(
            load_config(
                work / "exp.yaml", [*args[2:], f"precompute.cache_dir={tmp_path / 'strict'}"]
            )
        )
    message = str(refused.value)
    assert "could not be decoded" in message and "precompute.max_bad_fraction=0.01" in message
    assert "\n" not in message  # the command prints it as its one line
    assert not (tmp_path / "strict" / "manifest.json").exists()


def _recaption(shard, caption: str) -> None:
    """Rewrite a raw shard in place with its first sample's caption replaced (a re-shard
    after fixing captions: same name, same samples, other bytes)."""
    samples = [_clean(sample) for sample in read_shard(str(shard))]
    samples[0]["txt"] = caption.encode()
    with wds.TarWriter(str(shard)) as sink:
        for sample in samples:
            sink.write(sample)


def test_two_datasets_never_share_a_cache(pipeline, tmp_path):
    """The same encoders over another dataset (even one with the same shard names) get
    their own cache folder; pointing both at one folder is refused before any encoding."""
    work, _, _ = pipeline
    reference, _ = reference_cache(work)
    other = tmp_path / "other"
    shutil.copytree(work / "shards", other)
    config = load_config(work / "exp.yaml")
    moved = load_config(work / "exp.yaml", [f"data.shards={other}"])
    ae = work / "runs" / "tiny" / "autoencoder"
    assert resolve_cache_dir(config, cache_spec(config, ae)) == str(reference)
    assert resolve_cache_dir(moved, cache_spec(moved, ae)) != str(reference)
    refused = ldm(
        "precompute",
        str(work / "exp.yaml"),
        f"data.shards={other}",
        f"precompute.cache_dir={reference}",
    )
    one_line_error(refused, "was built with dataset=", "point precompute.cache_dir at another")
