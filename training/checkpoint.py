"""Checkpoint tags: commit markers, verification, the train state and RNG states.

A tag folder (`step_00001000`) counts only once `COMMITTED.json` is in it: written atomically
by rank 0 after every rank has finished writing, listing each file with its sha256. Resume
picks the newest committed tag, and verifies the hashes before anything is unpickled
(DeepSpeed's loader uses pickle: only load what we wrote and verified).

On an object store (`run.storage=s3://...`) the same protocol runs over uploads: ranks write
a tag into a local staging folder, each uploads the files it wrote, and rank 0 uploads the
marker (with every rank's hashes) last. Resuming downloads a committed tag into staging and
verifies it there, so any node can resume a run.
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

from data_pipeline import storage
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
    def load(cls, path: str | Path) -> TrainState:
        """Read a train state where it is: a file, or an object-store URI."""
        data = json.loads(storage.read_bytes(path))
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


def resolve_resume(resume: str, newest: str | None) -> str | None:
    """`auto` -> `newest` (the run's newest committed tag, or None); `never` -> None; a
    folder or object-store URI -> that tag, once its commit marker is there."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest
    if not storage.exists(storage.join(resume, MARKER)):
        raise LdmError(f"train.resume={resume}: not a committed checkpoint tag (no {MARKER})")
    return resume


# --- tags on an object store -------------------------------------------------------------

_RANK_FILE = re.compile(r"^zero_pp_rank_(\d+)_")


def owned_files(local_tag: Path, rank: int) -> list[Path]:
    """The files of a staged tag that `rank` wrote: DeepSpeed names per-rank shards
    `zero_pp_rank_<r>_*`; everything else (model states, EMA, train state) is rank 0's."""
    owned = []
    for path in sorted(local_tag.rglob("*")):
        if not path.is_file() or ".tmp" in path.name:
            continue
        match = _RANK_FILE.match(path.name)
        if (int(match.group(1)) if match else 0) == rank:
            owned.append(path)
    return owned


def push(local_tag: Path, remote_tag: str, rank: int) -> dict[str, str]:
    """Upload this rank's files of a staged tag; returns their sha256 by relative name.

    The local copies are removed once uploaded: staging holds at most the tag being saved.
    """
    hashes = {}
    for path in owned_files(local_tag, rank):
        name = path.relative_to(local_tag).as_posix()
        hashes[name] = file_sha256(path)
        storage.put_file(path, storage.join(remote_tag, name))
    return hashes


def commit_remote(remote_tag: str, hashes: dict[str, str]) -> None:
    """Seal an uploaded tag: call once every rank's `push` has returned."""
    marker = json.dumps({"files": dict(sorted(hashes.items()))}, indent=1).encode()
    storage.write_bytes(storage.join(remote_tag, MARKER), marker)


def remote_committed(remote_dir: str) -> list[str]:
    """Committed tags under an object-store prefix, oldest first (their URIs)."""
    markers = storage.glob(storage.join(remote_dir, "step_*", MARKER))
    tags = [storage.dirname(m) for m in markers]
    return sorted((t for t in tags if _TAG.match(storage.basename(t))), key=storage.basename)


def remote_latest(remote_dir: str) -> str | None:
    tags = remote_committed(remote_dir)
    return tags[-1] if tags else None


def prune_remote(remote_dir: str, keep_last: int) -> None:
    for old in remote_committed(remote_dir)[:-keep_last]:
        # The marker goes first: a tag half deleted is never taken for a committed one.
        storage.remove(storage.join(old, MARKER))
        storage.remove_tree(old)


def pull(remote_tag: str, local_dir: Path) -> Path:
    """Download a committed tag into `local_dir/<tag>` and verify it; returns the local tag.

    A complete, verified copy already there is reused (a restart on the same node).
    """
    local_tag = local_dir / storage.basename(remote_tag)
    marker = storage.read_bytes(storage.join(remote_tag, MARKER))
    if (local_tag / MARKER).is_file() and (local_tag / MARKER).read_bytes() == marker:
        try:
            verify(local_tag)
            return local_tag
        except LdmError:
            pass
    shutil.rmtree(local_tag, ignore_errors=True)
    local_tag.mkdir(parents=True)
    for name in json.loads(marker)["files"]:
        target = local_tag / name
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.get_file(storage.join(remote_tag, name), target)
    write_atomic(local_tag / MARKER, marker)
    verify(local_tag)
    return local_tag
