"""Reading raw image-text shards and turning images into model input.

Raw shards use the img2dataset layout (`KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`), read with
webdataset's tar iterators. A corrupt member or a truncated tar ends that shard's stream and
is reported, never raised. The resize/crop here is the one transform every stage shares
(autoencoder training, precompute, evaluation), so they all see the same pixels.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


def list_shards(location: str | Path) -> list[str]:
    """Sorted `*.tar` files of a folder or prefix (or a single tar), local or remote."""
    text = str(location)
    if text.endswith(".tar") and storage.exists(text):
        return [text]
    shards = storage.list_files(text, ".tar")
    if not shards:
        raise LdmError(f"no *.tar shards in {text}: run `ldm shards SRC {text}` first")
    return shards


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
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if center_crop or rng is None:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    else:
        left = int(rng.integers(0, new_w - resolution + 1))
        top = int(rng.integers(0, new_h - resolution + 1))
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


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
