"""The pieces of the paper's stage-1 loss and its metrics, each on small known inputs:
PatchGAN discriminator, hinge loss, adaptive weight, the LPIPS loader, SSIM and the
few-sample Frechet distance, the config checks that guard them, and the DeepSpeed engines
that train them."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import LdmError
from core.loader import build_config
from models.discriminator import NLayerDiscriminator, adaptive_weight, generator_loss, hinge_d_loss
from models.metrics import frechet_distance, frechet_distance_few, psnr, ssim
from models.perceptual import _VGG16, BACKBONE_FILE, LINEAR_FILE, LPIPS, missing_files
from tests.test_autoencoder import tiny_config
from training import autoencoder_losses as stage


@pytest.mark.parametrize(("side", "layers", "logits"), [(32, 3, 2), (64, 3, 6), (16, 2, 2)])
def test_patch_discriminator_gives_a_logit_map(side: int, layers: int, logits: int) -> None:
    disc = NLayerDiscriminator(num_layers=layers)
    out = disc(torch.randn(2, 3, side, side))
    assert out.shape == (2, 1, logits, logits)
    norms = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == layers
    assert all(m.negative_slope == 0.2 for m in disc.modules() if isinstance(m, torch.nn.LeakyReLU))


def test_default_discriminator_is_the_papers_size() -> None:
    # 64 -> 128 -> 256 -> 512 channels, 4x4 kernels: taming-transformers' NLayerDiscriminator.
    assert sum(p.numel() for p in NLayerDiscriminator().parameters()) == 2_765_633


def test_hinge_and_generator_losses() -> None:
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)  # margins met only at +-2
    assert hinge_d_loss(torch.tensor([1.5]), torch.tensor([-1.5])).item() == 0.0
    assert generator_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)


def test_adaptive_weight_is_the_gradient_norm_ratio_clamped() -> None:
    layer = torch.ones(3, requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    weight = adaptive_weight((layer * a).sum(), (layer * b).sum(), layer)
    assert weight.item() == pytest.approx(5.0 / (1.0 + 1e-4))
    assert not weight.requires_grad
    vanishing = adaptive_weight((layer * a).sum(), (layer * 1e-12).sum(), layer)
    assert vanishing.item() == 1e4


def _lpips_files(folder: Path) -> Path:
    """LPIPS weight files in the layout the real ones have, with random values: the loader
    and the distance's algebra are under test here, not its perceptual calibration."""
    torch.manual_seed(0)
    backbone, index, channels = {}, 0, 3
    for item in _VGG16:
        if item == "M":
            index += 1
            continue
        backbone[f"features.{index}.weight"] = torch.randn(item, channels, 3, 3) * 0.05
        backbone[f"features.{index}.bias"] = torch.zeros(item)
        index, channels = index + 2, item
    backbone["classifier.0.weight"] = torch.zeros(1)  # torchvision's file has the head too
    linear = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
        for i, c in enumerate((64, 128, 256, 512, 512))
    }
    folder.mkdir()
    torch.save(backbone, folder / BACKBONE_FILE)
    torch.save(linear, folder / LINEAR_FILE)
    return folder


def test_lpips_loads_local_files_and_is_a_distance(tmp_path: Path) -> None:
    assert missing_files(None) == "autoencoder.lpips_path is not set"
    assert BACKBONE_FILE in missing_files(str(tmp_path))
    folder = _lpips_files(tmp_path / "lpips")
    assert missing_files(str(folder)) is None
    lpips = LPIPS(folder)
    assert not any(p.requires_grad for p in lpips.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(d, lpips(y, x), atol=1e-6)
    d.sum().backward()  # a loss: its gradient reaches the reconstruction
    assert y.grad is not None and y.grad.abs().sum() > 0

    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, folder / LINEAR_FILE)
    with pytest.raises(LdmError, match="autoencoder.lpips_path=.*lpips v0.1") as err:
        LPIPS(folder)
    assert "\n" not in str(err.value)


def test_ssim_known_values() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert ssim(images, images) == pytest.approx(1.0)
    # Two flat images: only the luminance term is left, (2 a b + C1) / (a^2 + b^2 + C1).
    a, b = np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1))
    noisy = [
        np.clip(images + rng.normal(0, s, images.shape), 0, 255).astype(np.uint8) for s in (5, 20)
    ]
    assert 1 > ssim(images, noisy[0]) > ssim(images, noisy[1]) > 0
    assert psnr(images, noisy[0]) > psnr(images, noisy[1])
    assert ssim(images[:, :7, :7], images[:, :7, :7]) == pytest.approx(1.0)  # < 11 px


def test_few_sample_frechet_distance_equals_the_full_one() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 40)), rng.normal(0.5, 2.0, size=(9, 40))
    assert frechet_distance_few(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-6)
    assert frechet_distance_few(a, a) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            {"discriminator_weight": 0.5, "discriminator_start_step": 30},
            "autoencoder.discriminator_start_step: 30 is not below autoencoder.num_steps=30",
        ),
        (
            {"discriminator_weight": 0.5, "train_crop": 16},
            "autoencoder.discriminator_layers: 3 layers need crops of at least 24 px",
        ),
    ],
)
def test_discriminator_settings_are_checked_on_load(tmp_path, overrides, fragment) -> None:
    with pytest.raises(LdmError, match=fragment):
        tiny_config(tmp_path, tmp_path / "unused", **overrides)
    tiny_config(tmp_path, tmp_path / "unused", **{**overrides, "discriminator_weight": 0})


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            {"num_workers": 3},
            "autoencoder.batch_size: 8 images per step do not split evenly over "
            "autoencoder.num_workers=3",
        ),
        ({"zero_stage": 3}, "autoencoder.zero_stage: 3 is not supported"),
    ],
)
def test_distributed_settings_are_checked_on_load(tmp_path, overrides, fragment) -> None:
    with pytest.raises(LdmError, match=fragment) as err:
        tiny_config(tmp_path, tmp_path / "unused", **overrides)
    assert "\n" not in str(err.value)


def test_stage1_deepspeed_json_is_derived(tmp_path) -> None:
    from training.engine import autoencoder_deepspeed_config

    config = tiny_config(tmp_path, tmp_path / "unused", num_workers=2, zero_stage=2)
    ds = autoencoder_deepspeed_config(config, world_size=2, num_parameters=5000)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5120  # the model, not 2 GB
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed would clip at 1.0


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_engines_step_as_plain_torch(process_group, tmp_path, zero_stage) -> None:
    """A stage-1 step through its two DeepSpeed engines (the autoencoder's, with the
    adaptive weight's autograd.grad inside its forward, then the discriminator's) updates
    the weights exactly as plain torch optimizers do: nothing added, such as the gradient
    clipping DeepSpeed applies unless told otherwise."""
    from models.autoencoder import build_autoencoder
    from models.discriminator import NLayerDiscriminator
    from training.engine import autoencoder_deepspeed_config, build_module_engine

    config = build_config(
        tiny_config(tmp_path, tmp_path / "unused", train_crop=16).to_dict(),
        [
            f"autoencoder.zero_stage={zero_stage}",
            "autoencoder.reconstruction_loss=l1",
            "autoencoder.discriminator_weight=0.5",
            "autoencoder.discriminator_layers=2",
            "autoencoder.discriminator_start_step=1",
        ],
    )
    ae = config.autoencoder
    torch.manual_seed(0)
    vae, disc = build_autoencoder(config).train(), NLayerDiscriminator(num_layers=2).train()
    models = {"plain": (vae, disc), "deepspeed": (copy.deepcopy(vae), copy.deepcopy(disc))}
    parts = {}
    for name, (v, d) in models.items():
        optimizer = torch.optim.AdamW(v.parameters(), lr=ae.learning_rate, fused=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, stage.lr_factor(ae.num_steps))
        d_optimizer = torch.optim.Adam(d.parameters(), lr=ae.learning_rate, betas=(0.5, 0.9))
        critics = stage.Critics(lpips=None, disc=d)
        loss, d_loss = stage.AutoencoderLoss(config, v, critics), stage.DiscriminatorLoss(d)
        parts[name] = (loss, d_loss, optimizer, schedule, d_optimizer, critics)
    loss, d_loss, optimizer, schedule, d_optimizer, critics = parts["deepspeed"]
    ds = autoencoder_deepspeed_config(config, 1, 10_000)
    engine = build_module_engine(loss, optimizer, ds, schedule)
    d_engine = build_module_engine(d_loss, d_optimizer, ds)
    deepspeed_step = stage.AdversarialStep(config, engine, d_engine, critics)

    loss, d_loss, optimizer, schedule, d_optimizer, _ = parts["plain"]
    g = torch.Generator().manual_seed(0)
    for step in (1, 2, 3):
        x = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
        adversarial = step > 1
        torch.manual_seed(step)  # the same KL posterior sample on both sides
        disc.requires_grad_(not adversarial)
        total, x_hat, logged = loss(x, adversarial)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        schedule.step()
        if adversarial:
            disc.requires_grad_(True)
            d_total, _ = d_loss(x, x_hat)
            d_optimizer.zero_grad()
            d_total.backward()
            d_optimizer.step()
        torch.manual_seed(step)
        through_engines = deepspeed_step(x, step)
        assert through_engines["loss"].item() == logged["loss"].item()
        if adversarial:
            assert through_engines["adaptive_weight"] > 0 and "d_loss" in through_engines
            assert through_engines["adaptive_weight"].item() == logged["adaptive_weight"].item()
    for plain, deepspeed in zip(models["plain"], models["deepspeed"], strict=True):
        trained = deepspeed.state_dict()
        for key, value in plain.state_dict().items():
            assert torch.equal(value, trained[key]), key
