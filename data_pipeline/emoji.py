"""The demo data set: Twemoji 64x64 PNGs with captions, built from the npm package.

`emoji-datasource-twitter` (a pinned version) carries every Twemoji image at 64 px and an
`emoji.json` describing each one. `fetch_emoji` packs it with `npm pack`, reads the tgz
without ever extracting member paths, and writes an image folder that `ldm shards` takes
as is: `<file>.png`, `captions.jsonl` ("an emoji of blue heart"), the licence files and a
completion marker. The images are CC-BY 4.0 (Twitter, Inc and contributors).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

from core.errors import LdmError

PACKAGE = "emoji-datasource-twitter"
DEFAULT_VERSION = "16.0.0"
MARKER = ".complete.json"
IMAGE_PREFIX = "package/img/twitter/64/"

ATTRIBUTION = """\
# Attribution

The emoji images in this folder are Twemoji graphics, copyright 2019 Twitter, Inc and
other contributors (https://github.com/jdecked/twemoji, the maintained fork of
twitter/twemoji), licensed under CC-BY 4.0: https://creativecommons.org/licenses/by/4.0/

They are unmodified copies of the 64x64 PNGs in the npm package `{package}@{version}`
(emoji-data by Cal Henderson, https://github.com/iamcal/emoji-data, MIT licence; see
`LICENSE-emoji-data.txt`). The captions were derived from that package's `emoji.json`.
"""

# Unicode character names of pre-emoji symbols use BLACK/WHITE/HEAVY for filled/outlined
# glyphs, which contradicts the colour of the picture (HEAVY BLACK HEART is the red heart).
# A model learning colour words from captions must not see those, so these take their CLDR
# short names instead.
_CLDR_NAMES = {
    "1F0CF": "joker",
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
    "1F446": "backhand index pointing up",
    "1F447": "backhand index pointing down",
    "1F448": "backhand index pointing left",
    "1F449": "backhand index pointing right",
    "23E9": "fast-forward button",
    "23EA": "fast reverse button",
    "23EB": "fast up button",
    "23EC": "fast down button",
    "25B6-FE0F": "play button",
    "25C0-FE0F": "reverse button",
    "2600-FE0F": "sun",
    "260E-FE0F": "telephone",
    "261D-FE0F": "index pointing up",
    "263A-FE0F": "smiling face",
    "2660-FE0F": "spade suit",
    "2663-FE0F": "club suit",
    "2665-FE0F": "heart suit",
    "2666-FE0F": "diamond suit",
    "267B-FE0F": "recycling symbol",
    "26AA": "white circle",
    "26AB": "black circle",
    "2702-FE0F": "scissors",
    "2705": "check mark button",
    "2714-FE0F": "check mark",
    "2716-FE0F": "multiply",
    "2734-FE0F": "eight-pointed star",
    "2753": "red question mark",
    "2754": "white question mark",
    "2755": "white exclamation mark",
    "2757": "red exclamation mark",
    "2764-FE0F": "red heart",
    "2795": "plus",
    "2796": "minus",
    "2797": "divide",
    "27A1-FE0F": "right arrow",
    "2B05-FE0F": "left arrow",
    "2B06-FE0F": "up arrow",
    "2B07-FE0F": "down arrow",
    "2B1B": "black square",  # drawn like the coloured large squares, so named like them
    "2B1C": "white square",
    "2B50": "star",
    "2B55": "hollow red circle",
}

_SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}

# Image names come from emoji.json, i.e. from the download: only plain names become files.
_SAFE_IMAGE_NAME = re.compile(r"^[0-9a-f]+(?:-[0-9a-f]+)*\.png$")
_LARGE_SHAPE = re.compile(r"^large (\w+) (circle|square)$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def emoji_name(entry: dict[str, Any]) -> str:
    """A clean lowercase name for one emoji.json entry: 'blue heart', 'flag of egypt'."""
    unified = str(entry.get("unified") or "").upper()
    if unified in _CLDR_NAMES:
        return _CLDR_NAMES[unified]
    name = str(entry.get("name") or "").strip()
    if not name:
        # A few entries in older releases have no name; the Slack-style short name is the
        # only other human-readable label.
        name = str(entry.get("short_name") or "").replace("_", " ").replace("-", " ")
    if name.endswith(" Flag") and name != "Flag":
        name = "flag of " + name.removesuffix(" Flag")
    name = " ".join(name.replace(" & ", " and ").lower().split())
    # CLDR drops LARGE from the coloured circles and squares ("red circle"); so do prompts.
    return _LARGE_SHAPE.sub(r"\1 \2", name)


def skin_tone_suffix(variation_key: str) -> str:
    """'1F3FB-1F3FD' -> 'light skin tone, medium skin tone' (a repeated tone is said once)."""
    tones: list[str] = []
    for part in variation_key.upper().split("-"):
        tone = _SKIN_TONES.get(part)
        if tone and tone not in tones:
            tones.append(tone)
    return ", ".join(tones)


def emoji_captions(entries: list[dict[str, Any]]) -> dict[str, str]:
    """Image file name -> caption for every image that emoji.json says Twemoji has."""
    captions: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        name = emoji_name(entry)
        if not name:
            continue
        if entry.get("has_img_twitter") and entry.get("image"):
            captions[entry["image"]] = f"an emoji of {name}"
        for key, variation in sorted((entry.get("skin_variations") or {}).items()):
            if not isinstance(variation, dict):
                continue
            if variation.get("has_img_twitter") and variation.get("image"):
                suffix = skin_tone_suffix(key)
                caption = f"an emoji of {name}, {suffix}" if suffix else f"an emoji of {name}"
                captions[variation["image"]] = caption
    return {file: cap for file, cap in captions.items() if _SAFE_IMAGE_NAME.match(file)}


def _read_marker(dest: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _complete(dest: Path, version: str) -> bool:
    marker = _read_marker(dest)
    if marker is None or marker.get("version") != version:
        return False
    return marker.get("images") == sum(1 for _ in dest.glob("*.png"))


def build_emoji_folder(tgz: Path, dest: Path, version: str = DEFAULT_VERSION) -> Path:
    """Write the image folder at `dest` from a packed `emoji-datasource-twitter` tgz.

    Nothing is extracted by member path: the images, emoji.json and the licence are read
    as bytes and written under names chosen here, so a hostile archive cannot write
    outside the folder. The folder appears at `dest` only once complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        images: set[str] = set()
        meta: dict[str, bytes] = {}
        try:
            with tarfile.open(tgz, "r:gz") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    if member.name in ("package/emoji.json", "package/LICENSE"):
                        meta[member.name] = archive.extractfile(member).read()
                    elif member.name.startswith(IMAGE_PREFIX):
                        base = member.name[len(IMAGE_PREFIX) :]
                        if _SAFE_IMAGE_NAME.match(base):
                            (work / base).write_bytes(archive.extractfile(member).read())
                            images.add(base)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exn:
            raise LdmError(
                f"emoji: {tgz} is not a readable npm package ({exn}); delete it and retry"
            ) from None
        if "package/emoji.json" not in meta:
            raise LdmError(f"emoji: {tgz} has no package/emoji.json; is it {PACKAGE}?")
        try:
            entries = json.loads(meta["package/emoji.json"])
        except ValueError as exn:
            raise LdmError(f"emoji: emoji.json in {tgz} is not valid JSON ({exn})") from None
        if not isinstance(entries, list):
            raise LdmError(f"emoji: emoji.json in {tgz} is not a list of emoji; is it {PACKAGE}?")
        captions = {f: c for f, c in emoji_captions(entries).items() if f in images}
        if not captions:
            raise LdmError(f"emoji: {tgz} has no 64px Twemoji images listed in its emoji.json")
        for extra in images - captions.keys():
            (work / extra).unlink()
        with open(work / "captions.jsonl", "w", encoding="utf-8") as out:
            for file in sorted(captions):
                out.write(json.dumps({"file": file, "caption": captions[file]}) + "\n")
        if "package/LICENSE" in meta:
            (work / "LICENSE-emoji-data.txt").write_bytes(meta["package/LICENSE"])
        (work / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(package=PACKAGE, version=version))
        marker = {"package": PACKAGE, "version": version, "images": len(captions)}
        (work / MARKER).write_text(json.dumps(marker) + "\n")
        _publish(work, dest, version)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _publish(work: Path, dest: Path, version: str) -> None:
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    try:
        os.rename(work, dest)
    except OSError:
        # Another process finished the same folder first: theirs is as good as ours.
        if not _complete(dest, version):
            raise LdmError(
                f"emoji: {dest} already exists and is not a complete emoji folder for "
                f"{PACKAGE}@{version}; remove it or pick another folder"
            ) from None


def fetch_emoji(dest: Path, version: str = DEFAULT_VERSION, npm_cache: Path | None = None) -> Path:
    """Make `dest` the captioned Twemoji image folder of `emoji-datasource-twitter@version`.

    Returns at once if `dest` is already complete. npm's cache goes to `npm_cache`, else
    `$npm_config_cache`, else `<dest's parent>/.cache/npm`, never the home directory.
    """
    dest = Path(dest)
    if not _VERSION.match(version):
        raise LdmError(f"emoji: version {version!r} is not an exact version like 16.0.0")
    if _complete(dest, version):
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        marker = _read_marker(dest)
        found = f" (it holds version {marker.get('version')})" if marker else ""
        raise LdmError(
            f"emoji: {dest} exists but is not a complete {PACKAGE}@{version} folder{found}; "
            "remove it or pick another folder"
        )
    npm = shutil.which("npm")
    if npm is None:
        raise LdmError(
            "emoji: npm is not installed; install Node.js with npm (e.g. `apt-get install npm`) "
            "or build your own image folder and pass it to `ldm shards`"
        )
    cache = Path(npm_cache or os.environ.get("npm_config_cache") or dest.parent / ".cache" / "npm")
    cache.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "npm_config_cache": str(cache), "npm_config_update_notifier": "false"}
    spec = f"{PACKAGE}@{version}"
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.npm-", dir=dest.parent) as pack_dir:
        try:
            result = subprocess.run(
                [npm, "pack", spec, "--cache", str(cache), "--ignore-scripts", "--loglevel=error"],
                cwd=pack_dir,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
        except subprocess.TimeoutExpired:
            raise LdmError(
                f"emoji: `npm pack {spec}` took over 15 minutes; check access to the npm registry"
            ) from None
        tgzs = sorted(Path(pack_dir).glob("*.tgz"))
        if result.returncode != 0 or not tgzs:
            lines = [ln.strip() for ln in (result.stderr or result.stdout).splitlines()]
            why = next((ln for ln in reversed(lines) if ln), f"exit code {result.returncode}")
            raise LdmError(
                f"emoji: `npm pack {spec}` failed ({why}); check access to the npm registry "
                "(npm_config_registry / proxy settings) and retry"
            )
        return build_emoji_folder(tgzs[0], dest, version)
