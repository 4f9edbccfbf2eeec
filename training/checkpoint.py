"""Checkpoints of every stage: the train state, commit markers, and the one `Checkpointer`.

A tag folder (`step_00001000`) holds each engine's DeepSpeed checkpoint (at the tag's root,
or in a subfolder per engine), the stage's own files (EMA weights, config) and
`train_state.json`. It counts only once `COMMITTED.json` is in it: written by rank 0 after
every rank has finished writing, listing each file with its sha256. Resume picks the newest
committed tag and verifies the hashes before anything is unpickled (DeepSpeed's loader uses
pickle: only load what we wrote and verified).

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
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from core import storage
from core.errors import LdmError
from core.layout import CheckpointPlace
from training.rank0 import rank0_only

MARKER = "COMMITTED.json"
TRAIN_STATE = "train_state.json"
CONFIG_YAML = "config.yaml"
# Per stored model part (`models.unet.parts`: the UNet, and a text encoder trained with it):
# EMA and raw weights as safetensors, and the architecture's config.
EMA_FILE, RAW_FILE, CONFIG_FILE = "ema_{}.safetensors", "{}.safetensors", "{}_config.json"
# The engine a stage with one engine keeps at the tag's root (several engines: a subfolder each).
AT_ROOT = ""
_TAG = re.compile(r"^step_(\d{8})$")
# A file a marker may list: a name in the tag, or in one engine's subfolder of it. Markers
# are read from storage that others may write: no absolute paths, no `..`, no deeper paths.
_LISTED_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")
_RANK_FILE = re.compile(r"^zero_pp_rank_(\d+)_")


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
    settings: dict[str, Any] = field(default_factory=dict)
    """Settings a run that continues this one must share (stage 1 compares them)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The metrics last logged before the tag was saved."""
    owed: list[str] = field(default_factory=list)
    """What was due at this step and skipped because the job was stopping (`sample`,
    `eval`): the run that continues from the tag does it first."""
    rng: dict[str, Any] = field(default_factory=dict)  # per rank, see rng_state()

    def save(self, path: Path) -> None:
        storage.write_bytes(path, json.dumps(asdict(self)).encode())

    @classmethod
    def load(cls, path: str | Path) -> TrainState:
        """Read a train state where it is: a file, or an object-store URI."""
        data = json.loads(storage.read_bytes(path))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- random number generators, as JSON (no pickle in checkpoints we read back) -------------


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python, numpy, torch (and the current CUDA device's) RNG states, and `generators`."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    if generators:
        state["generators"] = {k: g.get_state().tolist() for k, g in generators.items()}
    return state


def set_rng_state(
    state: dict[str, Any], generators: dict[str, torch.Generator] | None = None
) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
    for key, generator in (generators or {}).items():
        generator.set_state(torch.tensor(state["generators"][key], dtype=torch.uint8))


# --- committed tags in a folder --------------------------------------------------------------


def commit(tag_dir: Path) -> None:
    """Seal a tag: call on one rank after a barrier that follows every rank's writes."""
    files = {
        p.relative_to(tag_dir).as_posix(): storage.sha256(p)
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != MARKER and ".tmp" not in p.name
    }
    storage.write_bytes(tag_dir / MARKER, json.dumps({"files": files}, indent=1).encode())


def is_committed(tag_dir: Path) -> bool:
    return (tag_dir / MARKER).is_file()


def committed_tags(checkpoint_dir: Path) -> list[Path]:
    """Committed tags, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    tags = [p for p in checkpoint_dir.iterdir() if _TAG.match(p.name) and is_committed(p)]
    return sorted(tags, key=lambda p: p.name)


def listed_files(tag: str | Path, marker: bytes) -> dict[str, str]:
    """The files a commit marker lists, by name and sha256, once every name is one we write."""
    try:
        files = json.loads(marker)["files"]
        names_ok = isinstance(files, dict) and all(
            isinstance(n, str) and isinstance(d, str) and _LISTED_NAME.match(n)
            for n, d in files.items()
        )
    except (ValueError, KeyError, TypeError):
        names_ok = False
    if not names_ok:
        raise LdmError(
            f"checkpoint {tag}: its {MARKER} is not one ldm wrote (unreadable, or it lists a "
            "name outside the tag such as an absolute path or `..`); delete the tag or resume "
            "from another"
        )
    return files


def verify(tag_dir: Path, names: Iterable[str] | None = None) -> None:
    """Check every file against the marker's sha256, and that the tag holds nothing the
    marker does not list, before anything is loaded. `names`: check only these files, each
    of which the marker must list (the weights a new run starts from: the optimizer shards,
    gigabytes at scale, are never read then)."""
    if not is_committed(tag_dir):
        raise LdmError(f"checkpoint {tag_dir} is incomplete (no {MARKER}); pick a committed tag")
    files = listed_files(tag_dir, (tag_dir / MARKER).read_bytes())
    if names is not None:
        files = {name: files.get(name, "") for name in names}  # unlisted: fails below
    else:
        stored = (
            p.relative_to(tag_dir).as_posix() for p in sorted(tag_dir.rglob("*")) if p.is_file()
        )
        unlisted = [name for name in stored if name != MARKER and name not in files]
        if unlisted:
            raise LdmError(
                f"checkpoint {tag_dir}: {unlisted[0]} is not listed in its {MARKER} (a file "
                "added after the tag was sealed); delete the tag or resume from another"
            )
    for name, digest in files.items():
        path = tag_dir / name
        if not path.is_file() or storage.sha256(path) != digest:
            raise LdmError(f"checkpoint {tag_dir}: {name} is missing or does not match its sha256")


def prune(checkpoint_dir: Path, keep_last: int) -> None:
    """Remove committed tags beyond the newest `keep_last` (never an uncommitted newer one)."""
    for old in committed_tags(checkpoint_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# --- committed tags on an object store -------------------------------------------------------


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
        hashes[name] = storage.sha256(path)
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
    for name in listed_files(remote_tag, marker):
        target = local_tag / name
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.get_file(storage.join(remote_tag, name), target)
    storage.write_bytes(local_tag / MARKER, marker)
    verify(local_tag)
    return local_tag


# --- where a run continues from (read on the driver too) -------------------------------------


def committed(place: CheckpointPlace) -> list[str]:
    """A stage's committed tags, oldest first: paths, or URIs on an object store."""
    if place.remote is not None:
        return remote_committed(place.remote)
    return [str(tag) for tag in committed_tags(place.local)]


def newest(place: CheckpointPlace) -> str | None:
    """The newest committed tag of a stage, or None."""
    tags = committed(place)
    return tags[-1] if tags else None


def local_tag(tag: str, place: CheckpointPlace) -> Path:
    """A committed tag as a local folder: itself, or a verified download from the store."""
    if storage.is_remote(tag):
        return pull(tag, place.local / ".pulled")
    return Path(tag)


def resolve_resume(resume: str, newest_tag: str | None) -> str | None:
    """`auto` -> `newest_tag` (the run's newest committed tag, or None); `never` -> None; a
    folder or object-store URI -> that tag, once its commit marker is there."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_tag
    if not storage.exists(storage.join(resume, MARKER)):
        raise LdmError(f"train.resume={resume}: not a committed checkpoint tag (no {MARKER})")
    return resume


# --- one rank's side of the protocol ----------------------------------------------------------


class Checkpointer:
    """One rank's view of a stage's checkpoints: collective saves sealed by a commit marker
    (uploaded to the object store when there is one), pruning, and resume (a restart's
    newest tag, remote pull, verification, elastic conversion, engines and RNG states)."""

    def __init__(self, place: CheckpointPlace, keep_last: int):
        self.place, self.keep_last = place, keep_last
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    # Resume.
    def restart_point(self, requested: str | None, newest_at_start: str | None) -> str | None:
        """Where this rank starts: `requested` (what the driver resolved), unless this job
        already committed a newer tag. After a worker failure Ray Train runs the rank again:
        it continues from the newest tag this job wrote, registered with Ray or not."""
        latest = newest(self.place)
        if latest is not None and storage.basename(latest) > storage.basename(
            newest_at_start or ""
        ):
            return latest
        return requested

    def open(self, tag: str) -> tuple[Path, TrainState]:
        """A committed tag as a verified local folder, and its train state. On an object store
        every rank takes its own copy: ranks may be on different nodes."""
        if storage.is_remote(tag):
            local = pull(tag, self.place.local / ".pulled" / f"rank{self.rank}")
        else:
            local = Path(tag)
            verify(local)  # before DeepSpeed unpickles anything
        return local, TrainState.load(local / TRAIN_STATE)

    def load_engines(self, tag_dir: Path, engines: dict[str, Any], elastic: bool = False) -> None:
        """Load each engine's state. `elastic`: the tag was written by another world size; its
        ZeRO-1/2 shards go through DeepSpeed's universal format (the engines must be built
        with `load_universal`)."""
        from training.engine import load_engine  # noqa: PLC0415 - DeepSpeed: ranks only, not drivers

        started = time.perf_counter()
        for folder, engine in engines.items():
            source = tag_dir / folder if folder else tag_dir
            if not elastic:
                load_engine(engine, source)
                continue
            remote = self.place.remote is not None
            # No shared folder on an object store: each rank converts its own copy.
            scratch = self.place.local / ".universal" / (f"rank{self.rank}" if remote else "")
            universal = scratch / tag_dir.name / (folder or "engine")
            if remote:
                _convert(source, universal)
            else:
                self._convert_on_rank0(source, universal)
                dist.barrier()
            load_engine(engine, universal)
            if remote:
                shutil.rmtree(scratch, ignore_errors=True)
            else:
                dist.barrier()
                self._remove_on_rank0(scratch)
        self._note(f"{tag_dir.name} loaded in {time.perf_counter() - started:.2f} s")

    def restore_rng(self, state: TrainState, generators: dict[str, torch.Generator] | None) -> bool:
        """This rank's saved RNG states; False when the tag has none for it (a rank an elastic
        restart added), which the caller seeds afresh."""
        saved = state.rng.get(str(self.rank))
        if saved is None:
            return False
        set_rng_state(saved, generators)
        return True

    # Save.
    def save(
        self,
        step: int,
        engines: dict[str, Any],
        state: TrainState,
        write_files: Callable[[Path], None],
        generators: dict[str, torch.Generator] | None = None,
    ) -> str:
        """Collective: every rank writes its engines' shards and RNG states, `write_files`
        (rank 0's own files: it is called on every rank, and returns at once off rank 0),
        then rank 0 seals the tag after a barrier. Returns the tag (path or URI)."""
        tag = tag_for(step)
        tag_dir = self.place.local / tag
        remote = self.place.remote
        if remote is not None:  # staging is per node: each rank clears what a crash left there
            shutil.rmtree(tag_dir, ignore_errors=True)
        else:
            self._remove_on_rank0(tag_dir)  # a half-written tag, or one of an abandoned branch
        dist.barrier()
        rngs: list[dict] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(rngs, rng_state(generators))
        state.step, state.world_size = step, self.world
        state.rng = {str(r): s for r, s in enumerate(rngs)}
        from training.engine import save_engine  # noqa: PLC0415 - DeepSpeed: ranks only, not drivers

        for folder, engine in engines.items():
            save_engine(engine, tag_dir / folder if folder else tag_dir)
        write_files(tag_dir)
        self._write_state(tag_dir, state)
        dist.barrier()  # every rank's files are on disk before the tag is sealed
        if remote is not None:
            remote_tag = storage.join(remote, tag)
            gathered: list[dict] = [None] * self.world  # type: ignore[list-item]
            dist.all_gather_object(gathered, push(tag_dir, remote_tag, self.rank))
            self._commit_remote(remote_tag, {k: v for h in gathered for k, v in h.items()})
            shutil.rmtree(tag_dir, ignore_errors=True)
        else:
            self._commit(tag_dir)
        dist.barrier()
        return storage.join(remote, tag) if remote is not None else str(tag_dir)

    # Rank 0's parts of the protocol.
    @rank0_only
    def _write_state(self, tag_dir: Path, state: TrainState) -> None:
        tag_dir.mkdir(parents=True, exist_ok=True)
        state.save(tag_dir / TRAIN_STATE)

    @rank0_only
    def _commit(self, tag_dir: Path) -> None:
        commit(tag_dir)
        prune(tag_dir.parent, self.keep_last)

    @rank0_only
    def _commit_remote(self, remote_tag: str, hashes: dict[str, str]) -> None:
        commit_remote(remote_tag, hashes)
        prune_remote(storage.dirname(remote_tag), self.keep_last)

    @rank0_only
    def _remove_on_rank0(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    @rank0_only
    def _convert_on_rank0(self, source: Path, out: Path) -> None:
        _convert(source, out)

    @rank0_only
    def _note(self, text: str) -> None:
        print(f"checkpoint: {text}", flush=True)


def _convert(source: Path, out: Path) -> None:
    started = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    from training.engine import to_universal  # noqa: PLC0415 - DeepSpeed: ranks only, not drivers

    to_universal(source, out)
    seconds = time.perf_counter() - started
    print(f"checkpoint: {source} converted for a new world size in {seconds:.1f} s", flush=True)
