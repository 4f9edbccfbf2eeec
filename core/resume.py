"""Which config changes a UNet checkpoint can be continued under.

A resumed run is the same run: its architecture, objective, optimizer, batch and data must
be what the checkpoint was trained with. What only changes how long it runs, how often it
logs or saves, where it runs and how fast (workers for ZeRO-1/2, micro-batch size, memory
switches) may change and is reported. Every other key is refused, so a key added to the
schema later is safe until someone decides otherwise. The data is compared through the
latent cache's spec digest (dataset, encoders, resolution), not key by key.
"""

from __future__ import annotations

import json
from typing import Any

from core.config import ExperimentConfig
from core.errors import LdmError

# Keys (or sections, ending in ".") that may differ between a checkpoint and its continuation.
RESUMABLE = (
    "train.num_steps",
    "train.checkpoint_every",
    "train.log_every",
    "train.sample_every",
    "train.eval_every",
    "train.eval_num_images",
    "train.keep_last",
    "train.resume",
    "train.init_from",  # a run that continues its own checkpoint ignores it
    "train.max_failures",
    "train.preempt_grace_s",
    "train.num_workers",  # ZeRO-1/2 tags load on any world size (ZeRO-3 is refused apart)
    "train.micro_batch_size",  # the global batch stays: accumulation takes up the rest
    "train.num_loader_workers",
    "train.reduce_bucket_size",
    "train.gradient_checkpointing",
    "train.attention",
    "train.channels_last",
    "train.compile",
    "train.fused_optimizer",
    "sample.",
    "tracking.",
    "cluster.",
    "run.name",
    "run.root",
    "run.storage",
)
# Sections whose effect on training is the latent cache: compared through its spec digest.
VIA_CACHE = ("data.", "autoencoder.", "precompute.")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:24] + "…" + text[-12:]


def resume_changes(saved: ExperimentConfig, now: ExperimentConfig) -> tuple[list[str], list[str]]:
    """(allowed, refused) changes from `saved` to `now`, each as `key: old -> new`."""
    before, after = _flat(saved.to_dict()), _flat(now.to_dict())
    allowed, refused = [], []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new or _matches(key, VIA_CACHE):
            continue
        change = f"{key}: {_show(old)} -> {_show(new)}"
        (allowed if _matches(key, RESUMABLE) else refused).append(change)
    return allowed, refused


def check_resumable(
    tag: str,
    saved: ExperimentConfig,
    now: ExperimentConfig,
    saved_cache: str | None,
    cache: str,
) -> list[str]:
    """Refuse (one line) a resume that would change what is trained; returns the allowed
    changes for the caller to report. `saved_cache`/`cache`: the latent cache spec digests
    the checkpoint was trained on and this config reads (None: not recorded)."""
    allowed, refused = resume_changes(saved, now)
    if saved_cache is not None and saved_cache != cache:
        refused.insert(0, f"latent cache spec: {saved_cache[:16]} -> {cache[:16]}")
    if refused:
        shown = "; ".join(refused[:3]) + (
            f"; and {len(refused) - 3} more" if len(refused) > 3 else ""
        )
        raise LdmError(
            f"train.resume: {tag} was trained with other settings that a run cannot change "
            f"midway ({shown}): set them back to continue it, or train a new run under another "
            "run.name"
        )
    return allowed
