"""Stage 1 with `autoencoder.regularization=vq`: a real tiny VQModel run, and what the later
stages do with it (precompute stores its pre-quantisation latents, sampling decodes through
the codebook, export refuses)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from core.errors import LdmError
from core.layout import RunLayout
from core.loader import build_config
from data_pipeline.cache import npy_bytes, npy_load
from data_pipeline.images import to_model_range
from models.autoencoder import build_autoencoder, fold_vq_shift, load_autoencoder
from models.unet import build_unet
from orchestrator.autoencoder import train_autoencoder
from tests.test_autoencoder import tiny_config, write_shard
from training import checkpoint as ckpt
from training.autoencoder_eval import reconstruct

CODEBOOK = 64


def vq_config(tmp: Path, shards: Path, *overrides: str):
    base = tiny_config(tmp, shards, train_crop=16, num_steps=8).to_dict()
    return build_config(
        base,
        [
            "autoencoder.regularization=vq",
            f"autoencoder.num_vq_embeddings={CODEBOOK}",
            "tracking.log_model=false",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vq")
    config = vq_config(tmp, write_shard(tmp / "shards"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)  # MLflow puts a new experiment's artifacts in ./mlruns
        metrics = train_autoencoder(config, progress=False)
    return config, metrics


def test_vq_autoencoder_is_published_as_a_plain_vqmodel(vq_run) -> None:
    config, metrics = vq_run
    saved = json.loads((Path(RunLayout.of(config).autoencoder_dir) / "config.json").read_text())
    assert saved["_class_name"] == "VQModel" and saved["num_vq_embeddings"] == CODEBOOK
    # The latent shift went into the weights: nothing diffusers' VQModel would not know.
    assert "shift_factor" not in saved and saved["scaling_factor"] == pytest.approx(
        metrics["scaling_factor"]
    )
    assert metrics["shift_factor"] != 0
    assert 0 < metrics["codebook_usage"] <= 1
    assert 0 < metrics["psnr"] < 100 and 0 < metrics["ssim"] < 1

    vae = load_autoencoder(RunLayout.of(config).autoencoder_dir)
    assert type(vae).__name__ == "VQModel"
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert reconstruct(vae, images).shape == images.shape
    with torch.no_grad():
        latents = vae.encode(to_model_range(images)).latents
        # Decode quantises: latents moved by less than half a code's distance decode the same.
        quantized, _, _ = vae.quantize(latents)
        assert torch.allclose(vae.decode(latents).sample, vae.decode(quantized).sample, atol=1e-5)


def test_fold_vq_shift_keeps_the_round_trip(tmp_path: Path) -> None:
    config = vq_config(tmp_path, tmp_path / "unused")
    torch.manual_seed(0)
    vae = build_autoencoder(config).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before_latents = vae.encode(x).latents
        before = vae.decode(before_latents).sample
        fold_vq_shift(vae, 0.3)
        after_latents = vae.encode(x).latents
        after = vae.decode(after_latents).sample
    assert torch.allclose(after_latents, before_latents - 0.3, atol=1e-5)
    assert torch.allclose(after, before, atol=1e-4)


def test_precompute_stores_pre_quantisation_latents_only(vq_run) -> None:
    from data_pipeline.precompute import Encoder, cache_spec

    config, _ = vq_run
    assert config.precompute.latents == "moments"  # the default, which VQ cannot honour
    spec = cache_spec(config, RunLayout.of(config).autoencoder_dir)
    assert spec["autoencoder_class"] == "VQModel" and spec["latents"] == "mean"
    assert spec["shift_factor"] == 0.0

    # The real encoder stage on one shard batch (token ids: no text encoder to load).
    encoder = Encoder(
        RunLayout.of(config).autoencoder_dir, "minilm", {**spec, "text": "token_ids"}, 1
    )
    pixels = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    row = {
        "shard": "00000.tar",
        "chunk": 0,
        "last": True,
        "num_bad": 0,
        "bad_examples": "[]",
        "filtered": "{}",
        "source_sha256": "0" * 64,
        "positions": json.dumps([0, 1, 2]),
        "keys": json.dumps(["a", "b", "c"]),
        "extras": "[]",
        "captions": json.dumps(["x", "y", "z"]),
        "pixels": npy_bytes(pixels),
        "input_ids": npy_bytes(np.ones((3, 4), np.int32)),
        "attention_mask": npy_bytes(np.ones((3, 4), np.int8)),
    }
    out = encoder({k: np.array([v], dtype=object) for k, v in row.items()})
    stored = np.stack([npy_load(m) for m in out["moments_npy"]])
    assert stored.shape == (3, 4, 8, 8)  # the latent only: no log-variance channels
    with torch.no_grad():
        expected = encoder.vae.encode(to_model_range(pixels)).latents.numpy()
    np.testing.assert_allclose(stored.astype(np.float32), expected, atol=2e-2)


def test_vq_checkpoint_samples_and_export_refuses(vq_run, tmp_path: Path) -> None:
    from orchestrator.export import export_pipeline
    from orchestrator.sample import sample_from_checkpoint
    from training.checkpoint import CONFIG_FILE, EMA_FILE

    config, _ = vq_run
    # A committed training tag as the UNet stage writes one, with a small random UNet.
    raw = config.to_dict()
    raw["autoencoder"]["pretrained"] = RunLayout.of(config).autoencoder_dir
    raw["unet"] = {"block_out_channels": [32, 64], "cross_attention_levels": 1}
    raw["unet"]["num_attention_heads"] = 2
    run_config = build_config(raw)
    tag = tmp_path / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    torch.manual_seed(0)
    unet = build_unet(run_config, latent_channels=4)
    unet.to_json_file(str(tag / CONFIG_FILE.format("unet")))
    ema = {k: v.contiguous() for k, v in unet.state_dict().items()}
    save_file(ema, tag / EMA_FILE.format("unet"))
    (tag / "config.yaml").write_text(yaml.safe_dump(run_config.to_dict()))
    (tag / ckpt.TRAIN_STATE).write_text(json.dumps({"step": 1}))
    ckpt.commit(tag)

    paths = sample_from_checkpoint(tag, ["an emoji of red heart"], tmp_path / "out", 1, 0, 2)
    assert len(paths) == 1 and paths[0].is_file()
    with pytest.raises(LdmError, match="is a VQModel .*StableDiffusionPipeline") as err:
        export_pipeline(tag, tmp_path / "export")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "export").exists()


def test_vq_needs_log_model_off(tmp_path: Path) -> None:
    base = tiny_config(tmp_path, tmp_path / "unused").to_dict()
    with pytest.raises(LdmError, match="tracking.log_model: .*set tracking.log_model=false"):
        build_config(base, ["autoencoder.regularization=vq"])
