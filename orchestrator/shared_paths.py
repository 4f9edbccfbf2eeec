"""What the nodes of a cluster must be able to read: a stage's paths, checked against where
the cluster's nodes are.

A Ray cluster whose nodes are other hosts does not share the disk of the machine that
submits the job or runs its driver: a local path in the config (the shards, the latent
cache, the run's storage, the autoencoder, a local MLflow store) would be a
FileNotFoundError on another node, or worse, a checkpoint only one node can see. Such a
config is refused before anything starts, with one line that names the keys, unless
`cluster.shared_filesystem` says every node mounts those paths (NFS, Lustre, a shared
volume). A cluster whose every node is this machine (an embedded Ray, local test nodes)
shares its disk.
"""

from __future__ import annotations

import psutil

from core import storage
from core.config import ExperimentConfig
from core.layout import RunLayout

_BUILTIN_TEXT_ENCODERS = ("minilm", "ldmbert")


def node_addresses(nodes: list[dict[str, float]]) -> set[str]:
    """The nodes' addresses, from the `node:<address>` resource Ray gives every node."""
    return {
        key.removeprefix("node:")
        for node in nodes
        for key in node
        if key.startswith("node:") and not key.startswith("node:__")
    }


def this_machine_addresses() -> set[str]:
    """Every address of this machine's network interfaces."""
    return {
        a.address.split("%")[0] for addresses in psutil.net_if_addrs().values() for a in addresses
    }


def _local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def read_by_every_node(config: ExperimentConfig, stage: str) -> list[tuple[str, str]]:
    """(key, location) of the local paths the nodes running `stage`'s workers or actors read
    or write (object-store URIs and an MLflow server need no shared disk)."""
    layout = RunLayout.of(config)
    storage_key = "run.storage" if config.run.storage else "run.root"
    # A local autoencoder is `autoencoder.pretrained` or published in the run folder.
    autoencoder = (
        "autoencoder.pretrained" if config.autoencoder.pretrained else "run.root",
        layout.autoencoder_dir,
    )
    cache = (
        ("precompute.cache_dir", config.precompute.cache_dir)
        if config.precompute.cache_dir
        else ("run.root", config.run.root)  # the default cache lies under it
    )
    shards = ("data.shards", config.data.shards)
    run_storage = (storage_key, layout.storage_dir)
    tracking = ("tracking.uri", layout.tracking_uri)
    text_encoder = ("text_encoder.name_or_path", config.text_encoder.name_or_path)
    init_from = ("train.init_from", config.train.init_from)  # every rank reads the weights
    wanted = {
        "autoencoder": [
            shards,
            run_storage,
            ("autoencoder.lpips_path", config.autoencoder.lpips_path),
            tracking,
        ],
        "precompute": [shards, cache, autoencoder, text_encoder],
        "train": [cache, autoencoder, run_storage, tracking, text_encoder, init_from],
    }.get(stage, [])
    found: dict[str, str] = {}
    for key, location in wanted:
        if location is None or key in found or location in _BUILTIN_TEXT_ENCODERS:
            continue  # a built-in text encoder ships inside a package installed on every node
        local = _local_store(location) if key == "tracking.uri" else not storage.is_remote(location)
        if local:
            found[key] = location
    return sorted(found.items())


def unshared_paths_problem(
    config: ExperimentConfig, stage: str, nodes: list[dict[str, float]]
) -> str | None:
    """Why `stage` cannot run on a cluster of `nodes` (each node's Ray resources) with this
    config's local paths, or None."""
    if config.cluster.shared_filesystem:
        return None
    elsewhere = sorted(node_addresses(nodes) - this_machine_addresses())
    if not elsewhere:
        return None
    local = read_by_every_node(config, stage)
    if not local:
        return None
    named = ", ".join(f"{key}={location}" for key, location in local)
    hosts = ", ".join(elsewhere[:3]) + (
        f" and {len(elsewhere) - 3} more" if len(elsewhere) > 3 else ""
    )
    return (
        f"{stage}: {named}: on this machine's disk, which the Ray cluster's node(s) at {hosts} "
        "cannot read; put data, caches and run.storage on object storage (s3://...) and track "
        "with an MLflow server (tracking.uri=http://...), or set cluster.shared_filesystem=true "
        "if every node mounts these paths"
    )
