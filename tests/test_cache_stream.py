"""The latent-cache stream: even epochs, deterministic order, exact and elastic resume."""

import json

import numpy as np
import pytest
import torch
import webdataset as wds

from core.errors import LdmError
from data_pipeline.cache import FORMAT, npy_bytes, write_manifest
from data_pipeline.stream import DataCursor, LatentCacheStream


def make_cache(path, num_shards=4, per_shard=10, dim=8):
    path.mkdir()
    entries = []
    for s in range(num_shards):
        name = f"{s:05d}.tar"
        with wds.TarWriter(str(path / name)) as sink:
            for i in range(per_shard):
                uid = s * 100 + i  # exact in fp16 (< 2048): identifies the sample
                sink.write(
                    {
                        "__key__": f"{s:05d}_{i:06d}",
                        "moments.npy": npy_bytes(np.full((2, 2, 2), uid, np.float16)),
                        "text.npy": npy_bytes(np.ones((3 + i % 4, dim), np.float16)),
                        "txt": f"caption {uid}",
                    }
                )
        entries.append({"name": name, "num_samples": per_shard, "num_bad": 0, "sha256": ""})
    write_manifest(
        path,
        {"format": FORMAT, "spec": {"text_max_length": 6, "latents": "moments"}, "shards": entries},
    )
    return path


def ids(batch):
    return batch.moments[:, 0, 0, 0, 0].round().long().tolist()


def take(stream, num_workers, num_batches):
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    out = []
    for batch in loader:
        out.append(ids(batch))
        if len(out) == num_batches:
            return out


def epoch_of(cache, layout_batches, seed=7, micro_batch_size=3, start=None):
    """Run ranks x loader workers side by side; returns ({rank: [batch ids]}, end cursor)."""
    out, cursor = {}, None
    for world, workers, num_batches in layout_batches:
        for rank in range(world):
            stream = LatentCacheStream(
                cache, rank, world, micro_batch_size, workers, seed, cursor=start
            )
            out.setdefault((world, workers, rank), []).extend(take(stream, workers, num_batches))
        cursor = stream.cursor_after(num_batches)
        start = cursor
    return out, cursor


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_stream_continues_exactly(tmp_path, num_workers):
    cache = make_cache(tmp_path / "cache")
    kwargs = dict(rank=0, world_size=1, micro_batch_size=3, num_loader_workers=num_workers, seed=7)
    full = take(LatentCacheStream(cache, **kwargs), num_workers, 30)  # crosses 2 epochs
    for start in (1, 5, 8, 13, 17):
        cursor = LatentCacheStream(cache, **kwargs).cursor_after(start)
        resumed = take(LatentCacheStream(cache, cursor=cursor, **kwargs), num_workers, 30 - start)
        assert resumed == full[start:], start
    assert DataCursor.from_dict(json.loads(json.dumps(cursor.to_dict()))) == cursor


def test_an_epoch_is_dealt_evenly_without_repeats(tmp_path):
    # 2 shards for 2 ranks x 2 loader workers: streams share shards, reading different pieces.
    cache = make_cache(tmp_path / "cache", num_shards=2, per_shard=13)
    stream = LatentCacheStream(cache, 0, 2, 3, 2, seed=0)
    per_rank = stream.layout.batches_per_rank(26)
    assert per_rank == 4  # 26 samples / 4 streams -> 6 each (2 batches of 3); 2 sit out
    seen, _ = epoch_of(cache, [(2, 2, per_rank)])
    ids_ = [uid for batches in seen.values() for b in batches for uid in b]
    assert len(ids_) == len(set(ids_)) == 24
    assert {len(b) for b in seen.values()} == {per_rank}


@pytest.mark.parametrize(
    "layouts",
    [
        [(2, 1, 3), (1, 1, 100)],  # 2 -> 1 ranks mid-epoch
        [(1, 1, 5), (2, 1, 100)],  # 1 -> 2
        [(2, 2, 2), (1, 2, 2), (3, 1, 100)],  # two changes within one epoch
    ],
)
def test_elastic_restart_neither_repeats_nor_skips_within_the_epoch(tmp_path, layouts):
    cache = make_cache(tmp_path / "cache", num_shards=4, per_shard=10)
    consumed = []
    cursor = None
    for world, workers, num_batches in layouts:
        probe = LatentCacheStream(cache, 0, world, 3, workers, seed=7, cursor=cursor)
        left = (
            probe.layout.batches_per_rank(
                len(probe.plan.remaining(0, probe.start.finished_segments))
            )
            - probe.start.batches_per_rank
        )
        n = min(num_batches, left)
        remaining = len(probe.plan.remaining(0, probe.start.finished_segments))
        streams = world * workers
        seen, cursor = epoch_of(cache, [(world, workers, n)], start=cursor)
        consumed += [uid for batches in seen.values() for b in batches for uid in b]
    assert cursor.epoch == 1 and cursor.batches_per_rank == 0  # the epoch was used up
    assert len(consumed) == len(set(consumed))
    # Exactly what cannot fill one more micro-batch of 3 on each stream of the last layout
    # sits out: the rest of the epoch, dealt in equal whole micro-batches.
    dealt = streams * (remaining // streams // 3 * 3)
    assert 40 - len(consumed) == remaining - dealt < streams * 3


def test_too_few_samples_fails_at_start(tmp_path):
    cache = make_cache(tmp_path / "cache", num_shards=1, per_shard=7)
    with pytest.raises(LdmError, match="at least 8 samples"):
        LatentCacheStream(cache, 0, 2, micro_batch_size=2, num_loader_workers=2, seed=0)


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(LdmError, match="run `ldm precompute CONFIG`"):
        LatentCacheStream(tmp_path, 0, 1, 2, 0, 0)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(LdmError, match="unknown cache format"):
        LatentCacheStream(tmp_path, 0, 1, 2, 0, 0)


def test_batches_are_padded_with_a_mask(tmp_path):
    cache = make_cache(tmp_path / "cache")
    batch = next(
        iter(LatentCacheStream(cache, 0, 1, micro_batch_size=5, num_loader_workers=0, seed=0))
    )
    assert batch.context.shape == (5, 6, 8) and batch.mask.shape == (5, 6)
    assert batch.mask.sum(1).tolist() == [int(m) for m in (batch.context.abs().sum(-1) > 0).sum(1)]


def test_caption_dropout_rate_matches_the_config(tmp_path):
    """Dropout happens at train time, per caption, at the configured rate."""
    from training.objective import drop_captions

    cache = make_cache(tmp_path / "cache")
    batch = next(iter(LatentCacheStream(cache, 0, 1, 20, 0, seed=0)))
    empty = (torch.full((6, 8), 7.0), torch.tensor([True, True, False, False, False, False]))
    torch.manual_seed(0)
    for probability in (0.1, 0.5):
        draws = [drop_captions(batch, empty, probability) for _ in range(2000)]
        dropped = torch.cat([d for _, _, d in draws]).float()
        # 40,000 Bernoulli draws: the standard error of the rate is <= 0.0025.
        assert abs(dropped.mean().item() - probability) < 4 * 0.0025
        context, mask, which = draws[0]
        assert torch.equal(context[which], empty[0].expand(int(which.sum()), 6, 8))
        assert torch.equal(mask[which], empty[1].expand(int(which.sum()), 6))
        assert torch.equal(context[~which], batch.context[~which])
    assert not drop_captions(batch, empty, 0.0)[2].any()


def test_train_time_latents_draw_from_the_posterior_and_pick_a_view():
    from data_pipeline.cache import collate
    from training.objective import draw_latents

    mean, flipped = np.zeros((2, 2, 2)), np.ones((2, 2, 2))
    logvar = np.full((2, 2, 2), 2 * np.log(0.5))  # std 0.5
    moments = [[np.concatenate([mean, logvar]), np.concatenate([flipped, logvar])]]
    batch = collate([(views, np.ones((3, 4))) for views in moments * 4000], 4)
    torch.manual_seed(0)
    latents = draw_latents(batch)
    assert latents.shape == (4000, 2, 2, 2)
    views = latents.mean(dim=(1, 2, 3))  # ~0 for the image, ~1 for its mirror
    assert abs((views > 0.5).float().mean().item() - 0.5) < 0.03
    noise = latents - (views > 0.5).float()[:, None, None, None]
    assert abs(noise.std().item() - 0.5) < 0.01

    means_only = collate([([mean], np.ones((3, 4)))] * 3, 4, has_logvar=False)
    assert torch.equal(draw_latents(means_only), torch.zeros(3, 2, 2, 2))


BUCKETS = [(2, 2), (1, 3), (3, 1)]  # latent (height, width) of three aspect-ratio buckets


def make_bucketed_cache(path, num_shards=4, per_shard=(7, 4, 3)):
    """Each raw shard as precompute writes it with buckets: one tar per bucket (`parts`);
    a sample's latent has its bucket's shape, and its value identifies it."""
    path.mkdir()
    entries = []
    for s in range(num_shards):
        parts = []
        for b, (height, width) in enumerate(BUCKETS):
            name = f"{s:05d}.{height}x{width}.tar"
            count = per_shard[(b + s) % len(per_shard)]  # buckets of other sizes per shard
            with wds.TarWriter(str(path / name)) as sink:
                for i in range(count):
                    uid = s * 100 + b * 20 + i
                    sink.write(
                        {
                            "__key__": f"{s:05d}_{b * 20 + i:06d}",
                            "moments.npy": npy_bytes(np.full((2, height, width), uid, np.float16)),
                            "text.npy": npy_bytes(np.ones((3, 8), np.float16)),
                        }
                    )
            parts.append({"name": name, "bucket": [height, width], "num_samples": count})
        entries.append({"name": f"{s:05d}.tar", "parts": parts, "num_samples": sum(per_shard)})
    spec = {"text_max_length": 6, "latents": "moments", "resolution": 2, "buckets": BUCKETS}
    write_manifest(path, {"format": FORMAT, "spec": spec, "shards": entries})
    return path


def bucket_of(uid):
    return BUCKETS[uid % 100 // 20]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bucketed_batches_hold_one_bucket_and_resume_exactly(tmp_path, num_workers):
    cache = make_bucketed_cache(tmp_path / "cache")
    kwargs = dict(rank=0, world_size=1, micro_batch_size=3, num_loader_workers=num_workers, seed=7)
    stream = LatentCacheStream(cache, **kwargs)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    full, shapes = [], set()
    for batch in loader:
        full.append(ids(batch))
        assert len({bucket_of(uid) for uid in full[-1]}) == 1  # one bucket per micro-batch
        assert tuple(batch.moments.shape[-2:]) == bucket_of(full[-1][0])
        shapes.add(tuple(batch.moments.shape[-2:]))
        if len(full) == 24:  # 56 samples, at most 5 buckets' leftovers: ~2 epochs
            break
    assert shapes == set(BUCKETS)
    per_epoch = stream._batches_per_rank(stream.plan.epoch_sequence(0))
    epoch = [uid for b in full[:per_epoch] for uid in b]
    assert len(epoch) == len(set(epoch))  # nothing repeated within an epoch
    for start in (1, 4, per_epoch - 1, per_epoch + 2):
        cursor = LatentCacheStream(cache, **kwargs).cursor_after(start)
        resumed = take(LatentCacheStream(cache, cursor=cursor, **kwargs), num_workers, 24 - start)
        assert resumed == full[start:], start


@pytest.mark.parametrize("layouts", [[(2, 1, 2), (1, 1, 100)], [(1, 2, 3), (3, 1, 100)]])
def test_bucketed_ranks_take_equal_batches_and_elastic_restarts_lose_nothing(tmp_path, layouts):
    """Every rank of a layout yields the same number of micro-batches per epoch whatever its
    buckets (no rank waits in an all-reduce), and a restart on another world size deals the
    rest of the epoch without repeating a sample."""
    cache = make_bucketed_cache(tmp_path / "cache", num_shards=6)
    consumed, cursor = [], None
    for world, workers, num_batches in layouts:
        probe = LatentCacheStream(cache, 0, world, 2, workers, seed=3, cursor=cursor)
        left = probe._batches_per_rank(probe.plan.remaining(0, probe.start.finished_segments))
        n = min(num_batches, left - probe.start.batches_per_rank)
        seen, cursor = epoch_of(cache, [(world, workers, n)], micro_batch_size=2, start=cursor)
        assert {len(batches) for batches in seen.values()} == {n}  # equal per rank
        for batches in seen.values():
            assert all(len({bucket_of(uid) for uid in b}) == 1 for b in batches)
        consumed += [uid for batches in seen.values() for b in batches for uid in b]
    assert cursor.epoch == 1 and cursor.batches_per_rank == 0
    assert len(consumed) == len(set(consumed))
    # What sits out is at most a partial micro-batch per bucket and stream, plus the streams'
    # shortfall against the smallest: most of the epoch is used.
    assert len(consumed) >= 0.6 * 6 * 14
