"""The multi-host harness itself (tests/hosts.py): hosts with their own addresses and /tmp,
reachable from each other only through the switch, a partition that can heal, a lost host,
and nothing left behind."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.hosts import hosts, unavailable

why = unavailable()
pytestmark = pytest.mark.skipif(why is not None, reason=why or "")

SERVE = (
    "import http.server as h\n"
    "h.HTTPServer(({!r}, 8000), h.SimpleHTTPRequestHandler).serve_forever()\n"
)
FETCH = (
    "import urllib.request as u, sys\n"
    "try:\n"
    "    print(u.urlopen('http://{}:8000/', timeout={}).status)\n"
    "except OSError as e:\n"
    "    print('unreachable', type(e).__name__); sys.exit(1)\n"
)


def _fetch(host, target, timeout: float = 5) -> subprocess.CompletedProcess:
    return host.run([sys.executable, "-c", FETCH.format(target.address, timeout)])


def test_hosts_have_their_own_addresses_tmp_and_cables():
    with hosts("a", "b") as made:
        a, b = made["a"], made["b"]
        assert a.address != b.address and a.address.startswith("169.254.")
        # A server bound to A's address is reachable from B by that address.
        server = a.popen([sys.executable, "-c", SERVE.format(a.address)], cwd="/")
        a.wait_for_port(8000)
        listening = a.listening()
        assert f"{a.address}:8000" in listening, listening
        assert _fetch(b, a).stdout.strip() == "200"
        # Each host's /tmp is its own (and not this machine's).
        a.run(["sh", "-c", "echo a > /tmp/only-on-a"])
        assert a.run(["cat", "/tmp/only-on-a"]).stdout == "a\n"
        assert "only-on-a" not in b.run(["ls", "/tmp"]).stdout
        assert subprocess.run(["test", "-e", "/tmp/only-on-a"]).returncode == 1
        # The project and its virtualenv are on every host, wherever the checkout lies.
        imported = b.run([sys.executable, "-c", "import orchestrator.cli; print('ok')"])
        assert imported.stdout == "ok\n", imported.stderr[-2000:]
        # TCP's retransmission backoff is capped at 1 s on every host, where the kernel can.
        rto = b.run(["cat", "/proc/sys/net/ipv4/tcp_rto_max_ms"])
        assert rto.returncode != 0 or rto.stdout.strip() == "1000", rto
        # A partition: B's cable out, then back in.
        b.link(False)
        cut = _fetch(b, a, timeout=1)
        assert cut.returncode == 1 and "unreachable" in cut.stdout, cut
        b.link(True)
        assert _fetch(b, a).stdout.strip() == "200"
        # A lost host: every process of A dies at once.
        assert a.kill_all(keep_anchor=True) >= 1
        server.wait(timeout=10)
        assert server.returncode == -9
        names = (a.netns, b.netns)
    time.sleep(0.1)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names), listed
