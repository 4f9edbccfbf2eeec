"""Paths or URIs for data and caches: local paths, shared filesystems, and `s3://` via fsspec.

Every stage names its inputs and outputs as strings, never `pathlib.Path` (which would fold
`s3://bucket` into `s3:/bucket`). Writes are all-or-nothing: a local file is written under a
temporary name and renamed; an object store PUT only becomes visible once complete. S3
credentials and endpoint come from the usual AWS variables (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for S3-compatible servers).
"""

from __future__ import annotations

import glob as globbing
import hashlib
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

import fsspec

from core.errors import LdmError


def is_remote(url: str | Path) -> bool:
    text = str(url)
    return "://" in text and not text.startswith("file://")


def join(base: str | Path, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return os.path.join(str(base), *parts)


def basename(url: str | Path) -> str:
    return posixpath.basename(str(url).rstrip("/"))


def dirname(url: str | Path) -> str:
    if is_remote(url):
        return posixpath.dirname(str(url).rstrip("/"))
    return os.path.dirname(str(url))


def _fs(url: str | Path) -> tuple[Any, str]:
    try:
        return fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError) as exn:
        raise LdmError(f"cannot open {url}: {exn}") from None


def open_read(url: str | Path) -> IO[bytes]:
    if not is_remote(url):
        return open(url, "rb")
    fs, path = _fs(url)
    return fs.open(path, "rb", block_size=8 << 20)


def read_bytes(url: str | Path) -> bytes:
    with open_read(url) as f:
        return f.read()


def exists(url: str | Path) -> bool:
    if not is_remote(url):
        return Path(url).is_file()
    fs, path = _fs(url)
    return fs.isfile(path)


def size(url: str | Path) -> int:
    if not is_remote(url):
        return Path(url).stat().st_size
    fs, path = _fs(url)
    return int(fs.size(path))


def fingerprints(urls: list[str]) -> dict[str, dict[str, Any]]:
    """A quick identity of each file that exists: its size and version, the modification
    time (ns) of a local file or the ETag of an object. One listing per folder or prefix, so
    thousands of shards cost a few requests. A file rewritten in place gets a new version."""
    found: dict[str, dict[str, Any]] = {}
    folders: dict[str, list[str]] = {}
    for url in urls:
        if not is_remote(url):
            try:
                stat = os.stat(url)
            except OSError:
                continue
            found[url] = {"size": stat.st_size, "version": f"mtime:{stat.st_mtime_ns}"}
        else:
            folders.setdefault(dirname(url), []).append(url)
    for folder, members in folders.items():
        fs, path = _fs(folder)
        protocol = folder.split("://", 1)[0]
        try:
            listing = {
                f"{protocol}://{info['name']}": info
                for info in fs.ls(path.rstrip("/"), detail=True, refresh=True)
            }
        except FileNotFoundError:
            continue
        for url in members:
            if (info := listing.get(url)) is not None:
                found[url] = {"size": int(info["size"]), "version": _object_version(info)}
    return found


def _object_version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "generation"):  # S3, then GCS/Azure-style keys
        if info.get(key):
            return f"etag:{str(info[key]).strip(chr(34))}"
    for key in ("LastModified", "last_modified", "mtime", "updated"):
        if info.get(key):
            return f"mtime:{info[key]}"
    return ""


def makedirs(url: str | Path) -> None:
    if not is_remote(url):
        Path(url).mkdir(parents=True, exist_ok=True)
    # Object stores have no folders: nothing to create.


def write_bytes(url: str | Path, data: bytes) -> None:
    """Write a whole file at once; readers never see it half written."""
    if not is_remote(url):
        path = Path(url)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    fs, path = _fs(url)
    fs.pipe_file(path, data)


def put_file(local: Path, url: str | Path) -> None:
    """Move a finished local file to its final place (a rename, or one upload)."""
    if not is_remote(url):
        os.replace(local, url)
        return
    fs, path = _fs(url)
    fs.put_file(str(local), path)
    local.unlink()


def list_files(location: str | Path, suffix: str) -> list[str]:
    """Sorted files ending in `suffix` directly inside a folder or prefix ([] if none)."""
    if not is_remote(location):
        path = Path(location)
        return sorted(str(p) for p in path.glob(f"*{suffix}")) if path.is_dir() else []
    fs, path = _fs(location)
    protocol = str(location).split("://", 1)[0]
    try:
        names = fs.ls(path.rstrip("/"), detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(f"{protocol}://{n}" for n in names if n.endswith(suffix))


def sha256(url: str | Path) -> str:
    digest = hashlib.sha256()
    with open_read(url) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def glob(pattern: str | Path) -> list[str]:
    """Sorted paths or URIs matching a glob pattern."""
    if not is_remote(pattern):
        return sorted(globbing.glob(str(pattern)))
    fs, path = _fs(pattern)
    fs.invalidate_cache()  # another node may have written since this process last looked
    protocol = str(pattern).split("://", 1)[0]
    return sorted(f"{protocol}://{p}" for p in fs.glob(path))


def get_file(url: str | Path, local: Path) -> None:
    """Download (or copy) one file to a local path, atomically."""
    tmp = local.with_name(f".{local.name}.tmp{os.getpid()}")
    if is_remote(url):
        fs, path = _fs(url)
        fs.get_file(path, str(tmp))
    else:
        shutil.copyfile(url, tmp)
    os.replace(tmp, local)


def remove(url: str | Path) -> None:
    """Delete one file if it exists."""
    if not is_remote(url):
        Path(url).unlink(missing_ok=True)
        return
    fs, path = _fs(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def remove_tree(url: str | Path) -> None:
    """Delete a folder or prefix and everything under it, if it exists."""
    if not is_remote(url):
        shutil.rmtree(url, ignore_errors=True)
        return
    fs, path = _fs(url)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def _local_copies() -> Path:
    """Where this machine keeps local copies of object-store folders (its own temp dir: each
    host downloads for itself)."""
    return Path(tempfile.gettempdir()) / f"ldm-{os.getuid()}" / "remote"


def local_folder(location: str | Path) -> Path:
    """A folder to read with libraries that take only local paths (a diffusers model): a
    local path as is, or for an object-store prefix a local copy of every file under it.
    The copy is made once per machine and version (keyed by the prefix and its files' sizes
    and ETags, so a folder replaced since is fetched again), downloaded beside its final
    place and renamed into it: readers never see half of one."""
    if not is_remote(location):
        return Path(location)
    fs, path = _fs(location)
    prefix = path.rstrip("/")
    fs.invalidate_cache()  # another node may have published since this process last looked
    try:
        listing = fs.find(prefix, detail=True)
    except FileNotFoundError:
        listing = {}
    files = {
        name[len(prefix) + 1 :]: info
        for name, info in listing.items()
        if info.get("type") != "directory" and name.startswith(prefix + "/")
    }
    if not files:
        raise LdmError(f"{location}: no such folder (nothing is stored under that prefix)")
    identity = hashlib.sha256(str(location).rstrip("/").encode())
    for name in sorted(files):
        identity.update(f"\0{name}\0{files[name]['size']}\0{_object_version(files[name])}".encode())
    target = _local_copies() / identity.hexdigest()[:24]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for name in sorted(files):
        local = staging / name
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{prefix}/{name}", str(local))
    try:
        os.replace(staging, target)
    except OSError:  # another process of this machine finished the same copy first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def put_folder(local: Path, location: str | Path, last: str | None = None) -> None:
    """Upload a local folder's files under the object-store prefix `location`, replacing what
    was there; the file named `last` goes up after all others, so a reader that finds it
    finds the rest."""
    if not is_remote(location):
        raise ValueError(f"put_folder publishes to object stores, not to {location}")
    remove_tree(location)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)  # stable: `last` moves to the end
    fs, path = _fs(location)
    for file in files:
        fs.put_file(str(file), f"{path.rstrip('/')}/{file.relative_to(local).as_posix()}")
