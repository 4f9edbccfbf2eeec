"""Identities of models on disk: what a latent cache records about the encoders it was
built with, so that it is never used with other weights or another tokenizer."""

from __future__ import annotations

import hashlib
from pathlib import Path

from core.errors import LdmError


def weights_digest(folder: Path) -> str:
    """sha256 over a folder's weight files: an encoder's identity in the cache manifest."""
    files = sorted(
        p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth")
    )
    if not files:
        raise LdmError(f"no weight files in {folder}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_digest(folder: Path) -> str:
    """sha256 over a tokenizer's vocabulary and settings files."""
    files = sorted(
        p
        for p in Path(folder).iterdir()
        if p.name.startswith(("tokenizer", "vocab"))
        or p.name in ("special_tokens_map.json", "merges.txt")
    )
    if not files:
        raise LdmError(f"no tokenizer files in {folder}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
