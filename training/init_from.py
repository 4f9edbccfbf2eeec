"""`train.init_from`: the weights a new run starts from, taken from another model.

Two sides, so that a source that does not fit is one line before anything starts, not a
traceback on every rank:

- the driver (`orchestrator.train`) calls `check_source` before any worker starts: it finds
  what the path is, verifies an ldm tag's weight files against its commit marker, and
  compares the source's tensor names and shapes, read from safetensors headers without
  loading a tensor, with the config's model built on the meta device;
- every rank calls `load_source` while it builds its model, before the DeepSpeed engine
  exists (under ZeRO-3 the engine partitions whatever the module holds when it is built):
  the raw weights go into the model, and `start_ema` then sets the EMA the run starts from.

Only UNet weights (and a text encoder trained with an ldm tag's UNet) are taken: no
optimizer or schedule state, no step, no data cursor. Everything is read with safetensors;
pickle files are refused unread.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from core import storage
from core.config import ExperimentConfig
from core.errors import LdmError
from core.layout import PIPELINE_INDEX
from models.original_checkpoint import ORIGINAL_PREFIX, diffusers_names
from models.text_encoders import build_text_encoder_meta
from models.unet import TextConditionedUNet, build_unet, unet_of
from training.checkpoint import (
    CONFIG_FILE,
    CONFIG_YAML,
    EMA_FILE,
    MARKER,
    RAW_FILE,
    TRAIN_STATE,
    TrainState,
    listed_files,
    verify,
)

CHECKPOINT = "ldm checkpoint"
DIFFUSERS = "diffusers UNet"
SINGLE_FILE = "original Stable Diffusion checkpoint"
# Files that are unpickled to be read: a pickle can run any code it names.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
_KEY = "train.init_from"
_FIX_ARCHITECTURE = (
    "set unet.* (block_out_channels, layers_per_block, cross_attention_levels, "
    "num_attention_heads, use_linear_projection, cross_attention_dim) to the source's "
    "architecture, or start from another model"
)
# UNet settings that change what the weights compute without changing any shape.
_SAME_FUNCTION = (
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "heads",
    "only_cross_attention",
    "act_fn",
    "norm_num_groups",
    "flip_sin_to_cos",
    "freq_shift",
    "time_embedding_type",
    "resnet_time_scale_shift",
)


@dataclass(frozen=True)
class InitSource:
    """What `train.init_from` names."""

    location: Path
    """Absolute: the tag or model folder, or the single file."""
    kind: str
    """`CHECKPOINT`, `DIFFUSERS` (a pipeline folder's `unet/`, or a UNet folder) or
    `SINGLE_FILE`."""
    step: int | None = None
    """An ldm tag's training step."""

    @property
    def unet_dir(self) -> Path:
        """A diffusers source's UNet folder."""
        pipeline = (self.location / PIPELINE_INDEX).is_file()
        return self.location / "unet" if pipeline else self.location

    def tags(self, named: str | None = None) -> dict[str, str]:
        """The MLflow tags of the run it starts; `named`: where the user pointed (an object
        store's URI, which this local copy was staged from)."""
        tags = {"ldm.init_from": named or str(self.location), "ldm.init_from_kind": self.kind}
        if self.step is not None:
            tags["ldm.init_from_step"] = str(self.step)
        return tags

    def describe(self) -> str:
        step = f", step {self.step}" if self.step is not None else ""
        return f"{self.location} ({self.kind}{step})"


@dataclass
class InitWeights:
    """What a rank loaded besides the raw weights it put into its model."""

    ema: dict[str, torch.Tensor] | None
    """EMA weights by the model's parameter names (an ldm tag's); None: the EMA starts
    from the raw weights."""
    ema_step: int = 0
    """Steps the EMA has averaged: its decay warm-up goes on from there."""


def _read_json(path: Path) -> dict:
    """A source's JSON file (storage others may write), or one line saying it is not JSON."""
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        raise LdmError(f"{_KEY}: {path} is not a JSON object; the source is damaged")
    return value


def staged(path: str, staging: Path) -> str:
    """An ldm tag on an object store (a run with `run.storage=s3://...`), its weight files
    copied into `staging/init-from/<tag>` (the files starting from it reads, never its
    optimizer shards) and checked against its marker; a local path as it is. A copy already
    there is reused, and each file lands under its name only once complete, so ranks sharing
    a node may stage side by side."""
    if not storage.is_remote(path):
        return path
    marker_uri = storage.join(path, MARKER)
    if not storage.exists(marker_uri):
        raise LdmError(
            f"{_KEY}={path}: no committed ldm checkpoint tag there (no {MARKER}); from an object "
            "store only ldm tags are read: copy a pipeline folder or a single file to a local "
            "path and pass that"
        )
    marker = storage.read_bytes(marker_uri)
    listed = listed_files(path, marker)
    local = staging / "init-from" / storage.basename(path.rstrip("/"))
    local.mkdir(parents=True, exist_ok=True)
    wanted = [TRAIN_STATE] + [
        file.format(part)
        for part in ("unet", "text_encoder")
        for file in (RAW_FILE, EMA_FILE, CONFIG_FILE)
        if file.format(part) in listed
    ]
    for name in wanted:
        target = local / name
        if target.is_file() and storage.sha256(target) == listed[name]:
            continue
        partial = target.with_name(f".{name}.{os.getpid()}.partial")
        storage.get_file(storage.join(path, name), partial)
        os.replace(partial, target)
    (local / MARKER).write_bytes(marker)
    return str(local)


def find_source(path: str | Path) -> InitSource:
    """What `path` is, or one line saying why it cannot be started from (an object-store
    tag is `staged` first)."""
    location = Path(path).expanduser().resolve()
    if not location.exists():
        raise LdmError(
            f"{_KEY}: {location} does not exist; pass an ldm checkpoint tag, a diffusers "
            "pipeline folder or an original Stable Diffusion .safetensors file"
        )
    if location.is_file():
        if location.suffix in PICKLE_SUFFIXES:
            raise LdmError(
                f"{_KEY}: {location} is a pickle file ({location.suffix}), which could run any "
                "code when loaded and is never read; pass its .safetensors version (converted "
                "where running its code is safe)"
            )
        if location.suffix != ".safetensors":
            raise LdmError(
                f"{_KEY}: {location} is not a .safetensors file; pass an original Stable "
                "Diffusion .safetensors checkpoint, an ldm checkpoint tag or a pipeline folder"
            )
        return InitSource(location, SINGLE_FILE)
    if any((location / name).is_file() for name in (MARKER, TRAIN_STATE, CONFIG_YAML)):
        if not (location / MARKER).is_file():
            raise LdmError(
                f"{_KEY}: {location} is an ldm checkpoint tag without its {MARKER} (never "
                "completed); pick a committed tag"
            )
        verify(location, [TRAIN_STATE])
        return InitSource(location, CHECKPOINT, TrainState.load(location / TRAIN_STATE).step)
    source = InitSource(location, DIFFUSERS)
    config_file = source.unet_dir / "config.json"
    if not config_file.is_file():
        raise LdmError(
            f"{_KEY}: {location} is neither an ldm checkpoint tag, nor a diffusers pipeline "
            f"folder ({PIPELINE_INDEX} and unet/), nor a UNet folder (config.json); pass one "
            "of those or an original .safetensors checkpoint"
        )
    class_name = _read_json(config_file).get("_class_name")
    if class_name != "UNet2DConditionModel":
        raise LdmError(
            f"{_KEY}: {source.unet_dir} holds {class_name} weights, not a "
            "UNet2DConditionModel's; pass a text-to-image UNet's folder or its pipeline folder"
        )
    _diffusers_files(source.unet_dir)  # safetensors weights are there
    return source


def _diffusers_files(unet_dir: Path) -> list[Path]:
    """The safetensors files of a diffusers UNet folder (one, or the shards its index names)."""
    single, index = unet_dir / UNET_WEIGHTS, unet_dir / f"{UNET_WEIGHTS}.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted({str(s) for s in dict(_read_json(index).get("weight_map", {})).values()})
        if shards and all("/" not in s and (unet_dir / s).is_file() for s in shards):
            return [unet_dir / s for s in shards]
    pickled = [p.name for p in unet_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
    raise LdmError(
        f"{_KEY}: {unet_dir} has no {UNET_WEIGHTS} (or its complete shards)"
        + (f", only pickle files ({pickled[0]}), which are never read" if pickled else "")
        + "; save the UNet with safe_serialization=True"
    )


def _tag_files(tag: Path) -> dict[str, str]:
    """part -> its raw weight file, in a tag; the EMA and config files go with each."""
    parts = ["unet"] + (
        ["text_encoder"] if (tag / CONFIG_FILE.format("text_encoder")).is_file() else []
    )
    return {part: RAW_FILE.format(part) for part in parts}


def _tag_names(tag: Path) -> list[str]:
    """Every file of a tag that starting from it reads (each verified against the marker)."""
    return [
        name
        for part in _tag_files(tag)
        for name in (RAW_FILE.format(part), EMA_FILE.format(part), CONFIG_FILE.format(part))
    ]


# --- the driver's check ------------------------------------------------------------------------


def _header_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from safetensors headers; no tensor is read."""
    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        except Exception as err:  # safetensors raises its own error types, and OSError
            raise LdmError(
                f"{_KEY}: {file} is not a readable safetensors file ({type(err).__name__}); "
                "the source is damaged or not a model"
            ) from None
    return shapes


def _shapes(module: torch.nn.Module, parameters_only: bool = False) -> dict[str, tuple]:
    if parameters_only:
        return {name: tuple(p.shape) for name, p in module.named_parameters()}
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def check_fits(
    source: InitSource,
    what: str,
    found: Mapping[str, tuple],
    expected: Mapping[str, tuple],
    optional: Iterable[str] = (),
) -> None:
    """Refuse, in one line, a source whose tensors do not match the model's: the first of
    the model's tensors (in its order) that the source lacks or holds in another shape,
    else the source's first extra tensor. `optional`: names the source may lack (buffers a
    module rebuilds itself)."""
    skip = set(optional)
    missing = [name for name in expected if name not in found and name not in skip]
    absent = set(missing)
    for name, shape in expected.items():
        if name in absent:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise LdmError(
                f"{_KEY}: {source.location}'s {what} lacks {name}{more}; {_FIX_ARCHITECTURE}"
            )
        if name in found and tuple(found[name]) != tuple(shape):
            raise LdmError(
                f"{_KEY}: {source.location}'s {what} does not fit this config's: {name} is "
                f"{list(found[name])} there and {list(shape)} here; {_FIX_ARCHITECTURE}"
            )
    extra = [name for name in found if name not in expected]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise LdmError(
            f"{_KEY}: {source.location}'s {what} has {extra[0]}{more}, which this config's "
            f"lacks; {_FIX_ARCHITECTURE}"
        )


def _function(config: Mapping) -> dict:
    """The UNet settings in `_SAME_FUNCTION`, with diffusers' defaults and one form per key."""
    from diffusers import UNet2DConditionModel

    defaults = {
        name: p.default
        for name, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    values = {**defaults, **config}
    levels = len(values["block_out_channels"])

    def per_level(value):
        return list(value) if isinstance(value, list | tuple) else [value] * levels

    # diffusers' legacy naming: `attention_head_dim` counts heads unless num_attention_heads is set.
    values["heads"] = per_level(values["num_attention_heads"] or values["attention_head_dim"])
    values["only_cross_attention"] = per_level(values["only_cross_attention"])
    for key in ("down_block_types", "up_block_types"):
        values[key] = list(values[key])
    return {key: values[key] for key in _SAME_FUNCTION}


def _check_function(source: InitSource, source_config: Mapping, expected: Mapping) -> None:
    theirs, ours = _function(source_config), _function(expected)
    for key in _SAME_FUNCTION:
        if theirs[key] != ours[key]:
            name = "attention heads" if key == "heads" else key
            raise LdmError(
                f"{_KEY}: {source.location}'s UNet has {name} {json.dumps(theirs[key])}, this "
                f"config's {json.dumps(ours[key])} (the same shapes computing something "
                f"else); {_FIX_ARCHITECTURE}"
            )


def _check_tag_text_encoder(source: InitSource, config: ExperimentConfig) -> None:
    te = config.text_encoder
    if not te.trainable:
        raise LdmError(
            f"{_KEY}: {source.location} holds a text encoder trained with its UNet, but "
            "text_encoder.trainable=false would condition the UNet on another encoder's "
            "hidden states; set text_encoder.trainable=true (with its text_encoder.name_or_path"
            "), or `ldm export` the tag and name that folder in text_encoder.name_or_path too"
        )
    saved = _read_json(source.location / CONFIG_FILE.format("text_encoder"))
    encoder = build_text_encoder_meta(te)
    if saved.get("model_type") != encoder.config.model_type:
        raise LdmError(
            f"{_KEY}: {source.location}'s text encoder is a {saved.get('model_type')}, this "
            f"config's ({te.name_or_path}) a {encoder.config.model_type}; set "
            "text_encoder.name_or_path to the encoder the tag was trained with"
        )
    buffers = [name for name, _ in encoder.named_buffers()]
    raw = _header_shapes([source.location / RAW_FILE.format("text_encoder")])
    check_fits(source, "text encoder", raw, _shapes(encoder), buffers)
    ema = _header_shapes([source.location / EMA_FILE.format("text_encoder")])
    check_fits(source, "EMA text encoder", ema, _shapes(encoder, parameters_only=True))


def check_source(path: str, config: ExperimentConfig, latent_channels: int) -> InitSource:
    """On the driver, before any worker starts: what `path` is, and that its weights fit the
    config's model (names and shapes from file headers; an ldm tag's files verified).
    Raises LdmError naming the first thing that does not fit."""
    source = find_source(path)
    with torch.device("meta"):
        unet = build_unet(config, latent_channels)
    expected = _shapes(unet)
    if source.kind == CHECKPOINT:
        verify(source.location, _tag_names(source.location))
        tag = source.location
        if "text_encoder" in _tag_files(tag):
            _check_tag_text_encoder(source, config)
        check_fits(source, "UNet", _header_shapes([tag / RAW_FILE.format("unet")]), expected)
        ema = _header_shapes([tag / EMA_FILE.format("unet")])
        check_fits(source, "EMA UNet", ema, _shapes(unet, parameters_only=True))
        saved = _read_json(tag / CONFIG_FILE.format("unet"))
        _check_function(source, saved, unet.config)
    elif source.kind == DIFFUSERS:
        found = _header_shapes(_diffusers_files(source.unet_dir))
        check_fits(source, "UNet", found, expected)
        saved = _read_json(source.unet_dir / "config.json")
        _check_function(source, saved, unet.config)
    else:
        header = _header_shapes([source.location])
        names = diffusers_names(header, unet.config)
        if not names:
            raise LdmError(
                f"{_KEY}: {source.location} holds no {ORIGINAL_PREFIX}* weights: not an "
                "original Stable Diffusion checkpoint"
            )
        check_fits(source, "UNet", {d: header[o] for d, o in names.items()}, expected)
    return source


# --- each rank's load ----------------------------------------------------------------------


def _load_into(source: InitSource, what: str, module: torch.nn.Module, weights: dict) -> None:
    """`weights` into `module`, refused in one line unless they fit (as on the driver)."""
    buffers = [name for name, _ in module.named_buffers()]
    check_fits(
        source, what, {k: tuple(v.shape) for k, v in weights.items()}, _shapes(module), buffers
    )
    module.load_state_dict(weights, strict=False)


def load_source(path: str, model: torch.nn.Module) -> InitWeights:
    """Load the raw weights `path` holds into `model` (before its engine is built); returns
    the EMA weights the run's EMA starts from."""
    source = find_source(path)
    unet = unet_of(model)
    if source.kind == DIFFUSERS:
        weights = {}
        for file in _diffusers_files(source.unet_dir):
            weights.update(load_file(file))
        _load_into(source, "UNet", unet, weights)
        return InitWeights(ema=None)
    if source.kind == SINGLE_FILE:
        with safe_open(str(source.location), framework="pt") as f:
            names = diffusers_names(f.keys(), unet.config)
            weights = {name: f.get_tensor(original) for name, original in names.items()}
        _load_into(source, "UNet", unet, weights)
        return InitWeights(ema=None)
    tag = source.location
    verify(tag, _tag_names(tag))  # the driver checked; this rank reads them now
    modules = {"unet": unet}
    if isinstance(model, TextConditionedUNet) and "text_encoder" in _tag_files(tag):
        modules["text_encoder"] = model.text_encoder
    ema: dict[str, torch.Tensor] = {}
    for part, module in modules.items():
        what = "UNet" if part == "unet" else "text encoder"
        _load_into(source, what, module, load_file(tag / RAW_FILE.format(part)))
        prefix = "" if module is model else f"{part}."
        stored = load_file(tag / EMA_FILE.format(part))
        found = {name: tuple(t.shape) for name, t in stored.items()}
        check_fits(source, f"EMA {what}", found, _shapes(module, parameters_only=True))
        ema.update({prefix + name: tensor for name, tensor in stored.items()})
    return InitWeights(ema=ema, ema_step=source.step or 0)


def start_ema(ema, model: torch.nn.Module, init: InitWeights) -> None:
    """Make the run's EMA (diffusers' `EMAModel` over `model`'s parameters) the source's:
    its EMA weights where it has them, at its step. Otherwise it keeps what it was made
    from, the loaded raw weights."""
    if init.ema is None:
        return
    shadow = list(ema.shadow_params)
    for i, (name, parameter) in enumerate(model.named_parameters()):
        if name in init.ema:
            shadow[i] = init.ema[name].to(parameter.device)
    ema.shadow_params = shadow
    ema.optimization_step = init.ema_step
