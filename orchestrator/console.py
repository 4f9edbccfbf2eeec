"""What a stage shows: on the console the lines a user acts on, everything in the run's log.

A stage run from the command line runs inside `stage_console`: the process's stdout and
stderr (file descriptors 1 and 2, so Ray's, DeepSpeed's and the workers' output too, and C
libraries' lines) go through a pipe. Every line is appended to a log file in the run folder,
whose path is printed first; the console gets only ldm's own lines (`train: ...`,
`tracking: ...` on MLflow outages, `ldm train: error: ...`, the demo's `=== ... ===`),
wherever Ray printed them from (its `(RayTrainWorker pid=N)` prefix is dropped), and, from
the first traceback of the command itself on, everything. On a terminal the stages'
progress lines (`train: step 120/1500 ...`) rewrite one live line; elsewhere (a CI log, a
Ray job's log) each is a plain line.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# Ray prefixes what a worker prints with its name and pid, coloured on a terminal.
_RAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)?\([^()]*(?:pid=\d+)[^()]*\)(?:\x1b\[[0-9;]*m)?\s?")
_OURS = re.compile(
    r"^(?:(?:autoencoder|precompute|train|shards|export|sample|cache|demo|drain|tracking): "
    r"|ldm(?: [a-z]+)?: |=== )"
)
_PROGRESS = re.compile(r"^(?:autoencoder|train): step \d+/\d+ ")
_TRACEBACK = "Traceback (most recent call last):"


class ConsoleFilter:
    """Decides, line by line, what reaches the console (and how)."""

    def __init__(self, tty: bool):
        self.tty = tty
        self.passthrough = False  # after the command's own traceback: show everything
        self.live = False  # a progress line is on screen without its newline

    def render(self, line: str) -> str:
        """The text to write to the console for one line of output ('' for none)."""
        prefixed = _RAY_PREFIX.match(line)
        text = line[prefixed.end() :] if prefixed else line
        if not prefixed and text.startswith(_TRACEBACK):
            self.passthrough = True
        if not (self.passthrough or _OURS.match(text)):
            return ""
        if self.tty and _PROGRESS.match(text):
            shown = "\r\x1b[2K" + text.rstrip("\n")
            self.live = True
            return shown
        shown = ("\n" if self.live else "") + text
        self.live = False
        return shown if shown.endswith("\n") else shown + "\n"


def log_path(run_dir: Path, stage: str) -> Path:
    """A new log file's path in the run folder: one per command, named by its start time."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(run_dir) / "logs" / f"{stage}-{stamp}-{os.getpid()}.log"


def _pump(read_fd: int, log: BinaryIO, console: BinaryIO, lines: ConsoleFilter, end: bytes) -> None:
    """Copy the pipe to the log and, filtered, the console, up to the `end` marker the
    stage writes last (or the pipe's end): a library or a child process that holds a copy
    of the pipe open must not keep the command waiting for an end of file."""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            pending += chunk
            ended = end in pending
            pending = pending.replace(end, b"")
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                log.write(raw + b"\n")
                shown = lines.render(raw.decode(errors="replace") + "\n")
                if shown:
                    console.write(shown.encode())
            log.flush()
            console.flush()
            if ended:
                break
        if pending:
            log.write(pending)
            log.flush()
            console.write(lines.render(pending.decode(errors="replace")).encode())
        if lines.live:
            console.write(b"\n")
        console.flush()


@contextmanager
def stage_console(path: Path, stage: str) -> Iterator[None]:
    """Run the body with fds 1 and 2 going to the log at `path` and, filtered, the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(1), "wb", buffering=0)
    saved_err = os.dup(2)
    console.write(f"{stage}: full log (Ray, DeepSpeed, warnings) in {path}\n".encode())
    log = open(path, "ab")
    read_fd, write_fd = os.pipe()
    end = b"\0ldm-console-end-" + secrets.token_hex(8).encode() + b"\0"
    marker_fd = os.dup(write_fd)  # this stage's own end of the pipe: the end marker's way in
    lines = ConsoleFilter(os.isatty(console.fileno()))
    pump = threading.Thread(target=_pump, args=(read_fd, log, console, lines, end), daemon=True)
    pump.start()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # After everything this process wrote, the end marker: the pump stops there, even
        # while a copy of the pipe stays open (a library's duplicate of fd 1, a child).
        os.dup2(console.fileno(), 1)
        os.dup2(saved_err, 2)
        os.close(saved_err)
        os.write(marker_fd, end)
        os.close(marker_fd)
        pump.join(timeout=10)
        if not pump.is_alive():
            log.close()
            console.close()
