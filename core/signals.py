"""This process's stop request: set by its SIGTERM handler, read by the rank loops.

A SIGTERM to a rank's own process (a preempted node, a pod's preStop `ldm drain`) must not
kill it mid-step: while a rank function runs here (`arm`), the handler records the request
instead (`on_signal`), every rank then saves a committed checkpoint and the job stops (see
`training.preemption.agree_to_stop`). The handler itself belongs to whoever runs the process
(Ray installs one in every worker; `orchestrator.cluster.on_worker_start` wraps it). Stdlib
only: every Ray worker process imports it at start.
"""

from __future__ import annotations

import os
import signal
import threading

_lock = threading.Lock()
_grace_s: float | None = None  # set while a rank function runs in this process
_requested: str | None = None
_timer: threading.Timer | None = None


def arm(grace_s: float) -> None:
    """A rank function starts in this process: a SIGTERM now asks it to save and stop."""
    global _grace_s, _requested
    with _lock:
        _grace_s, _requested = grace_s, None


def disarm() -> None:
    """The rank function ended: SIGTERM is the process's own business again."""
    global _grace_s, _timer
    with _lock:
        _grace_s = None
        if _timer is not None:
            _timer.cancel()
            _timer = None


def on_signal(name: str) -> bool:
    """Called by the process's SIGTERM handler. True: the running rank will save and stop
    (the handler returns and the process lives on); False: no rank runs here, or this is a
    second signal, so the handler's usual action (exit) should follow. Once the grace period
    runs out the process signals itself again, so a save that hangs cannot outlive it."""
    global _requested, _timer
    with _lock:
        if _grace_s is None or _requested is not None:
            return False
        _requested = name
        _timer = threading.Timer(_grace_s, os.kill, (os.getpid(), signal.SIGTERM))
        _timer.daemon = True
        _timer.start()
        return True


def requested() -> str | None:
    """The signal this process received while a rank ran, if any."""
    return _requested
