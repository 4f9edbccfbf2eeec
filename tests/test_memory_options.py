"""The memory/speed switches (train.gradient_checkpointing, attention, channels_last,
precision, compile, fused_optimizer) and the objectives: each takes effect, trains (a
DeepSpeed engine's loss falls on a fixed batch), and the memory and speed switches compute
the same function as the default.

One in-process, one-rank gloo group serves every case: a real DeepSpeed engine per case,
seconds each. `train.compile` compiles with AOTAutograd's eager backend here: the same
graph capture, guards and joint forward-backward graphs as inductor, without inductor's
C++ code generation (minutes on a 2-core machine); `make gpu-check` times inductor itself.
"""

from __future__ import annotations

import pytest
import torch

from core.presets import tiny
from data_pipeline.cache import CacheBatch

SWITCHES = {
    "default": [],
    "gradient_checkpointing": ["train.gradient_checkpointing=true"],
    "eager_attention": ["train.attention=eager"],
    "channels_last": ["train.channels_last=true"],
    "bf16": ["train.precision=bf16"],
    "compile": ["train.compile=default"],
    "fused_optimizer": ["train.fused_optimizer=true"],
    # Objectives: v-prediction with zero terminal SNR and Min-SNR weighting; the cosine schedule.
    "v_zero_snr_min_snr": [
        "diffusion.prediction_type=v_prediction",
        "diffusion.rescale_zero_terminal_snr=true",
        "diffusion.snr_gamma=5",
    ],
    "cosine_schedule": ["diffusion.beta_schedule=squaredcos_cap_v2"],
    "all": [
        "train.gradient_checkpointing=true",
        "train.channels_last=true",
        "train.precision=bf16",
    ],
}


@pytest.fixture(autouse=True)
def _traced_compile(monkeypatch):
    monkeypatch.setattr("training.engine.COMPILE_BACKEND", "aot_eager")


def _config(overrides: list[str]):
    from core.loader import build_config

    base = tiny().to_dict()
    base["train"].update(zero_stage=2, micro_batch_size=4, global_batch_size=4, num_workers=1)
    base["train"]["learning_rate"] = 2e-3
    return build_config(base, overrides, absolute_paths=False)


def _batch() -> CacheBatch:
    g = torch.Generator().manual_seed(0)
    return CacheBatch(
        moments=torch.randn(4, 1, 8, 8, 8, generator=g),
        context=torch.randn(4, 16, 384, generator=g),
        mask=torch.ones(4, 16, dtype=torch.bool),
    )


def _losses(overrides: list[str], num_steps: int) -> tuple[list[float], torch.nn.Module, dict]:
    """Losses of `num_steps` engine steps on one batch with the same noise each step, the
    UNet, and what its first convolution gave (layout, dtype)."""
    from models.schedulers import build_noise_scheduler
    from models.unet import build_unet
    from training.engine import build_engine, compiled_graphs
    from training.objective import diffusion_loss

    config = _config(overrides)
    torch.manual_seed(0)
    unet = build_unet(config, latent_channels=4)
    engine = build_engine(unet, config, world_size=1)
    # Filled in place (its keys fixed): under torch.compile the hook is traced, and a dict
    # that grew between steps would fail a guard and recompile.
    seen: dict = {"channels_last": None, "dtype": None}
    graphs: list[int] = []

    def look(module, inputs, output):
        seen["channels_last"] = output.is_contiguous(memory_format=torch.channels_last)
        seen["dtype"] = output.dtype

    unet.conv_in.register_forward_hook(look)
    scheduler = build_noise_scheduler(config)
    empty = (torch.zeros(16, 384), torch.zeros(16, dtype=torch.bool))
    batch, losses = _batch(), []
    for _ in range(num_steps):
        torch.manual_seed(1)  # same latent draw, noise and timesteps: a fixed objective
        loss, _ = diffusion_loss(
            engine, batch, scheduler, (0.0, 1.0), empty, 0.0, None, config.train.channels_last
        )
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        graphs.append(compiled_graphs())
    return losses, unet, {**seen, "graphs": graphs, "optimizer": engine.optimizer}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_switch_takes_effect_and_trains(process_group, name):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    overrides = SWITCHES[name]
    losses, unet, seen = _losses(overrides, num_steps=6)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.8 * losses[0], losses

    config = _config(overrides)
    t = config.train
    assert unet.is_gradient_checkpointing == t.gradient_checkpointing
    expected = AttnProcessor2_0 if t.attention == "sdpa" else AttnProcessor
    assert {type(p) for p in unet.attn_processors.values()} == {expected}
    assert seen["channels_last"] == t.channels_last
    assert seen["dtype"] == (torch.bfloat16 if t.precision == "bf16" else torch.float32)
    graphs = seen["graphs"]
    if t.compile != "off":  # compiled at the first step, never again
        assert unet._compiled_call_impl is not None
        assert graphs[0] > 0 and graphs[-1] == graphs[0], graphs
    else:
        assert unet._compiled_call_impl is None
    torch_optimizer = seen["optimizer"].optimizer  # inside DeepSpeed's ZeRO wrapper
    assert bool(torch_optimizer.defaults["fused"]) == t.fused_optimizer


@pytest.mark.parametrize(
    "name",
    ["gradient_checkpointing", "eager_attention", "channels_last", "compile", "fused_optimizer"],
)
def test_switch_computes_the_same_function(process_group, name):
    """Memory layout, recomputation, the attention kernel, compilation and the fused
    optimizer change cost, not the maths."""
    reference, _, _ = _losses([], num_steps=3)
    switched, _, _ = _losses(SWITCHES[name], num_steps=3)
    assert switched == pytest.approx(reference, rel=1e-4), (switched, reference)
