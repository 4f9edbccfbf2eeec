"""Where one run's files live: computed once, on the driver, from the config.

The config says what to do; `RunLayout` says where: the run folder, the checkpoints of each
stage (files, or an object-store prefix staged through a local folder), the stop request
that SIGTERM writes, the published autoencoder, MLflow's store and its local spool. The
driver builds it (reading `MLFLOW_TRACKING_URI` there, once) and hands the same object to
every rank, so no worker derives a location from its own environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core import storage
from core.config import ExperimentConfig

# Folder names under a run's storage: the UNet stage's and stage 1's checkpoint tags.
CHECKPOINTS = "checkpoints"
AUTOENCODER_CHECKPOINTS = "autoencoder-checkpoints"


# What marks a diffusers pipeline folder (such as `ldm export` writes): its models are in
# subfolders (`vae/`, `unet/`, `text_encoder/`, `tokenizer/`).
PIPELINE_INDEX = "model_index.json"


def model_folder(location: str, component: str) -> str:
    """`location` as the folder of one model: a diffusers pipeline folder (or object-store
    prefix) stands for its `component` subfolder, any other folder for itself."""
    if storage.exists(storage.join(location, PIPELINE_INDEX)):
        return storage.join(location, component)
    return location


@dataclass(frozen=True)
class CheckpointPlace:
    """Where one stage's checkpoint tags live."""

    local: Path
    """The tags themselves, or (with `remote`) the staging folder ranks write tags into
    before uploading them."""
    remote: str | None
    """Object-store prefix of the tags (`s3://...`); None when the tags are files."""

    @property
    def root(self) -> str:
        """Where committed tags are found: the object-store prefix or the folder."""
        return self.remote if self.remote is not None else str(self.local)

    def tag(self, name: str) -> str:
        """A tag's location (URI or path) by name."""
        return storage.join(self.root, name)


@dataclass(frozen=True)
class RunLayout:
    """Every location of one run, resolved (local paths are absolute after config loading)."""

    run_dir: Path
    """`<run.root>/<run.name>`: the run's local outputs."""
    storage_dir: str
    """The run's folder or URI on `run.storage` (its run folder when that is unset)."""
    checkpoints: CheckpointPlace
    """The UNet stage's checkpoint tags."""
    autoencoder_checkpoints: CheckpointPlace
    """Stage 1's checkpoint tags."""
    stop_file: str
    """Written by the launcher on SIGTERM; rank 0 polls it (so it lives on the storage)."""
    autoencoder_dir: str
    """The published stage-1 autoencoder (or `autoencoder.pretrained`, a pipeline folder's
    `vae/`): a folder, or a prefix of `run.storage` when that is an object store (every node
    of a cluster reads it there)."""
    tracking_uri: str
    """MLflow: `tracking.uri`, else `$MLFLOW_TRACKING_URI` on the driver, else SQLite under
    `run.root`."""
    mlflow_artifacts: Path
    """Artifact root of a local MLflow store (`<run.root>/mlartifacts`)."""
    mlflow_spool: Path
    """Rank 0's write-ahead log of records MLflow has not taken yet."""

    @classmethod
    def of(cls, config: ExperimentConfig, environ: Mapping[str, str] = os.environ) -> RunLayout:
        """The layout of `config`'s run, read on the driver."""
        run_dir = Path(config.run.root) / config.run.name
        store = config.run.storage
        if store is None:
            storage_dir = str(run_dir)
        elif storage.is_remote(store):
            storage_dir = f"{store.rstrip('/')}/{config.run.name}"
        else:
            storage_dir = str(Path(store) / config.run.name)
        remote = storage.is_remote(storage_dir)

        def place(folder: str) -> CheckpointPlace:
            if remote:  # ranks stage tags on their node, then upload them
                return CheckpointPlace(
                    run_dir / "staging" / folder, storage.join(storage_dir, folder)
                )
            return CheckpointPlace(Path(storage_dir) / folder, None)

        pretrained = config.autoencoder.pretrained
        published = storage.join(storage_dir, "autoencoder") if remote else run_dir / "autoencoder"
        return cls(
            run_dir=run_dir,
            storage_dir=storage_dir,
            checkpoints=place(CHECKPOINTS),
            autoencoder_checkpoints=place(AUTOENCODER_CHECKPOINTS),
            stop_file=storage.join(storage_dir, "STOP_REQUESTED"),
            autoencoder_dir=model_folder(pretrained, "vae") if pretrained else str(published),
            tracking_uri=config.tracking.uri
            or environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{Path(config.run.root).resolve()}/mlflow.db",
            mlflow_artifacts=Path(config.run.root) / "mlartifacts",
            mlflow_spool=run_dir / "mlflow-spool",
        )
