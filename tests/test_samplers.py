"""Noise schedules and samplers, all through diffusers: each configured sampler draws
images, deterministically per seed; the negative prompt and guidance rescale act; zero
terminal SNR reaches pure noise and is refused where it cannot work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import LdmError
from core.loader import build_config
from core.presets import tiny
from models.autoencoder import build_autoencoder
from models.schedulers import build_noise_scheduler, build_sampling_scheduler
from models.unet import build_unet

PROMPTS = ["an emoji of red heart", "an emoji of blue heart"]


def _config(tmp_path=None, overrides=()):
    raw = tiny().to_dict()
    if tmp_path is not None:
        raw["autoencoder"]["pretrained"] = str(tmp_path / "autoencoder")
    return build_config(raw, list(overrides), absolute_paths=False)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny random autoencoder on disk, a tiny random UNet and one Sampler (its encoders
    load once; each case swaps in its config's scheduler): samplers only need shapes."""
    from training.sampling import Sampler

    tmp = tmp_path_factory.mktemp("samplers")
    config = _config(tmp)
    torch.manual_seed(0)
    build_autoencoder(_config()).save_pretrained(tmp / "autoencoder")
    unet = build_unet(config, latent_channels=4).eval()
    return tmp, unet, Sampler(config, tmp / "autoencoder")


def _sample(parts, overrides=(), negative_prompt=None, seed=0):
    tmp, unet, sampler = parts
    sampler.config = _config(tmp, overrides)
    sampler.scheduler = build_sampling_scheduler(sampler.config)
    return sampler(unet, PROMPTS, seed, 4, 4.0, negative_prompt)


@pytest.mark.parametrize("name", ["ddim", "pndm", "dpm_solver++"])
def test_each_sampler_draws_deterministic_images(parts, name):
    images = _sample(parts, [f"sample.sampler={name}"])
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, _sample(parts, [f"sample.sampler={name}"]))
    assert not np.array_equal(images, _sample(parts, [f"sample.sampler={name}"], seed=1))


def test_samplers_differ_and_guidance_options_act(parts):
    ddim = _sample(parts)
    assert not np.array_equal(ddim, _sample(parts, ["sample.sampler=dpm_solver++"]))
    assert not np.array_equal(ddim, _sample(parts, negative_prompt="an emoji of a fish"))
    assert np.array_equal(  # the config's negative prompt is the default one
        _sample(parts, ["sample.negative_prompt=an emoji of a fish"]),
        _sample(parts, negative_prompt="an emoji of a fish"),
    )
    assert not np.array_equal(ddim, _sample(parts, ["sample.guidance_rescale=0.7"]))


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedules_come_from_diffusers(schedule):
    scheduler = build_noise_scheduler(_config(overrides=[f"diffusion.beta_schedule={schedule}"]))
    alphas = scheduler.alphas_cumprod
    assert len(alphas) == 1000 and bool((alphas[1:] < alphas[:-1]).all())
    assert 0 < float(alphas[-1]) < 0.05


def test_zero_terminal_snr_reaches_pure_noise_and_samples_from_it():
    zero_snr = [
        "diffusion.prediction_type=v_prediction",
        "diffusion.rescale_zero_terminal_snr=true",
    ]
    config = _config(overrides=zero_snr)
    assert float(build_noise_scheduler(config).alphas_cumprod[-1]) == pytest.approx(0, abs=1e-7)
    plain = build_noise_scheduler(_config(overrides=zero_snr[:1]))
    assert float(plain.alphas_cumprod[-1]) > 1e-3
    for name in ("ddim", "dpm_solver++"):
        sampler = build_sampling_scheduler(_config(overrides=[*zero_snr, f"sample.sampler={name}"]))
        sampler.set_timesteps(10)
        assert int(sampler.timesteps[0]) == 999  # trailing: starts at the pure-noise step


def test_zero_terminal_snr_is_refused_where_it_cannot_work():
    with pytest.raises(LdmError, match="diffusion.rescale_zero_terminal_snr: needs"):
        _config(overrides=["diffusion.rescale_zero_terminal_snr=true"])
    with pytest.raises(LdmError, match="sample.sampler: pndm"):
        _config(
            overrides=[
                "diffusion.prediction_type=v_prediction",
                "diffusion.rescale_zero_terminal_snr=true",
                "sample.sampler=pndm",
            ]
        )
