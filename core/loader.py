"""Loading the experiment config: YAML (optionally starting from a preset) plus dotted
`section.key=value` overrides, validated into `core.config.ExperimentConfig`.

Every problem is one `LdmError` line naming the key (or the file and line) at fault.
Local paths are made absolute on load, so every process of a job agrees on them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from core import storage
from core.config import ExperimentConfig
from core.errors import LdmError
from core.presets import get_preset

_PATH_KEYS = (
    ("run", "root"),
    ("run", "storage"),
    ("data", "shards"),
    ("autoencoder", "pretrained"),
    ("autoencoder", "lpips_path"),
    ("precompute", "cache_dir"),
    ("train", "init_from"),
)


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    # A union's branch (`literal['off','auto']`, `list[...]`) is not a key: leave it out.
    loc = ".".join(str(p) for p in first["loc"] if re.fullmatch(r"\w+", str(p)))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (see `ldm config --show-defaults` for the valid keys)"
    elif "input" in first and first["type"] not in ("value_error", "model_type"):
        msg += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    head = msg.split(": ", 1)[0] if ": " in msg else ""
    if "." in head and " " not in head and head.startswith(loc):
        loc, msg = msg.split(": ", 1)  # cross-field checks name their key first
    where = f"config key {loc}: " if loc else "config: "
    return where + msg + (f" [and {more} more problem(s)]" if more > 0 else "")


class _YamlLoader(yaml.SafeLoader):
    """YAML as users write configs: `1e-4` is a number (YAML 1.1 wants `1.0e-4`)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_yaml(text: str | bytes) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001); values are YAML scalars or lists."""
    if "=" not in text:
        raise LdmError(f"override {text!r}: expected section.key=value, e.g. train.num_steps=100")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) not in (2, 3) or not all(parts):
        raise LdmError(
            f"override {text!r}: the key must be section.key (or section.group.key), e.g. "
            "train.num_steps or data.filters.min_width"
        )
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def _migrate_retired_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """Keys that older versions wrote into checkpoints, rewritten as they are now named."""
    precompute = tree.get("precompute")
    if isinstance(precompute, dict) and "text" in precompute:  # now text_encoder.trainable
        precompute = tree["precompute"] = dict(precompute)
        if precompute.pop("text") == "token_ids":
            tree["text_encoder"] = {**tree.get("text_encoder", {}), "trainable": True}
    return tree


def load_saved_config(tag_dir: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """The config a checkpoint tag (a folder or an object-store URI) was trained with, as
    written into it (paths as saved)."""
    raw = read_yaml(storage.read_bytes(storage.join(tag_dir, "config.yaml")))
    return build_config(_migrate_retired_keys(raw), overrides, absolute_paths=False)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`, mappings merged key by key (a preset's `data.filters` keeps the
    filters a YAML does not name)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(
    base: dict[str, Any] | None = None, overrides: list[str] = (), absolute_paths: bool = True
) -> ExperimentConfig:
    """Validate a raw dict (optionally naming a `preset`) plus overrides into a config."""
    raw = dict(base or {})
    preset = raw.pop("preset", None)
    tree: dict[str, Any] = {}
    if preset is not None:
        tree = get_preset(preset).to_dict()
    tree = _merge(tree, raw)
    for text in overrides:
        parts, value = parse_override(text)
        current = tree
        for depth, name in enumerate(parts[:-1]):
            current = current.setdefault(name, {})
            if not isinstance(current, dict):
                what = "section" if depth == 0 else "group of keys"
                raise LdmError(f"override {text!r}: {'.'.join(parts[: depth + 1])} is not a {what}")
        current[parts[-1]] = value
    try:
        config = ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise LdmError(_format_error(err)) from None
    if absolute_paths:
        for section, key in _PATH_KEYS:
            part = getattr(config, section)
            value = getattr(part, key)
            if value is not None and "://" not in value:
                setattr(part, key, str(Path(value).expanduser().resolve()))
    return config


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Load an experiment YAML with `section.key=value` overrides; raises LdmError on bad input."""
    path = Path(path)
    if not path.is_file():
        raise LdmError(
            f"config file {path} does not exist; pass an experiment YAML such as configs/demo.yaml"
        )
    try:
        raw = read_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise LdmError(
            f"config file {path}: not UTF-8 text (byte {err.start}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise LdmError(
            f"config file {path}{where}: not valid YAML ({getattr(err, 'problem', err)})"
        ) from None
    if not isinstance(raw, dict):
        raise LdmError(
            f"config file {path}: expected a mapping of sections, got {type(raw).__name__}"
        )
    return build_config(raw, overrides)
