"""The img2dataset output the tests build (`img2dataset_output`) is what the real tool writes:
webdataset shards of `KEY.jpg`, `KEY.txt` and `KEY.json`, a parquet and a `_stats.json` beside
each, failures listed in the parquets only, original sizes and the LAION-style columns kept."""

import io
import json
import tarfile
from collections import Counter, defaultdict

from PIL import Image

SAMPLE_KEYS = {
    "url",
    "caption",
    "key",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "exif",
    "sha256",
    "aesthetic",
    "punsafe",
    "pwatermark",
    "similarity",
    "caption_recaptioned",
}


def read_tar(path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}; asserts each sample's members are contiguous."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    order: list[str] = []
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            if not order or order[-1] != key:
                assert key not in order, f"{path.name}: members of {key} are not grouped"
                order.append(key)
            samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def read_parquets(paths) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for path in paths for row in pq.read_table(path).to_pylist()]


def test_shards_hold_each_downloaded_image_with_caption_and_metadata(img2dataset_output):
    out = img2dataset_output
    size_of = {row["url"]: row["size"] for row in out["rows"]}
    caption_of = {row["url"]: row["caption"] for row in out["rows"]}
    assert out["tars"], "no shard written"
    seen = []
    for tar in out["tars"]:
        for key, sample in read_tar(tar).items():
            assert set(sample) == {"jpg", "txt", "json"}, (tar.name, key, set(sample))
            meta = json.loads(sample["json"])
            assert SAMPLE_KEYS <= set(meta), SAMPLE_KEYS - set(meta)
            # The key is the shard number followed by the sample's index in that shard.
            assert meta["key"] == key and key.startswith(tar.stem), (tar.name, key)
            assert meta["status"] == "success" and meta["error_message"] is None
            assert sample["txt"].decode() == meta["caption"] == caption_of[meta["url"]]
            assert meta["caption_recaptioned"].startswith("a picture of ")
            assert 3.0 <= meta["aesthetic"] <= 7.0 and 0.2 <= meta["similarity"] <= 0.4
            assert 0.0 <= meta["punsafe"] <= 1.0 and 0.0 <= meta["pwatermark"] <= 1.0
            # --resize_mode no: the served size, kept, in the metadata and the image itself.
            size = (meta["original_width"], meta["original_height"])
            assert size == (meta["width"], meta["height"]) == size_of[meta["url"]]
            assert Image.open(io.BytesIO(sample["jpg"])).size == size
            seen.append(size)
    assert len(seen) == out["successes"] == len(out["sizes"]) == 48
    assert Counter(seen) == Counter(out["sizes"])


def test_parquet_and_stats_beside_each_shard(img2dataset_output):
    out = img2dataset_output
    folder = out["output_dir"]
    assert [p.name for p in out["tars"]] == [f"{i:05d}.tar" for i in range(len(out["tars"]))]
    for tar in out["tars"]:
        assert (folder / f"{tar.stem}.parquet").is_file()
        assert (folder / f"{tar.stem}_stats.json").is_file()
    assert len(out["parquets"]) == len(out["stats"]) == len(out["tars"])
    stats = [json.loads(path.read_text()) for path in out["stats"]]
    assert sum(s["count"] for s in stats) == len(out["rows"])
    assert sum(s["successes"] for s in stats) == out["successes"] == 48
    assert out["failures"] == 3


def test_parquets_list_successes_and_failures(img2dataset_output):
    out = img2dataset_output
    rows = read_parquets(out["parquets"])
    assert {row["url"] for row in rows} == {row["url"] for row in out["rows"]}
    assert SAMPLE_KEYS <= set(rows[0])
    status = Counter(row["status"] for row in rows)
    assert status == {"success": 48, "failed_to_resize": 2, "failed_to_download": 1}
    failed = {row["url"].split("/", 3)[-1]: row for row in rows if row["status"] != "success"}
    assert set(failed) == {"broken/0.jpg", "broken/1.png", "missing/0.jpg"}
    assert failed["missing/0.jpg"]["error_message"] == "HTTP Error 404: Not Found"
    assert failed["broken/0.jpg"]["error_message"] == "Image decoding error"
    for row in failed.values():  # no image: no size, hash or tar members
        assert row["width"] is None and row["original_width"] is None and row["sha256"] is None
    tar_keys = {key for tar in out["tars"] for key in read_tar(tar)}
    assert tar_keys == {row["key"] for row in rows if row["status"] == "success"}
