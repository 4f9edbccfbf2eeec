"""`ldm drain`: what a node runs when it is about to go away (a pod's preStop hook, a cloud's
preemption notice, a Slurm `--signal`).

A pod's SIGTERM reaches only its first process (the shell that runs `ray start --block`),
which neither handles nor forwards it: the training ranks on the node would be SIGKILLed at
the end of the grace period with nothing saved. `drain` sends SIGTERM to the ldm processes
on this machine itself (the stages' drivers and Ray Train workers, which then save a
committed checkpoint and stop; see `core.signals`) and waits for them to exit, at most the
grace period.
"""

from __future__ import annotations

import os
import signal
import time

import psutil

# Ray titles its worker processes "ray::RayTrainWorker..."; a stage's driver is the `ldm`
# command line (or `python -m orchestrator.cli`) running a stage that saves on SIGTERM.
_WORKER_MARK = "RayTrainWorker"
_DRIVER_ENTRIES = ("orchestrator.cli", "ldm")
_STOPPABLE_STAGES = ("train", "autoencoder")


def _is_ldm_process(cmdline: list[str]) -> bool:
    if any(_WORKER_MARK in part for part in cmdline):
        return True
    for i, part in enumerate(cmdline[:-1]):
        entry = part == "orchestrator.cli" or os.path.basename(part) in _DRIVER_ENTRIES
        if entry and cmdline[i + 1] in _STOPPABLE_STAGES:
            return True
    return False


def targets(under: int | None = None) -> list[psutil.Process]:
    """The ldm drivers and Ray Train workers on this machine (only descendants of `under`,
    when given), this process excluded."""
    if under is not None:
        candidates = psutil.Process(under).children(recursive=True)
    else:
        candidates = list(psutil.process_iter())
    found = []
    for proc in candidates:
        try:
            if proc.pid != os.getpid() and _is_ldm_process(proc.cmdline()):
                found.append(proc)
        except psutil.Error:  # gone, or not ours to look at
            pass
    return found


def drain(grace_s: float, under: int | None = None) -> tuple[int, int]:
    """SIGTERM every target, then wait up to `grace_s` for them to exit; returns (signalled,
    still running)."""
    procs = targets(under)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    deadline = time.monotonic() + grace_s
    _, alive = psutil.wait_procs(procs, timeout=max(0.0, deadline - time.monotonic()))
    return len(procs), len(alive)
