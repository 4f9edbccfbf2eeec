"""Stage 1 resumes from its checkpoints into the weights an uninterrupted run ends with,
here with the paper's full loss switched on (L1, the perceptual term asked for but without
weights, the PatchGAN discriminator after a start step), so every piece of state counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from orchestrator.config import build_config
from orchestrator.errors import LdmError
from tests.test_autoencoder import tiny_config, write_shard
from training.autoencoder import _read_resume_state, train_autoencoder

STEPS = 6


def full_recipe(tmp: Path, shards: Path, *overrides: str):
    base = tiny_config(tmp, shards, train_crop=16, num_steps=STEPS, log_every=1).to_dict()
    return build_config(
        base,
        [
            "autoencoder.checkpoint_every=3",
            "autoencoder.reconstruction_loss=l1",
            "autoencoder.perceptual_weight=1.0",  # no autoencoder.lpips_path: must say OFF
            "autoencoder.discriminator_weight=0.5",
            "autoencoder.discriminator_start_step=2",
            "autoencoder.discriminator_layers=2",  # 16 px crops: 3 layers would not fit
            *overrides,
        ],
    )


def _weights(folder: Path) -> dict:
    (file,) = folder.glob("*.safetensors")
    return load_file(file)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, monkeypatch, capsys) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    config = full_recipe(tmp_path, write_shard(tmp_path / "shards"))
    first = train_autoencoder(config, progress=False)
    out = capsys.readouterr().out
    assert out.count("perceptual loss OFF") == 1, out
    assert "autoencoder.lpips_path is not set" in out
    root = config.run_dir / "autoencoder-checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000006"]
    uninterrupted = _weights(config.autoencoder_dir)
    final_tag = json.loads((root / "step_00000006" / "COMMITTED.json").read_text())["files"]

    # Resume from step 3, as a run killed between steps 3 and 6 would: here the step-6 tag
    # is damaged (one flipped byte), which also shows resuming falls back past such a tag.
    weights = root / "step_00000006" / "autoencoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    shutil.rmtree(config.autoencoder_dir)
    second = train_autoencoder(config, progress=False)
    out = capsys.readouterr().out
    assert "not resuming from a damaged checkpoint" in out and "step_00000006" in out
    assert "resuming from" in out and "step_00000003" in out
    assert second["resumed_at_step"] == 3
    resumed = _weights(config.autoencoder_dir)
    assert resumed.keys() == uninterrupted.keys()
    different = [k for k in resumed if not resumed[k].equal(uninterrupted[k])]
    assert not different, different[:5]
    again = json.loads((root / "step_00000006" / "COMMITTED.json").read_text())["files"]
    for name in ("autoencoder.safetensors", "discriminator.safetensors"):
        assert again[name] == final_tag[name], name  # the discriminator too, bit for bit
    assert second["psnr"] == pytest.approx(first["psnr"])

    # One MLflow run across both jobs, with the adversarial metrics from the start step on.
    client = MlflowClient(tracking_uri=config.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ae-test").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["perceptual_loss_enabled"] == 0
    assert run.data.tags["ldm.perceptual_loss"].startswith("off: ")
    history = client.get_metric_history(run.info.run_id, "d_loss")
    assert sorted({m.step for m in history}) == [3, 4, 5, 6]
    for key in ("g_loss", "adaptive_weight", "logits_real", "logits_fake", "l1", "kl"):
        assert key in run.data.metrics, key
    assert 0 <= run.data.metrics["adaptive_weight"] <= 1e4

    # A changed setting does not resume silently: one line naming the key and the fix.
    changed = full_recipe(tmp_path, tmp_path / "shards", "autoencoder.learning_rate=0.001")
    with pytest.raises(LdmError, match="autoencoder.learning_rate: .* holds checkpoints") as err:
        train_autoencoder(changed, progress=False)
    assert "\n" not in str(err.value) and "delete" in str(err.value)
    # Logging and checkpoint cadence may change between jobs.
    relaxed = full_recipe(tmp_path, tmp_path / "shards", "autoencoder.checkpoint_every=2")
    tag, state = _read_resume_state(relaxed)
    assert tag.name == "step_00000006" and state["step"] == STEPS
