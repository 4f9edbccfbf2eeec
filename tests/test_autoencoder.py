"""`ldm autoencoder`: a tiny real training run on the fixture emoji, and its failure modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from core.errors import LdmError
from core.layout import RunLayout
from core.loader import build_config
from data_pipeline.image_set import load_images, random_crops
from data_pipeline.images import to_model_range, to_uint8
from models.autoencoder import build_autoencoder, load_autoencoder
from models.metrics import bicubic_baseline, psnr
from orchestrator.autoencoder import train_autoencoder
from tests.conftest import FIXTURE_IMAGES
from training.autoencoder_eval import publish, reconstruct

NUM_IMAGES = 32
NUM_HOLDOUT = 4
NUM_STEPS = 30


def write_shard(folder: Path, broken: int = 0) -> Path:
    """One img2dataset-style tar of fixture PNGs, plus `broken` samples that do not decode."""
    folder.mkdir(parents=True, exist_ok=True)
    pngs = sorted(FIXTURE_IMAGES.glob("*.png"))[:NUM_IMAGES]
    assert len(pngs) == NUM_IMAGES, f"expected {NUM_IMAGES} PNGs in {FIXTURE_IMAGES}"
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        for i, png in enumerate(pngs):
            sink.write({"__key__": f"{i:09d}", "png": png.read_bytes(), "txt": png.stem})
        for i in range(broken):
            sink.write({"__key__": f"broken{i:03d}", "png": b"not a png", "txt": "broken"})
    return folder


def tiny_config(tmp: Path, shards: Path, **autoencoder):
    return build_config(
        {
            "run": {"name": "tiny", "root": str(tmp / "runs"), "seed": 0},
            "data": {"shards": str(shards), "resolution": 32},
            "autoencoder": {
                "block_out_channels": [32, 32, 32],
                "batch_size": 8,
                "num_steps": NUM_STEPS,
                "log_every": 5,
                "learning_rate": 3e-3,
                "num_holdout": NUM_HOLDOUT,
                **autoencoder,
            },
            "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "ae-test"},
        }
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ae")
    config = tiny_config(tmp, write_shard(tmp / "shards", broken=1), train_crop=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)  # MLflow puts a new experiment's artifacts in ./mlruns
        metrics = train_autoencoder(config, progress=False)
    return config, metrics


def test_saves_a_loadable_scaled_autoencoder(trained) -> None:
    config, metrics = trained
    folder = Path(RunLayout.of(config).autoencoder_dir)
    assert list(folder.glob("*.safetensors")), "weights must be saved as safetensors"
    vae = load_autoencoder(folder)
    scaling = vae.config.scaling_factor
    assert scaling != 1.0 and np.isfinite(scaling) and scaling > 0
    assert scaling == pytest.approx(metrics["scaling_factor"], rel=1e-6)

    images = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    assert reconstruct(vae, images).shape == (3, 32, 32, 3)
    latents = vae.encode(to_model_range(images)).latent_dist.mode()
    assert latents.shape == (3, 4, 8, 8)  # f=4, 4 latent channels

    saved = json.loads((folder / "metrics.json").read_text())
    for key in ("psnr", "psnr_bicubic", "ssim", "rfd_efficientnet_lite0", "scaling_factor"):
        assert saved[key] == pytest.approx(metrics[key])
    assert saved["steps"] == NUM_STEPS
    # Nothing but the published folder and the checkpoints is left: no staging or old copies.
    assert sorted(p.name for p in RunLayout.of(config).run_dir.iterdir()) == [
        "autoencoder",
        "autoencoder-checkpoints",
    ]
    # The last step always checkpoints; with checkpoint_every=250 it is the only tag.
    tags = sorted((RunLayout.of(config).run_dir / "autoencoder-checkpoints").iterdir())
    assert [t.name for t in tags] == [f"step_{NUM_STEPS:08d}"]
    assert (tags[0] / "COMMITTED.json").is_file()


def test_holdout_and_undecodable_counts(trained) -> None:
    _, metrics = trained
    assert metrics["holdout_images"] == NUM_HOLDOUT
    assert metrics["train_images"] == NUM_IMAGES - NUM_HOLDOUT
    assert metrics["undecodable"] == 1
    assert metrics["train_crop"] == 16
    assert 0 < metrics["psnr_bicubic"] < 100 and 0 < metrics["psnr"] < 100
    assert 0 < metrics["ssim"] < 1 and 0 < metrics["ssim_bicubic"] < 1
    assert metrics["rfd_efficientnet_lite0"] > 0 and metrics["rfd_efficientnet_lite0_bicubic"] > 0
    # Off by default: the demo's recipe is MSE + KL only.
    assert metrics["perceptual_loss_enabled"] == 0 and metrics["resumed_at_step"] == 0


def test_mlflow_run_has_the_metrics_and_loss_went_down(trained) -> None:
    from mlflow.tracking import MlflowClient

    config, metrics = trained
    client = MlflowClient(tracking_uri=RunLayout.of(config).tracking_uri)
    experiment = client.get_experiment_by_name("ae-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny-autoencoder"
    assert run.info.status == "FINISHED"
    assert run.data.tags["ldm.stage"] == "autoencoder"
    assert run.data.params["autoencoder.num_steps"] == str(NUM_STEPS)
    for key in ("psnr", "psnr_bicubic", "ssim", "ssim_bicubic", "scaling_factor"):
        assert run.data.metrics[key] == pytest.approx(metrics[key])
    for key in ("rfd_efficientnet_lite0", "rfd_efficientnet_lite0_bicubic"):
        assert run.data.metrics[key] == pytest.approx(metrics[key])
    assert run.data.metrics["perceptual_loss_enabled"] == 0
    assert "d_loss" not in run.data.metrics  # no discriminator unless its weight is set
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    losses = [m.value for m in history]
    assert len(losses) >= NUM_STEPS // 5
    # Five steps of 8 small crops make a noisy window (mostly-background crops are easy): the
    # last window is below the first, and learning shows without that noise in the held-out
    # PSNR, which beats the untrained model's by more than 1 dB (measured: ~10.3 vs ~8 dB).
    assert losses[-1] < losses[0], losses
    torch.manual_seed(config.run.seed)
    untrained = build_autoencoder(config).eval()
    _, test, _ = load_images(config)
    assert metrics["psnr"] > psnr(test, reconstruct(untrained, test)) + 1.0
    assert run.data.tags["ldm.world_size"] == "1" and run.data.tags["ldm.zero_stage"] == "0"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "metrics.json" in artifacts
    assert any(a.startswith("images") for a in artifacts), artifacts


def test_retraining_replaces_the_folder_atomically(tmp_path: Path, monkeypatch) -> None:
    config = tiny_config(tmp_path, tmp_path / "unused")
    target = Path(RunLayout.of(config).autoencoder_dir)
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old model")
    vae = build_autoencoder(config)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(vae), "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        publish(vae, {"psnr": 1.0}, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["autoencoder"]
    assert (target / "stale.txt").read_text() == "old model"

    monkeypatch.undo()
    publish(vae, {"psnr": 1.0}, target)
    assert not (target / "stale.txt").exists()
    assert json.loads((target / "metrics.json").read_text()) == {"psnr": 1.0}
    assert sorted(p.name for p in target.parent.iterdir()) == ["autoencoder"]


def test_empty_shard_folder_is_an_ldm_error(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    with pytest.raises(LdmError, match="no \\*.tar shards"):
        train_autoencoder(tiny_config(tmp_path, tmp_path / "shards"), progress=False)


def test_unreadable_shards_are_an_ldm_error(tmp_path: Path, capsys) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(b"\x00garbage, not a tar file" * 100)
    with pytest.raises(LdmError, match="only 0 decodable images"):
        train_autoencoder(tiny_config(tmp_path, shards), progress=False)
    assert "00000.tar" in capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run for a stage that cannot start"


@pytest.mark.parametrize("crop", [18, 64])
def test_train_crop_must_fit_the_latent_grid(tmp_path: Path, crop: int) -> None:
    # Refused when the config is loaded, before any stage starts or any MLflow run exists.
    with pytest.raises(LdmError, match="autoencoder.train_crop"):
        tiny_config(tmp_path, write_shard(tmp_path / "shards"), train_crop=crop)
    assert not (tmp_path / "mlflow.db").exists()


def test_pretrained_is_a_no_op(tmp_path: Path, capsys) -> None:
    config = tiny_config(tmp_path, tmp_path / "unused", pretrained=str(tmp_path / "sd-vae"))
    assert train_autoencoder(config, progress=False) == {}
    assert "nothing to train" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_psnr_and_bicubic_baseline() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert psnr(images, images) == pytest.approx(100.0)
    smooth = np.repeat(np.repeat(images[:, ::4, ::4], 4, axis=1), 4, axis=2)
    baseline = bicubic_baseline(smooth, 4)
    assert baseline.shape == smooth.shape and baseline.dtype == np.uint8
    assert psnr(smooth, baseline) > psnr(images, bicubic_baseline(images, 4))


def test_random_crops_are_seeded_in_range_and_flipped() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    first = random_crops(images, 64, 8, torch.Generator().manual_seed(1))
    again = random_crops(images, 64, 8, torch.Generator().manual_seed(1))
    assert first.shape == (64, 3, 8, 8) and first.equal(again)
    assert -1 <= float(first.min()) and float(first.max()) <= 1
    crops = to_uint8(first)
    windows = {
        (i, top, left, flip)
        for i in range(5)
        for top in range(9)
        for left in range(9)
        for flip in (False, True)
    }
    found = set()
    for crop in crops:
        for i, top, left, flip in windows:
            patch = images[i, top : top + 8, left : left + 8]
            if np.array_equal(crop, patch[:, ::-1] if flip else patch):
                found.add(flip)
                break
        else:
            raise AssertionError("a crop is not a window of an input image")
    assert found == {False, True}
