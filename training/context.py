"""What a stage's launcher hands each rank: the one argument of every rank function.

The launcher (`orchestrator.launcher`) starts the process group (Ray Train workers, or one
rank in its own process), then calls the stage's rank function with a `RankContext`. Rank
code knows nothing of Ray: `report` is how it tells the launcher about a committed
checkpoint, and `data` holds the large inputs the launcher passed through Ray's object store
(or by reference, in process).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.config import ExperimentConfig
from core.layout import RunLayout


@dataclass
class RankContext:
    config: ExperimentConfig
    layout: RunLayout
    run_id: str | None
    """The MLflow run rank 0 logs into (None: no tracking)."""
    args: dict[str, Any] = field(default_factory=dict)
    """The stage's own arguments, the same on every rank (e.g. the tag to resume from)."""
    data: dict[str, Any] = field(default_factory=dict)
    """Large inputs (e.g. stage 1's images), shared by the ranks of a node."""
    report: Callable[[dict[str, float], str | None], None] = lambda metrics, tag: None
    """Called after each committed checkpoint with the latest metrics and the tag."""
