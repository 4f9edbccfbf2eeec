"""Reading raw image-text shards and turning images into model input.

Raw shards use the img2dataset layout (`KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`), read with
webdataset's tar iterators. A corrupt member or a truncated tar ends that shard's stream and
is reported, never raised. The resize/crop here is the one transform every stage shares
(autoencoder training, precompute, evaluation), so they all see the same pixels.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from webdataset.tariterators import group_by_keys, tar_file_iterator

from core import storage
from core.errors import LdmError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class ShardReadReport:
    """What went wrong while reading one shard (nothing raises; the caller decides), and
    the sha256 of the bytes read once the whole shard was read."""

    errors: list[str] = field(default_factory=list)
    sha256: str = ""


class _HashingReader:
    """A stream that hashes what is read through it."""

    def __init__(self, stream):
        self.stream, self.digest = stream, hashlib.sha256()

    def __repr__(self) -> str:  # tar errors name the stream they were reading
        return repr(self.stream)

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
MAX_EXPANDED = 10_000_000


def expand_braces(pattern: str) -> list[str]:
    """`a/{00000..00002}.tar` -> a/00000.tar, a/00001.tar, a/00002.tar (zero padding kept);
    `{x,y}` lists alternatives; several braces multiply, left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    if (numbers := _RANGE.match(body)) is not None:
        first, last = numbers.groups()
        if int(last) < int(first):
            raise LdmError(f"data.shards: the range {{{body}}} in {pattern} runs backwards")
        width = len(first) if first.startswith("0") and len(first) > 1 else 0
        choices = [f"{i:0{width}d}" for i in range(int(first), int(last) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise LdmError(
            f"data.shards: {{{body}}} in {pattern} is neither a range like {{00000..00099}} "
            "nor a list like {a,b}"
        )
    tails = expand_braces(tail)
    if len(choices) * len(tails) > MAX_EXPANDED:
        raise LdmError(f"data.shards: {pattern} expands to over {MAX_EXPANDED:,} shards")
    return [head + choice + rest for choice in choices for rest in tails]


def _read_list_file(path: str) -> list[str]:
    """A text file of shard paths or URIs, one per line (# comments, blank lines skipped);
    relative paths are relative to the file's folder."""
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise LdmError(f"data.shards: {path} is not UTF-8 text; re-save it as UTF-8") from None
    base = storage.dirname(path)
    shards = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if not entry.endswith(".tar"):
            raise LdmError(f"data.shards: {path} line {number}: {entry!r} is not a .tar shard")
        relative = not storage.is_remote(entry) and not entry.startswith("/")
        shards.append(storage.join(base, entry) if relative else entry)
    if not shards:
        raise LdmError(f"data.shards: {path} lists no shards (one .tar path or URI per line)")
    return shards


def list_shards(location: str | Path) -> list[str]:
    """The raw shards of a dataset, in order. `location` is one of: a folder or prefix (its
    `*.tar` files, sorted); a key prefix (`s3://b/laion/part-`: the tars whose names start
    with it); a brace pattern (`s3://b/laion/{00000..41455}.tar`, as many as it names, each
    of which must exist); a `.txt` file listing paths or URIs, one per line; or one tar."""
    text = str(location)
    if "{" in text:
        return expand_braces(text)
    if text.endswith(".txt"):
        if not storage.exists(text):
            raise LdmError(f"data.shards: no shard list file at {text}")
        return _read_list_file(text)
    if text.endswith(".tar") and storage.exists(text):
        return [text]
    shards = storage.list_files(text, ".tar")
    if not shards and not text.endswith("/"):
        prefix = storage.basename(text)
        siblings = storage.list_files(storage.dirname(text), ".tar") if prefix else []
        shards = [s for s in siblings if storage.basename(s).startswith(prefix)]
    if not shards:
        raise LdmError(f"no *.tar shards in {text}: run `ldm shards SRC {text}` first")
    return shards


def missing_shards(shards: list[str], found: dict[str, Any]) -> None:
    """Refuse a shard list naming shards that do not exist (a brace range past the end)."""
    missing = [s for s in shards if s not in found]
    if missing:
        first = ", ".join(missing[:3])
        raise LdmError(
            f"data.shards: {len(missing):,} of the {len(shards):,} shards it names do not exist "
            f"(e.g. {first}); fix the range or list only the shards that exist"
        )


def read_shard(path: str, report: ShardReadReport | None = None) -> Iterator[dict]:
    """Samples of one tar as dicts {'__key__', 'png'|'jpg'|..., 'txt', 'json'}: raw bytes."""
    report = report if report is not None else ShardReadReport()

    def handler(exn: Exception) -> bool:
        report.errors.append(f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return False  # a broken tar stream cannot be resynchronised: end this shard

    try:
        with storage.open_read(path) as stream:
            reader = _HashingReader(stream)
            try:
                files = tar_file_iterator(reader, handler=handler)
                files = ({**f, "__url__": path} for f in files)
                yield from group_by_keys(files, handler=handler)
            except Exception as exn:  # tarfile raises on a truncated or non-tar file's header
                handler(exn)
            while reader.read(1 << 20):  # the rest (tar padding, a broken tail) for the hash
                pass
            report.sha256 = reader.digest.hexdigest()
    except Exception as exn:  # the file could not be opened or read
        handler(exn)


def image_bytes(sample: dict) -> bytes | None:
    """The sample's encoded image, whichever extension it was stored under."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    return None


def caption_of(sample: dict) -> str:
    text = sample.get("txt", b"")
    return text.decode("utf-8").strip() if isinstance(text, bytes) else str(text).strip()


def decode_rgb(data: bytes) -> Image.Image:
    """Decode to RGB; transparent images are composited on white (emoji are RGBA)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def try_decode(data: bytes | None) -> Image.Image | None:
    if not data:
        return None
    try:
        return decode_rgb(data)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def resize_crop(
    image: Image.Image,
    resolution: int,
    center_crop: bool = True,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Resize the short side to `resolution`, crop a square: uint8 HWC array."""
    return fit_to(image, resolution, resolution, center_crop, rng)[0]


def fit_to(
    image: Image.Image,
    height: int,
    width: int,
    center_crop: bool = True,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize so the image covers `height x width`, then crop that: uint8 HWC array, and the
    crop's (top, left) in the resized image (what SDXL-style size conditioning records)."""
    w, h = image.size
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if center_crop or rng is None:
        left, top = (new_w - width) // 2, (new_h - height) // 2
    else:
        left = int(rng.integers(0, new_w - width + 1))
        top = int(rng.integers(0, new_h - height + 1))
    pixels = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.uint8)
    return pixels, (top, left)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) bucket whose aspect ratio is nearest the image's (in log ratio,
    so 2:1 and 1:2 are as far from square); ties go to the first listed."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def to_model_range(batch_uint8: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW tensor in [-1, 1], the autoencoder's input range."""
    x = (
        torch.from_numpy(np.array(batch_uint8, dtype=np.uint8, copy=True))
        .permute(0, 3, 1, 2)
        .float()
    )
    return x / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float NCHW tensor in [-1, 1] -> uint8 NHWC array."""
    x = (images.detach().float().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
