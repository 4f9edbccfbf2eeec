"""`ldm shards`: turn a folder of captioned images into webdataset tar shards.

The output has img2dataset's layout, so shards made here and shards downloaded with
img2dataset read the same way: `out/00000.tar`, ... holding `KEY.png|jpg|webp` (the
original bytes), `KEY.txt` (the caption) and `KEY.json` (metadata) per sample, members
grouped by key. Captions come from a sidecar `NAME.txt` beside each image, or from one
`captions.jsonl` / `captions.csv` in the folder. Every shard is written under a temporary
name and renamed when complete, and `_summary.json` is written last, so a folder with
shards but no summary is an interrupted run. Output is byte-for-byte reproducible.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from core.errors import LdmError
from data_pipeline.images import try_decode

SOURCE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SUMMARY = "_summary.json"
PARTIAL = ".partial"
FILE_COLUMNS = ("file", "image", "filename", "file_name")
CAPTION_COLUMNS = ("caption", "text")
_JSONL_EXAMPLE = '{"file": "cat.png", "caption": "a cat"}'
# The member extension by what the bytes really are, never by the source file's suffix.
_FORMAT_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


@dataclass
class ShardsSummary:
    """What `write_shards` wrote: counts, the shard files and the images it left out."""

    num_samples: int
    num_shards: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _list_images(src: Path) -> list[str]:
    return sorted(
        p.name
        for p in src.iterdir()
        if p.suffix.lower() in SOURCE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _pick(fields: list[str], names: tuple[str, ...]) -> str | None:
    lowered = {f.strip().lower(): f for f in fields if f}
    return next((lowered[n] for n in names if n in lowered), None)


def _read_captions_jsonl(path: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    with open(path, encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise LdmError(
                    f"{path} line {number} is not valid JSON; fix or remove it"
                ) from None
            if not isinstance(row, dict):
                raise LdmError(f"{path} line {number}: expected an object like {_JSONL_EXAMPLE}")
            file_key = _pick(list(row), FILE_COLUMNS)
            caption_key = _pick(list(row), CAPTION_COLUMNS)
            if file_key is None or caption_key is None:
                raise LdmError(
                    f"{path} line {number}: needs a file key (file/image) and a caption key "
                    f"(caption/text), e.g. {_JSONL_EXAMPLE}"
                )
            captions[str(row[file_key]).strip()] = str(row[caption_key] or "")
    return captions


def _read_captions_csv(path: Path) -> dict[str, str]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        fields = list(reader.fieldnames or [])
        file_key, caption_key = _pick(fields, FILE_COLUMNS), _pick(fields, CAPTION_COLUMNS)
        if file_key is None or caption_key is None:
            raise LdmError(
                f"{path}: the header needs a file column (file/image) and a caption column "
                f"(caption/text); found: {', '.join(fields) or 'no header'}"
            )
        return {
            str(row[file_key] or "").strip(): str(row[caption_key] or "")
            for row in reader
            if row.get(file_key)
        }


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise LdmError(f"caption file {path} is not UTF-8 text; re-save it as UTF-8") from None


def collect_captions(src: Path, images: list[str]) -> dict[str, str]:
    """Caption of each image: its sidecar `NAME.txt` (or `NAME.png.txt`), else the captions file.

    Raises an LdmError naming the first few images that have no (non-empty) caption.
    """
    table_paths = [src / n for n in ("captions.jsonl", "captions.csv") if (src / n).is_file()]
    if len(table_paths) > 1:
        raise LdmError(f"{src} has both captions.jsonl and captions.csv; keep only one of them")
    table: dict[str, str] = {}
    if table_paths:
        path = table_paths[0]
        try:
            if path.suffix == ".jsonl":
                table = _read_captions_jsonl(path)
            else:
                table = _read_captions_csv(path)
        except UnicodeDecodeError:
            raise LdmError(f"{path} is not UTF-8 text; re-save it as UTF-8") from None
        except csv.Error as exn:
            raise LdmError(f"{path} is not a readable CSV file ({exn}); fix it") from None
        table = {name.removeprefix("./"): caption for name, caption in table.items()}
    captions: dict[str, str] = {}
    missing: list[str] = []
    for name in images:
        caption = None
        for sidecar in (src / (Path(name).stem + ".txt"), src / (name + ".txt")):
            if sidecar.is_file():
                caption = _read_text(sidecar)
                break
        if caption is None:
            caption = table.get(name)
        caption = _one_line(caption or "")
        if caption:
            captions[name] = caption
        else:
            missing.append(name)
    if missing:
        first = ", ".join(repr(n) for n in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LdmError(
            f"{len(missing)} of {len(images)} images in {src} have no caption ({first}{more}): "
            f"add a NAME.txt beside each image, or a captions.jsonl with lines like "
            f"{_JSONL_EXAMPLE}, or a captions.csv with file,caption columns"
        )
    return captions


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LdmError(f"output {out} is a file, not a folder; pick another output folder")
    if not out.is_dir():
        return
    existing = sorted(p.name for p in out.glob("*.tar"))
    if (out / SUMMARY).exists() or existing:
        state = "shards" if (out / SUMMARY).exists() else "shards of an interrupted run"
        listed = f" ({', '.join(existing[:2])}{', ...' if len(existing) > 2 else ''})"
        raise LdmError(
            f"output {out} already holds {state}{listed if existing else ''}; remove it or "
            "pick another output folder (shards of different runs are never mixed)"
        )


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so the same input always gives the same shard bytes.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _image_format(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + PARTIAL)
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _ShardWriter:
    """Opens shard files on demand, each under a temporary name until it is complete."""

    def __init__(self, out: Path, shard_width: int) -> None:
        self.out, self.shard_width = out, shard_width
        self.tar: tarfile.TarFile | None = None
        self.path: Path | None = None
        self.shards: list[Path] = []

    def open(self, shard: int) -> None:
        self.path = self.out / f"{shard:0{self.shard_width}d}.tar"
        self.tar = tarfile.open(self.path.with_name(self.path.name + PARTIAL), "w")

    def add(self, key: str, ext: str, image: bytes, caption: str, meta: dict) -> None:
        _add_member(self.tar, f"{key}.{ext}", image)
        _add_member(self.tar, f"{key}.txt", caption.encode("utf-8"))
        _add_member(self.tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            os.replace(self.path.with_name(self.path.name + PARTIAL), self.path)
            self.shards.append(self.path)
            self.tar = None

    def abandon(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.path.with_name(self.path.name + PARTIAL).unlink(missing_ok=True)
            self.tar = None


def write_shards(
    src: Path, out: Path, samples_per_shard: int = 256, progress: bool = True
) -> ShardsSummary:
    """Write the captioned images of `src` (sorted by file name) as tar shards into `out`.

    Undecodable images are skipped and listed in the summary; every other problem raises
    an LdmError before any shard is written. Subfolders of `src` are not searched.
    """
    src, out = Path(src), Path(out)
    if samples_per_shard < 1:
        raise LdmError(f"samples per shard must be at least 1, got {samples_per_shard}")
    if not src.is_dir():
        what = "is not a folder" if src.exists() else "does not exist"
        raise LdmError(f"image folder {src} {what}; pass the folder holding your images")
    images = _list_images(src)
    if not images:
        raise LdmError(
            f"no images in {src}: expected .png, .jpg, .jpeg or .webp files directly in it "
            "(subfolders are not searched)"
        )
    captions = collect_captions(src, images)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(f"*.tar{PARTIAL}"):
        leftover.unlink()  # our own temporary files from a run that was killed

    # img2dataset's key: shard number then index in the shard, each zero-padded.
    index_width = len(str(samples_per_shard - 1))
    shard_width = max(5, len(str(math.ceil(len(images) / samples_per_shard) - 1)))
    writer = _ShardWriter(out, shard_width)
    skipped: list[tuple[str, str]] = []
    written = 0
    try:
        for name in tqdm(images, desc="shards", unit="img", disable=not progress, file=sys.stderr):
            data = (src / name).read_bytes()
            decoded = try_decode(data)
            fmt = _image_format(data) if decoded is not None else None
            if decoded is None:
                skipped.append((name, "not a decodable image"))
                continue
            if fmt not in _FORMAT_EXT:
                skipped.append((name, f"{fmt} images are not supported; convert it to png or jpg"))
                continue
            shard, index = divmod(written, samples_per_shard)
            if index == 0:
                writer.close()
                writer.open(shard)
            key = f"{shard:0{shard_width}d}{index:0{index_width}d}"
            width, height = decoded.size
            meta = {
                "key": key,
                "caption": captions[name],
                "status": "success",
                "file_name": name,
                "width": width,
                "height": height,
                "original_width": width,
                "original_height": height,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            writer.add(key, _FORMAT_EXT[fmt], data, captions[name], meta)
            written += 1
        writer.close()
    except BaseException:
        writer.abandon()
        raise
    if written == 0:
        first = ", ".join(f"{n!r}" for n, _ in skipped[:3])
        raise LdmError(f"none of the {len(images)} images in {src} could be read ({first} ...)")
    summary = ShardsSummary(written, len(writer.shards), skipped, writer.shards)
    record = {
        "source": str(src),
        "num_samples": written,
        "num_shards": len(writer.shards),
        "samples_per_shard": samples_per_shard,
        "shards": [p.name for p in writer.shards],
        "skipped": [{"file": n, "reason": r} for n, r in skipped],
    }
    _write_atomic(out / SUMMARY, (json.dumps(record, indent=1, ensure_ascii=False) + "\n").encode())
    return summary
