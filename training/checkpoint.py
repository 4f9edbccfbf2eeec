"""Checkpoint tags: commit markers, verification, the train state and RNG states.

A tag folder (`step_00001000`) counts only once `COMMITTED.json` is in it: written atomically
by rank 0 after every rank has finished writing, listing each file with its sha256. Resume
picks the newest committed tag, and verifies the hashes before anything is unpickled
(DeepSpeed's loader uses pickle: only load what we wrote and verified).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.cache import file_sha256, write_atomic
from orchestrator.errors import LdmError

MARKER = "COMMITTED.json"
TRAIN_STATE = "train_state.json"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resumed run needs to be the same run."""

    step: int = 0
    samples_seen: int = 0
    data_cursor: dict[str, Any] = field(default_factory=dict)  # data_pipeline.stream.DataCursor
    world_size: int = 0  # ranks that wrote the tag
    mlflow_run_id: str | None = None
    config_digest: str = ""
    rng: dict[str, Any] = field(default_factory=dict)  # per rank, see rng_state()

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self)).encode())

    @classmethod
    def load(cls, path: Path) -> TrainState:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as JSON (no pickle in checkpoints we read back)."""
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def commit(tag_dir: Path) -> None:
    """Seal a tag: call on one rank after a barrier that follows every rank's writes."""
    files = {
        p.relative_to(tag_dir).as_posix(): file_sha256(p)
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != MARKER and ".tmp" not in p.name
    }
    write_atomic(tag_dir / MARKER, json.dumps({"files": files}, indent=1).encode())


def is_committed(tag_dir: Path) -> bool:
    return (tag_dir / MARKER).is_file()


def committed_tags(checkpoint_dir: Path) -> list[Path]:
    """Committed tags, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    tags = [p for p in checkpoint_dir.iterdir() if _TAG.match(p.name) and is_committed(p)]
    return sorted(tags, key=lambda p: p.name)


def latest_committed(checkpoint_dir: Path) -> Path | None:
    tags = committed_tags(checkpoint_dir)
    return tags[-1] if tags else None


def verify(tag_dir: Path) -> None:
    """Check every file against the marker's sha256 before anything is loaded."""
    if not is_committed(tag_dir):
        raise LdmError(f"checkpoint {tag_dir} is incomplete (no {MARKER}); pick a committed tag")
    files = json.loads((tag_dir / MARKER).read_text())["files"]
    for name, digest in files.items():
        path = tag_dir / name
        if not path.is_file() or file_sha256(path) != digest:
            raise LdmError(f"checkpoint {tag_dir}: {name} is missing or does not match its sha256")


def prune(checkpoint_dir: Path, keep_last: int) -> None:
    """Remove committed tags beyond the newest `keep_last` (never an uncommitted newer one)."""
    for old in committed_tags(checkpoint_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(resume: str, checkpoint_dir: Path) -> Path | None:
    """`auto` -> newest committed tag or None; `never` -> None; a path -> that tag."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_committed(checkpoint_dir)
    tag = Path(resume)
    if not is_committed(tag):
        raise LdmError(f"train.resume={resume}: not a committed checkpoint tag (no {MARKER})")
    return tag
