"""Stable Diffusion's original single-file checkpoint format (CompVis' LDM code, the
`.safetensors` files published models ship as) for the UNet: its key names, both ways.

A diffusers `UNet2DConditionModel` names its weights by block (`down_blocks.1.resnets.0...`);
the original code numbers its modules in one sequence per UNet half
(`model.diffusion_model.input_blocks.4.0...`). Reading uses diffusers' own conversion
(`convert_ldm_unet_checkpoint`), run on the key names alone, so a file's names can be
checked against a model before any tensor is read. Writing needs the inverse, which
diffusers does not ship for any UNet shape (its script hardcodes Stable Diffusion's four
levels of two layers): `original_names` derives it from the UNet's config and checks every
name by converting it back with diffusers' conversion. Pure key mapping: nothing here reads
files.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

ORIGINAL_PREFIX = "model.diffusion_model."
"""Where the UNet's weights are in an original checkpoint (the autoencoder's are under
`first_stage_model.`, the text encoder's under `cond_stage_model.`)."""

# Inside a ResNet block, diffusers' names for the original's modules (the reverse of
# diffusers' `update_unet_resnet_ldm_to_diffusers`); attention blocks keep their inner names.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Outside the blocks (as diffusers' DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]).
_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_BLOCK = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$"
)
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _resnet(rest: str) -> str:
    module, _, tail = rest.partition(".")
    return f"{_RESNET.get(module, module)}.{tail}"


def _original_name(name: str, layers: int, attention_blocks: set[tuple[str, int]]) -> str | None:
    """The original name (without `ORIGINAL_PREFIX`) of diffusers' `name` in a UNet with
    `layers` layers per block, or None for a name this layout does not know."""
    for module, original in _TOP.items():
        if name.startswith(module + "."):
            return original + name[len(module) :]
    if match := _MID.match(name):
        kind, index, rest = match.groups()
        # middle_block: resnet, attention, resnet.
        if kind == "resnets":
            return f"middle_block.{2 * int(index)}.{_resnet(rest)}"
        return f"middle_block.{2 * int(index) + 1}.{rest}"
    match = _BLOCK.match(name)
    if match is None:
        return None
    half, block, kind, index, rest = match.groups()
    block, index = int(block), int(index)
    if half == "down_blocks":
        # input_blocks.0 is conv_in; each level then has `layers` (resnet, attention) entries
        # and, below the last level, one downsampler entry.
        entry = 1 + block * (layers + 1) + index
        if kind == "resnets":
            return f"input_blocks.{entry}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{entry}.1.{rest}"
        return f"input_blocks.{(block + 1) * (layers + 1)}.0.op.{rest.removeprefix('conv.')}"
    # Each up level has `layers + 1` entries; its upsampler follows the last entry's
    # attention (when the level has one) inside that entry.
    entry = block * (layers + 1) + index
    if kind == "resnets":
        return f"output_blocks.{entry}.0.{_resnet(rest)}"
    if kind == "attentions":
        return f"output_blocks.{entry}.1.{rest}"
    position = 2 if ("up", block) in attention_blocks else 1
    return f"output_blocks.{block * (layers + 1) + layers}.{position}.{rest}"


def diffusers_names(original: Iterable[str], unet_config: Mapping) -> dict[str, str]:
    """diffusers name -> original name (with `ORIGINAL_PREFIX`) for the UNet weights among
    `original` names, by diffusers' own conversion; other names (autoencoder, text
    encoder, EMA copies) are left out."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    names = {name: name for name in original if name.startswith(ORIGINAL_PREFIX)}
    # The conversion copies values by key: given each name as its own value, it returns
    # which original name every diffusers name comes from. It warns about EMA copies (which
    # it leaves out, as this does): not news here.
    logger = logging.getLogger("diffusers.loaders.single_file_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return dict(convert_ldm_unet_checkpoint(names, dict(unet_config)))
    finally:
        logger.setLevel(level)


def original_names(names: Iterable[str], unet_config: Mapping) -> dict[str, str]:
    """diffusers name -> original name (with `ORIGINAL_PREFIX`) for every weight name of a
    UNet with `unet_config`. Raises ValueError when diffusers' conversion would not read a
    name back to itself (a block layout this mapping does not cover)."""
    layers = unet_config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(
            f"layers_per_block={layers!r}: only one count for every level is supported"
        )
    attention_blocks = {
        ("up", i) for i, kind in enumerate(unet_config["up_block_types"]) if "CrossAttn" in kind
    }
    names = list(names)
    mapping: dict[str, str] = {}
    for name in names:
        original = _original_name(name, layers, attention_blocks)
        if original is None:
            raise ValueError(f"{name}: no original Stable Diffusion name for this weight")
        mapping[name] = ORIGINAL_PREFIX + original
    back = diffusers_names(mapping.values(), unet_config)
    wrong = [name for name in names if back.get(name) != mapping[name]]
    if wrong or len(back) != len(mapping):
        raise ValueError(
            f"{(wrong or sorted(set(back) - set(mapping)))[0]}: diffusers' conversion does not "
            "read the original name back to it"
        )
    return mapping


def to_original(state: Mapping, unet_config: Mapping) -> dict:
    """A diffusers UNet state dict under its original checkpoint names."""
    names = original_names(state, unet_config)
    return {names[name]: tensor for name, tensor in state.items()}
