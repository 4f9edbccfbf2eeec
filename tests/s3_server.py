"""A real S3-compatible server process on 127.0.0.1 for tests (moto's standalone server).

`local_s3()` starts `moto_server` on a free loopback port, waits until it answers, and
yields the environment a client needs (`AWS_ENDPOINT_URL` and throwaway credentials);
teardown stops that one process by pid.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.ray_cluster import free_ports


def forget_filesystems() -> None:
    """fsspec keeps one S3 filesystem per process, with the endpoint it was made with: a
    server started later on another port must not be reached through an earlier one's."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def local_s3() -> Iterator[dict[str, str]]:
    forget_filesystems()
    (port,) = free_ports(1)
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    assert server, "moto_server is not installed (pip install 'moto[server]')"
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {url}") from None
                time.sleep(0.2)
        yield {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        forget_filesystems()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_filesystem(env: dict[str, str]):
    """An s3fs filesystem pointed at the test server (without touching os.environ)."""
    import s3fs

    return s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=env["AWS_ENDPOINT_URL"],
        skip_instance_cache=True,
    )
