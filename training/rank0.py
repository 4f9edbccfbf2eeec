"""Rank-0 side effects behind one object whose methods return early on every other rank.

Every rank builds its stage's `Rank0` and calls the same methods at the same points, so the
loops never ask which rank they run on. A method marked `rank0_only` runs only where
`self.rank == 0` and returns None elsewhere; a subclass whose public method lacks the mark
fails when it is defined, so no new method can silently run on every rank.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

from core import storage
from core.config import ExperimentConfig
from core.layout import RunLayout
from training.tracking import MLflowTracker, NullTracker

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "_rank0_only"


def rank0_only(method: F) -> F:
    """Run `method` on rank 0 only (where `self.rank == 0`); return None elsewhere."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self.rank != 0:
            return None
        return method(self, *args, **kwargs)

    setattr(guarded, _MARK, True)
    return guarded  # type: ignore[return-value]


def eta(seconds: float) -> str:
    """A remaining time as the progress lines show it: h:mm:ss."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _check_guarded(cls: type) -> None:
    unguarded = [
        name
        for name, value in vars(cls).items()
        if callable(value) and not name.startswith("_") and not getattr(value, _MARK, False)
    ]
    if unguarded:
        raise TypeError(
            f"{cls.__name__}.{unguarded[0]} is not marked @rank0_only: every public method of "
            "a Rank0 runs on rank 0 only"
        )


class Rank0:
    """What only the first rank does: MLflow (through an outage-proof tracker), progress
    lines, and the stop request on the run's storage (polled, or recorded for the launcher)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_guarded(cls)

    def __init__(self, rank: int, config: ExperimentConfig, layout: RunLayout, run_id: str | None):
        """Every rank builds one; only rank 0 (with an MLflow run) opens the tracker."""
        self.rank, self.config, self.layout = rank, config, layout
        self.tracker: NullTracker = NullTracker()
        self._stop_polled = -1.0
        if rank == 0 and run_id:
            self.tracker = MLflowTracker(
                layout.tracking_uri,
                run_id,
                layout.mlflow_spool,
                max_pending=config.tracking.max_pending_records,
                flush_timeout_s=config.tracking.flush_timeout_s,
            )

    @rank0_only
    def note(self, text: str) -> None:
        print(text, flush=True)

    @rank0_only
    def stop_requested(self) -> bool:
        """Whether the launcher asked the job to stop. One rank polls the storage, at most
        once a second (on an object store each look is a request); the loop tells the rest."""
        now = time.monotonic()
        if now - self._stop_polled < 1.0:
            return False
        self._stop_polled = now
        return storage.exists(self.layout.stop_file)

    @rank0_only
    def record_stop(self, reason: str) -> None:
        """Why the ranks stopped, when a worker's own SIGTERM (not the launcher) asked: the
        launcher reads it from the stop file to say so."""
        storage.makedirs(storage.dirname(self.layout.stop_file))
        storage.write_bytes(self.layout.stop_file, reason.encode())

    @rank0_only
    def close(self) -> None:
        self.tracker.close()


_check_guarded(Rank0)
