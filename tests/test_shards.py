"""Image folder -> webdataset shards, and the emoji demo folder, on real files."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from core.errors import LdmError
from data_pipeline.emoji import build_emoji_folder, emoji_captions, fetch_emoji
from data_pipeline.images import ShardReadReport, list_shards, read_shard
from data_pipeline.shards import ShardsSummary, write_shards

FIXTURE = Path(__file__).parent / "fixtures" / "emoji64"
ROOT = Path(__file__).resolve().parents[1]


def fixture_captions() -> dict[str, str]:
    rows = [json.loads(line) for line in (FIXTURE / "captions.jsonl").read_text().splitlines()]
    return {row["file"]: row["caption"] for row in rows}


def copy_images(dest: Path, count: int) -> list[str]:
    """The first `count` fixture images, without any captions."""
    dest.mkdir(parents=True, exist_ok=True)
    names = sorted(fixture_captions())[:count]
    for name in names:
        shutil.copyfile(FIXTURE / name, dest / name)
    return names


def write_jsonl(path: Path, captions: dict[str, str]) -> None:
    lines = [json.dumps({"file": f, "caption": c}) for f, c in captions.items()]
    path.write_text("\n".join(lines) + "\n")


def members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return tar.getnames()


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(LdmError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


# --- the fixture itself -------------------------------------------------------------------


def test_fixture_is_small_complete_and_attributed() -> None:
    captions = fixture_captions()
    pngs = sorted(p.name for p in FIXTURE.glob("*.png"))
    assert len(pngs) == 64 and sorted(captions) == pngs
    assert all(c.startswith("an emoji of ") for c in captions.values())
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 400 * 1024
    assert "CC-BY 4.0" in (FIXTURE / "ATTRIBUTION.md").read_text()
    for colour in ("red", "blue", "green", "yellow", "purple", "orange"):
        assert f"an emoji of {colour} heart" in captions.values()


# --- shards from a folder -----------------------------------------------------------------


def test_fixture_shards_layout_and_metadata(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    summary = write_shards(FIXTURE, out, samples_per_shard=20, progress=False)

    assert isinstance(summary, ShardsSummary)
    assert (summary.num_samples, summary.num_shards, summary.skipped) == (64, 4, [])
    assert [p.name for p in summary.shards] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert list_shards(out) == [str(p) for p in summary.shards]
    assert not list(out.glob("*.partial"))

    captions = fixture_captions()
    seen: list[str] = []
    for shard_number, shard in enumerate(summary.shards):
        names = members(shard)
        # Grouped per sample: image, caption, metadata, then the next key.
        keys = [n.split(".")[0] for n in names]
        assert keys == [k for k in dict.fromkeys(keys) for _ in range(3)]
        report = ShardReadReport()
        samples = list(read_shard(str(shard), report))
        assert report.errors == []
        assert len(samples) == (4 if shard_number == 3 else 20)
        for index, sample in enumerate(samples):
            key = sample["__key__"]
            assert key == f"{shard_number:05d}{index:02d}"  # img2dataset-style key
            meta = json.loads(sample["json"])
            original = (FIXTURE / meta["file_name"]).read_bytes()
            assert sample["png"] == original
            assert sample["txt"] == captions[meta["file_name"]].encode()
            assert meta["caption"] == captions[meta["file_name"]]
            assert meta["key"] == key and meta["status"] == "success"
            assert (meta["width"], meta["height"]) == (64, 64)
            assert meta["sha256"] == hashlib.sha256(original).hexdigest()
            seen.append(meta["file_name"])
    assert seen == sorted(captions)  # deterministic order: sorted file names

    record = json.loads((out / "_summary.json").read_text())
    assert record["num_samples"] == 64 and record["num_shards"] == 4
    assert record["shards"] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert record["skipped"] == []


def test_webdataset_reads_the_shards(tmp_path: Path) -> None:
    summary = write_shards(FIXTURE, tmp_path / "out", samples_per_shard=16, progress=False)
    dataset = wds.WebDataset([str(p) for p in summary.shards], shardshuffle=False)
    samples = list(dataset)
    assert len(samples) == 64
    assert all({"png", "txt", "json"} <= set(s) for s in samples)
    decoded = next(iter(wds.WebDataset(str(summary.shards[0]), shardshuffle=False).decode("pil")))
    assert decoded["png"].size == (64, 64)
    assert decoded["txt"].startswith("an emoji of ")


def test_output_is_reproducible_and_keys_follow_shard_size(tmp_path: Path) -> None:
    a = write_shards(FIXTURE, tmp_path / "a", samples_per_shard=256, progress=False)
    b = write_shards(FIXTURE, tmp_path / "b", samples_per_shard=256, progress=False)
    assert a.num_shards == 1
    assert a.shards[0].read_bytes() == b.shards[0].read_bytes()
    assert members(a.shards[0])[0] == "00000000.png"  # 5 digits of shard, 3 of index

    one = write_shards(FIXTURE, tmp_path / "one", samples_per_shard=1, progress=False)
    assert one.num_shards == 64 and one.shards[-1].name == "00063.tar"
    assert members(one.shards[-1]) == ["000630.png", "000630.txt", "000630.json"]


def test_sidecar_captions_win_and_are_one_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    names = copy_images(src, 3)
    (src / Path(names[0]).with_suffix(".txt").name).write_text("a shiny\nthing  \n")
    (src / (names[1] + ".txt")).write_text("second thing")
    write_jsonl(src / "captions.jsonl", {names[0]: "ignored", names[2]: "from the table"})

    summary = write_shards(src, tmp_path / "out", progress=False)
    texts = [s["txt"].decode() for s in read_shard(str(summary.shards[0]))]
    assert texts == ["a shiny thing", "second thing", "from the table"]


def test_captions_csv_with_aliases(tmp_path: Path) -> None:
    src = tmp_path / "src"
    names = copy_images(src, 4)
    with open(src / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image", "Text", "extra"])
        for i, name in enumerate(names):
            writer.writerow([name, f"thing {i}, with a comma", "x"])
    summary = write_shards(src, tmp_path / "out", progress=False)
    texts = [s["txt"].decode() for s in read_shard(str(summary.shards[0]))]
    assert texts == [f"thing {i}, with a comma" for i in range(4)]


def test_extension_follows_the_real_format(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format="JPEG")
    (src / "photo.png").write_bytes(buffer.getvalue())  # a JPEG with the wrong suffix
    (src / "photo.txt").write_text("a red photo")
    summary = write_shards(src, tmp_path / "out", progress=False)
    (sample,) = read_shard(str(summary.shards[0]))
    assert "jpg" in sample and "png" not in sample
    assert sample["jpg"] == buffer.getvalue()
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["height"], meta["file_name"]) == (40, 30, "photo.png")


def test_undecodable_image_is_skipped_and_reported(tmp_path: Path) -> None:
    src = tmp_path / "src"
    names = copy_images(src, 5)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    captions = {name: f"caption {name}" for name in names}
    write_jsonl(src / "captions.jsonl", {**captions, "broken.png": "broken"})

    summary = write_shards(src, tmp_path / "out", progress=False)
    assert summary.num_samples == 5
    assert summary.skipped == [("broken.png", "not a decodable image")]
    assert all(
        json.loads(s["json"])["file_name"] != "broken.png"
        for s in read_shard(str(summary.shards[0]))
    )
    record = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert record["skipped"] == [{"file": "broken.png", "reason": "not a decodable image"}]


def test_only_undecodable_images_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"garbage")
    (src / "a.txt").write_text("caption")
    assert "could be read" in error_of(write_shards, src, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.tar"))


# --- bad input ----------------------------------------------------------------------------


def test_missing_source(tmp_path: Path) -> None:
    message = error_of(write_shards, tmp_path / "nope", tmp_path / "out", progress=False)
    assert "nope" in message and "does not exist" in message


def test_source_without_images(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    shutil.copyfile(FIXTURE / "1f499.png", src / "sub" / "1f499.png")
    (src / "notes.txt").write_text("not an image")
    message = error_of(write_shards, src, tmp_path / "out", progress=False)
    assert "no images" in message and ".png" in message and "subfolders" in message


def test_images_without_captions_are_named(tmp_path: Path) -> None:
    src = tmp_path / "src"
    names = copy_images(src, 6)
    write_jsonl(src / "captions.jsonl", {names[0]: "only the first"})
    message = error_of(write_shards, src, tmp_path / "out", progress=False)
    assert "5 of 6 images" in message
    assert names[1] in message and names[3] in message and names[5] not in message
    assert "NAME.txt" in message and "captions.jsonl" in message
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_empty_caption_counts_as_missing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (name,) = copy_images(src, 1)
    (src / Path(name).with_suffix(".txt").name).write_text("  \n")
    assert "no caption" in error_of(write_shards, src, tmp_path / "out", progress=False)


def test_samples_per_shard_must_be_positive(tmp_path: Path) -> None:
    message = error_of(write_shards, FIXTURE, tmp_path / "out", samples_per_shard=0, progress=False)
    assert "at least 1" in message


def test_refuses_to_mix_with_existing_shards(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_shards(FIXTURE, out, samples_per_shard=32, progress=False)
    before = sorted(p.name for p in out.iterdir())
    message = error_of(write_shards, FIXTURE, out, progress=False)
    assert "already holds shards" in message and "remove it or pick another" in message
    assert sorted(p.name for p in out.iterdir()) == before

    (out / "_summary.json").unlink()  # as a killed run leaves it
    assert "interrupted" in error_of(write_shards, FIXTURE, out, progress=False)


def test_existing_empty_output_and_leftovers_are_fine(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "00007.tar.partial").write_bytes(b"half a shard from a killed run")
    summary = write_shards(FIXTURE, out, progress=False)
    assert summary.num_samples == 64
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "_summary.json"]


def test_output_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    assert "is a file" in error_of(write_shards, FIXTURE, tmp_path / "out", progress=False)


def test_bad_caption_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    names = copy_images(src, 2)
    (src / "captions.csv").write_text("name,description\nx,y\n")
    message = error_of(write_shards, src, tmp_path / "out", progress=False)
    assert "captions.csv" in message and "found: name, description" in message

    write_jsonl(src / "captions.jsonl", {names[0]: "a"})
    assert "both captions.jsonl and captions.csv" in error_of(
        write_shards, src, tmp_path / "out", progress=False
    )

    (src / "captions.csv").unlink()
    (src / "captions.jsonl").write_text('{"file": "a.png", "caption": "ok"}\n{not json\n')
    assert "line 2 is not valid JSON" in error_of(
        write_shards, src, tmp_path / "out", progress=False
    )
    (src / "captions.jsonl").write_bytes(b'{"file": "a.png", "caption": "\xff"}\n')
    assert "not UTF-8" in error_of(write_shards, src, tmp_path / "out", progress=False)
    (src / "captions.jsonl").write_text('{"path": "a.png", "caption": "ok"}\n')
    assert "line 1: needs a file key" in error_of(
        write_shards, src, tmp_path / "out", progress=False
    )


# --- the emoji demo folder (no network) ---------------------------------------------------


def emoji_entry(
    name: str, unified: str, image: str, has_image: bool = True, skin: dict | None = None
) -> dict:
    entry = {"name": name, "unified": unified, "image": image, "has_img_twitter": has_image}
    return {**entry, "skin_variations": skin} if skin else entry


def fake_package(tmp_path: Path) -> Path:
    """A tiny emoji-datasource-twitter tgz: real PNGs, a synthetic emoji.json, hostile names."""
    png = (FIXTURE / "1f499.png").read_bytes()
    hands = "1f9d1-{}200d-1f91d-200d-1f9d1{}.png"
    entries = [
        emoji_entry("BLUE HEART", "1F499", "1f499.png"),
        emoji_entry("HEAVY BLACK HEART", "2764-FE0F", "2764-fe0f.png"),
        emoji_entry("Egypt Flag", "1F1EA-1F1EC", "1f1ea-1f1ec.png"),
        emoji_entry("LARGE RED CIRCLE", "1F534", "1f534.png"),
        emoji_entry(
            "THUMBS UP SIGN",
            "1F44D",
            "1f44d.png",
            skin={
                "1F3FD": emoji_entry("", "", "1f44d-1f3fd.png"),
                "1F3FF": emoji_entry("", "", "1f44d-1f3ff.png", has_image=False),
            },
        ),
        emoji_entry(
            "PEOPLE HOLDING HANDS",
            "1F9D1-200D-1F91D-200D-1F9D1",
            hands.format("", ""),
            has_image=False,
            skin={
                "1F3FB-1F3FF": emoji_entry("", "", hands.format("1f3fb-", "-1f3ff")),
                "1F3FB-1F3FB": emoji_entry("", "", hands.format("1f3fb-", "-1f3fb")),
            },
        ),
        emoji_entry("NOT IN THE ARCHIVE", "1F600", "1f600.png"),
        emoji_entry("EVIL", "0", "../../evil.png"),
    ]
    files = {
        "package/emoji.json": json.dumps(entries).encode(),
        "package/LICENSE": b"The MIT License (MIT)\n",
        "package/img/twitter/64/../../../../evil.png": png,
        "package/img/twitter/64/unlisted.png": png,
        "../outside.txt": b"x",
    }
    for entry in entries[:6]:
        files[f"package/img/twitter/64/{entry['image']}"] = png
        for variation in entry.get("skin_variations", {}).values():
            files[f"package/img/twitter/64/{variation['image']}"] = png
    tgz = tmp_path / "emoji-datasource-twitter-16.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tgz


def test_emoji_captions_from_emoji_json(tmp_path: Path) -> None:
    dest = build_emoji_folder(fake_package(tmp_path), tmp_path / "data" / "emoji")
    rows = [json.loads(line) for line in (dest / "captions.jsonl").read_text().splitlines()]
    captions = {row["file"]: row["caption"] for row in rows}
    assert captions == {
        "1f1ea-1f1ec.png": "an emoji of flag of egypt",
        "1f44d-1f3fd.png": "an emoji of thumbs up sign, medium skin tone",
        "1f44d.png": "an emoji of thumbs up sign",
        "1f499.png": "an emoji of blue heart",
        "1f534.png": "an emoji of red circle",
        "1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3fb.png": (
            "an emoji of people holding hands, light skin tone"
        ),
        "1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3ff.png": (
            "an emoji of people holding hands, light skin tone, dark skin tone"
        ),
        "2764-fe0f.png": "an emoji of red heart",
    }
    assert list(captions) == sorted(captions)
    assert sorted(p.name for p in dest.glob("*.png")) == sorted(captions)
    assert "CC-BY 4.0" in (dest / "ATTRIBUTION.md").read_text()
    assert (dest / "LICENSE-emoji-data.txt").read_text().startswith("The MIT License")
    assert json.loads((dest / ".complete.json").read_text())["images"] == 8
    # Nothing escaped the folder, and no temporary folder was left behind.
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["emoji"]
    assert not list(tmp_path.rglob("evil*")) and not list(tmp_path.rglob("outside*"))

    summary = write_shards(dest, tmp_path / "shards", progress=False)
    assert summary.num_samples == 8


def test_emoji_caption_helper() -> None:
    entry = {**emoji_entry("", "X", "1f499.png"), "short_name": "blue_heart"}
    assert emoji_captions([entry]) == {"1f499.png": "an emoji of blue heart"}


def test_fetch_emoji_returns_a_complete_folder_without_npm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = build_emoji_folder(fake_package(tmp_path), tmp_path / "emoji")
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert fetch_emoji(dest) == dest

    message = error_of(fetch_emoji, tmp_path / "fresh")
    assert "npm is not installed" in message
    assert "holds version 16.0.0" in error_of(fetch_emoji, dest, "15.1.2")
    assert "exact version" in error_of(fetch_emoji, tmp_path / "x", "latest")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("user data")
    assert "remove it or pick another" in error_of(fetch_emoji, tmp_path / "other")


def test_build_refuses_a_broken_archive(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not gzip at all")
    assert "not a readable npm package" in error_of(build_emoji_folder, bad, tmp_path / "emoji")
    assert not (tmp_path / "emoji").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.tgz"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_fetch_emoji_from_npm(tmp_path: Path) -> None:
    dest = fetch_emoji(tmp_path / "emoji", npm_cache=ROOT / ".cache" / "npm")
    marker = json.loads((dest / ".complete.json").read_text())
    assert marker["images"] > 3000
    assert len(list(dest.glob("*.png"))) == marker["images"]
    captions = (dest / "captions.jsonl").read_text()
    assert '"caption": "an emoji of red heart"' in captions
    assert '"caption": "an emoji of horse face"' in captions
