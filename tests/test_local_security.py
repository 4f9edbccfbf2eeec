"""Local security: the embedded Ray's token lives only in a folder of this user that nobody
else can reach (in a shared /tmp another user could have made it first), and `ldm jobs`
says so when it would send the token over plain http to another machine."""

import os
import stat

import pytest

from core.errors import LdmError
from orchestrator import cluster, jobs


@pytest.fixture
def token_home(tmp_path, monkeypatch):
    """The embedded auth setup with no token configured and a private temp folder here."""
    for name in (cluster.AUTH_TOKEN, cluster.AUTH_TOKEN_PATH, cluster.AUTH_MODE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "shared-tmp" / "ldm-test"
    monkeypatch.setattr(cluster, "ldm_temp_dir", lambda: folder)
    return folder


def test_a_new_token_folder_and_file_are_private(token_home):
    env = cluster._embedded_auth_env()
    token = token_home / "ray_auth_token"
    assert env[cluster.AUTH_TOKEN_PATH] == str(token)
    assert stat.S_IMODE(token_home.stat().st_mode) == 0o700
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert cluster._embedded_auth_env() == env and len(token.read_text()) == 64  # reused


def _planted(folder, mode=0o755, uid=None):
    folder.mkdir(parents=True)
    (folder / "ray_auth_token").write_text("a token someone else chose")
    os.chmod(folder, mode)
    if uid is not None:
        os.chown(folder, uid, -1)


@pytest.mark.parametrize(
    "how,expected",
    [
        ("open", "has permissions 0755"),
        ("other user", "belongs to uid 65534"),
        ("symlink", "is not a folder"),
    ],
)
def test_a_folder_another_user_could_reach_is_refused(token_home, tmp_path, how, expected):
    if how == "open":
        _planted(token_home)
    elif how == "other user":
        if os.getuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        _planted(token_home, mode=0o700, uid=65534)
    else:
        _planted(tmp_path / "elsewhere", mode=0o700)
        token_home.parent.mkdir(parents=True, exist_ok=True)
        token_home.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LdmError, match=expected) as err:
        cluster._embedded_auth_env()
    assert "\n" not in str(err.value) and "delete it" in str(err.value)


@pytest.mark.parametrize(
    "scheme,host,warned",
    [
        ("http", "10.0.0.1", True),
        ("http", "head.example.com", True),
        ("https", "10.0.0.1", False),
        ("http", "127.0.0.1", False),
        ("http", "localhost", False),
        ("http", "::1", False),
    ],
)
def test_cleartext_token_to_another_machine_is_flagged(scheme, host, warned):
    assert jobs.cleartext_to_network(scheme, host) is warned
