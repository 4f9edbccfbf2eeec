"""Hosts on one machine, for multi-node tests: each with its own address, /tmp and run folder.

`hosts("a", "b", ...)` makes one Linux network namespace per host, joined by veth pairs to a
bridge that lives in a namespace of its own (the "switch"), so nothing is added to the
machine's own network. Each host gets an address the harness picks in the link-local range
169.254.0.0/16 and a loopback of its own; a long-lived anchor process per host holds a
private mount namespace whose /tmp is a fresh tmpfs, so what one host writes under /tmp
(run folders, Ray's session files) the others cannot see. The project, its virtualenv and
the download cache stay visible to every host (bound back in when they lie under /tmp), as
an image baked into every node would be.

Processes run on a host with `Host.popen` / `Host.run` (nsenter into the anchor's network and
mount namespaces). `Host.kill_all()` SIGKILLs every process in the host's network namespace
at once (a lost node); `Host.link(False)` takes its cable out of the switch (a partition).
On exit every process in the namespaces is killed, by process id, and the namespaces are
deleted, also when the test failed.

Needs root and the `ip`, `nsenter` and `unshare` tools (CI runs as root); `unavailable()`
says in one line why the harness cannot run here, for a skip.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

_TOOLS = ("ip", "nsenter", "unshare", "ss")


def unavailable() -> str | None:
    """Why hosts cannot be made on this machine, or None."""
    if os.geteuid() != 0:
        return "multi-host tests need root (network and mount namespaces)"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"multi-host tests need {', '.join(missing)} (iproute2, util-linux)"
    probe = f"ldm-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"multi-host tests cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass
class Host:
    """One host: a network namespace with an address, and a private /tmp."""

    name: str
    netns: str
    address: str
    """Its link-local address, where other hosts reach it."""
    switch_netns: str = field(repr=False)
    switch_port: str = field(repr=False)
    anchor: subprocess.Popen | None = field(default=None, repr=False)

    def _enter(self) -> list[str]:
        assert self.anchor is not None
        return ["nsenter", f"--target={self.anchor.pid}", "--net", "--mount", "--"]

    def popen(self, args: list[str], env: dict[str, str] | None = None, **kwargs):
        """Start `args` on this host, in a session of its own; a Popen."""
        return subprocess.Popen(
            [*self._enter(), *args],
            env={**os.environ, **(env or {})},
            start_new_session=True,
            **kwargs,
        )

    def run(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 120):
        """Run `args` on this host to its end; the CompletedProcess (text output)."""
        return subprocess.run(
            [*self._enter(), *args],
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (the anchor included)."""
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill_all(self, keep_anchor: bool = False) -> int:
        """SIGKILL every process of this host at once, as a lost node: none runs a handler.
        The number killed."""
        anchor = self.anchor.pid if (keep_anchor and self.anchor) else None
        victims = [pid for pid in self.pids() if pid != anchor]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(victims)

    def link(self, up: bool) -> None:
        """Plug this host's cable into the switch, or pull it out (a network partition)."""
        _ip("-n", self.switch_netns, "link", "set", self.switch_port, "up" if up else "down")

    def listening(self) -> str:
        """`ss -ltnp` on this host: every listening TCP socket and its process."""
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, "ss", "-ltnpH"], capture_output=True, text=True
        ).stdout

    def wait_for_port(self, port: int, timeout_s: float = 60) -> None:
        """Until something listens on `port` on this host."""
        deadline = time.monotonic() + timeout_s
        while f":{port} " not in self.listening():
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {self.name}:{port}")
            time.sleep(0.1)


@contextmanager
def hosts(*names: str) -> Iterator[dict[str, Host]]:
    """Hosts `names`, on one switch; everything they run is killed and they are removed on
    exit (see the module docstring)."""
    tag = secrets.token_hex(3)
    subnet = 100 + secrets.randbelow(100)  # 169.254.<subnet>.0/24, a different one per call
    switch = f"ldm-{tag}-sw"
    made: list[str] = []
    made_hosts: dict[str, Host] = {}
    try:
        _ip("netns", "add", switch)
        made.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for index, name in enumerate(names):
            netns = f"ldm-{tag}-{name}"
            _ip("netns", "add", netns)
            made.append(netns)
            port = f"p{index}"
            # Both ends are made in the switch, then one moves into the host as eth0.
            _ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", f"h{index}")
            _ip("-n", switch, "link", "set", f"h{index}", "netns", netns)
            _ip("-n", netns, "link", "set", f"h{index}", "name", "eth0")
            _ip("-n", switch, "link", "set", port, "master", "br0")
            _ip("-n", switch, "link", "set", port, "up")
            address = f"169.254.{subnet}.{index + 1}"
            _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            _cap_retransmission_backoff(netns)
            host = Host(name, netns, address, switch, port)
            # The anchor holds the host's mount namespace, with a fresh tmpfs on /tmp.
            host.anchor = subprocess.Popen(
                ["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private"]
                + ["sh", "-c", _PRIVATE_TMP, "anchor", *_shared_under_tmp()],
                start_new_session=True,
            )
            made_hosts[name] = host
        for host in made_hosts.values():
            _wait_for_private_tmp(host)
        yield made_hosts
    finally:
        for host in made_hosts.values():
            host.kill_all()
            if host.anchor is not None:
                try:
                    host.anchor.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for netns in reversed(made):
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True)


def _cap_retransmission_backoff(netns: str) -> None:
    """TCP's retransmission timeout doubles while a peer is silent, up to 2 minutes by
    default: after a 16 s partition a connection may wait another 13 s before it tries again.
    Capped at 1 s here (`tcp_rto_max_ms`, Linux 6.15+; left as is where the kernel has no
    such setting), as datacenter hosts are often tuned, so a recovery time measures Ray and
    ldm, not the kernel's backoff."""
    subprocess.run(
        ["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.tcp_rto_max_ms=1000"],
        capture_output=True,
    )


# A fresh tmpfs, first mounted on /mnt (in this mount namespace only) so that the shared paths
# under the machine's /tmp can be bound into it at their own paths, then moved onto /tmp.
_PRIVATE_TMP = """set -e
mount -t tmpfs -o size=4g,mode=1777 tmpfs /mnt
for path in "$@"; do
    mkdir -p "/mnt${path#/tmp}"
    mount --bind "$path" "/mnt${path#/tmp}"
done
mount --move /mnt /tmp
exec sleep infinity
"""


def _shared_under_tmp() -> list[str]:
    """What every host must see although it lies under /tmp: the project (a checkout in
    /tmp), its virtualenv, and the download cache (models and packages)."""
    wanted = {Path(__file__).resolve().parents[1], Path(sys.prefix).resolve()}
    if os.environ.get("LDM_CACHE_DIR"):
        wanted.add(Path(os.environ["LDM_CACHE_DIR"]).resolve())
    under = sorted(p for p in wanted if p.is_dir() and Path("/tmp") in p.parents)
    # A folder inside another kept one is already there.
    return [str(p) for p in under if not any(q in p.parents for q in under)]


def _wait_for_private_tmp(host: Host, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert host.anchor is not None
        if host.anchor.poll() is not None:
            raise RuntimeError(f"host {host.name}: its /tmp could not be made private")
        mounts = Path(f"/proc/{host.anchor.pid}/mountinfo")
        try:
            if any(
                line.split()[4] == "/tmp" and " - tmpfs " in line
                for line in mounts.read_text().splitlines()
            ):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"host {host.name}: /tmp not mounted in time")
        time.sleep(0.05)
