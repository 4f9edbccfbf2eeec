"""The latent-cache stream: disjoint per-rank shards, deterministic order, exact resume."""

import json

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipeline.cache import FORMAT, LatentCacheStream, npy_bytes, write_manifest
from orchestrator.errors import LdmError


def make_cache(path, num_shards=4, per_shard=10, dim=8):
    path.mkdir()
    entries = []
    for s in range(num_shards):
        name = f"{s:05d}.tar"
        with wds.TarWriter(str(path / name)) as sink:
            for i in range(per_shard):
                uid = s * 1000 + i  # recoverable from the moments, to identify samples
                sink.write(
                    {
                        "__key__": f"{s:05d}_{i:06d}",
                        "moments.npy": npy_bytes(np.full((2, 2, 2), uid, np.float16)),
                        "text.npy": npy_bytes(np.ones((3 + i % 4, dim), np.float16)),
                        "txt": f"caption {uid}",
                    }
                )
        entries.append({"name": name, "num_samples": per_shard, "num_bad": 0, "sha256": ""})
    write_manifest(path, {"format": FORMAT, "spec": {"text_max_length": 6}, "shards": entries})
    return path


def ids(batch):
    return batch.moments[:, 0, 0, 0].round().long().tolist()


def take(stream, num_workers, num_batches):
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    out = []
    for batch in loader:
        out.append(ids(batch))
        if len(out) == num_batches:
            return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_stream_continues_exactly(tmp_path, num_workers):
    cache = make_cache(tmp_path / "cache")
    kwargs = dict(rank=0, world_size=1, micro_batch_size=3, num_loader_workers=num_workers, seed=7)
    full = take(LatentCacheStream(cache, **kwargs), num_workers, 20)
    for start in (1, 5, 8):
        resumed = take(
            LatentCacheStream(cache, start_batch=start, **kwargs), num_workers, 20 - start
        )
        assert resumed == full[start:]


def test_ranks_read_disjoint_shards_and_batches_are_padded(tmp_path):
    cache = make_cache(tmp_path / "cache")
    seen = []
    for rank in (0, 1):
        stream = LatentCacheStream(cache, rank, 2, micro_batch_size=5, num_loader_workers=1, seed=0)
        batches = take(stream, 0, 2)  # one epoch of this rank: its 2 shards, 20 samples
        seen.append({uid // 1000 for b in batches for uid in b})
        batch = next(iter(stream))
        assert batch.context.shape == (5, 6, 8) and batch.mask.shape == (5, 6)
        assert batch.mask.sum(1).tolist() == [
            int(m) for m in (batch.context.abs().sum(-1) > 0).sum(1)
        ]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 4


def test_too_few_shards_fails_at_start(tmp_path):
    cache = make_cache(tmp_path / "cache", num_shards=2)
    with pytest.raises(LdmError, match="needs at least|need at least"):
        LatentCacheStream(cache, 0, 2, micro_batch_size=2, num_loader_workers=2, seed=0)


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(LdmError, match="run `ldm precompute CONFIG`"):
        LatentCacheStream(tmp_path, 0, 1, 2, 0, 0)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(LdmError, match="unknown cache format"):
        LatentCacheStream(tmp_path, 0, 1, 2, 0, 0)
