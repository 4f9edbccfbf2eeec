"""A real `mlflow server` process on 127.0.0.1 for tests, that can be killed and restarted.

The backend store (SQLite) and the artifact folder live in a given directory, so a server
restarted on the same port sees everything the killed one stored.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.ray_cluster import free_ports


class MlflowServer:
    def __init__(
        self, root: Path, port: int | None = None, args: list[str] | None = None, env=None
    ):
        """`args`: the server's own arguments instead of the defaults (a manifest's)."""
        self.args, self.env = args, env or {}
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_ports(1)[0]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> MlflowServer:
        exe = shutil.which("mlflow", path=str(Path(sys.executable).parent))
        assert exe, "the mlflow command is not installed"
        args = self.args or (
            ["--host", "127.0.0.1", "--port", str(self.port)]
            + ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
            + ["--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        )
        self.proc = subprocess.Popen(
            [exe, "server", *args],
            stdout=open(self.root / "server.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env},
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlflow server did not start: {(self.root / 'server.log').read_text()}"
                    ) from None
                time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL the server and its workers, as a crashed or unreachable server."""
        if self.proc is None:
            return
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the port refuses connections
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=0.5).close()
                time.sleep(0.2)
            except OSError:
                return

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
