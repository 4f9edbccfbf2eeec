"""Stage 1 resumes from its checkpoints into the weights an uninterrupted run ends with,
here with the paper's full loss switched on (L1, the perceptual term asked for but without
weights, the PatchGAN discriminator after a start step), so every piece of state counts:
with one Ray Train worker, and with two DeepSpeed ranks at ZeRO-2 that each draw their own
crops. The tests share one embedded Ray. A killed worker (`autoencoder.max_failures`) and
SIGTERM both end in the weights of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import LdmError
from core.layout import RunLayout
from core.loader import build_config
from orchestrator.autoencoder import read_resume_state, train_autoencoder
from tests.conftest import ROOT, kill_a_train_worker, when_file_appears
from tests.test_autoencoder import tiny_config, write_shard
from training import checkpoint as ckpt

STEPS = 6


@pytest.fixture(autouse=True)
def ray(embedded_ray):
    """Every run here on the suite's one embedded Ray."""


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


def _engine_module(tag: Path, engine: str) -> dict[str, torch.Tensor]:
    """The module weights in a tag's DeepSpeed checkpoint of one engine (a file we wrote)."""
    states = torch.load(tag / engine / "mp_rank_00_model_states.pt", weights_only=False)
    return states["module"]


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not a[k].equal(b[k])]
    assert not different, different[:5]


def test_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, monkeypatch, capsys) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    config = full_recipe(tmp_path, write_shard(tmp_path / "shards"))
    first = train_autoencoder(config, progress=False)
    out = capsys.readouterr().out
    assert out.count("perceptual loss OFF") == 1, out
    assert "autoencoder.lpips_path is not set" in out
    root = RunLayout.of(config).run_dir / "autoencoder-checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000006"]
    uninterrupted = _weights(Path(RunLayout.of(config).autoencoder_dir))
    final_disc = _engine_module(root / "step_00000006", "discriminator")

    # Resume from step 3, as a run killed between steps 3 and 6 would: here the step-6 tag
    # is damaged (one flipped byte), which also shows resuming falls back past such a tag.
    weights = root / "step_00000006" / "autoencoder" / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    shutil.rmtree(Path(RunLayout.of(config).autoencoder_dir))
    second = train_autoencoder(config, progress=False)
    out = capsys.readouterr().out
    assert "not resuming from a damaged checkpoint" in out and "step_00000006" in out
    assert "resuming from" in out and "step_00000003" in out
    assert second["resumed_at_step"] == 3
    _assert_equal(_weights(Path(RunLayout.of(config).autoencoder_dir)), uninterrupted)
    # The discriminator too, bit for bit.
    _assert_equal(_engine_module(root / "step_00000006", "discriminator"), final_disc)
    assert second["psnr"] == pytest.approx(first["psnr"])

    # One MLflow run across both jobs, with the adversarial metrics from the start step on.
    client = MlflowClient(tracking_uri=RunLayout.of(config).tracking_uri)
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
    # Each rank's crop stream is in the checkpoint: another worker count is a changed setting.
    more = full_recipe(tmp_path, tmp_path / "shards", "autoencoder.num_workers=2")
    with pytest.raises(LdmError, match="autoencoder.num_workers: .* holds checkpoints"):
        train_autoencoder(more, progress=False)
    # Logging and checkpoint cadence may change between jobs.
    relaxed = full_recipe(tmp_path, tmp_path / "shards", "autoencoder.checkpoint_every=2")
    tag, state = read_resume_state(relaxed, RunLayout.of(relaxed))
    assert Path(tag).name == "step_00000006" and state.step == STEPS


def test_two_ranks_survive_a_killed_worker_into_the_uninterrupted_weights(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Two DeepSpeed ranks at ZeRO-2, each drawing its own crops; with
    `autoencoder.max_failures=1` a worker killed mid-run costs a restart from the newest
    committed checkpoint, and the run ends with the weights of one that was never killed."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    shards = write_shard(tmp_path / "shards")
    two_ranks = (
        "autoencoder.num_workers=2",
        "autoencoder.zero_stage=2",
        "autoencoder.num_steps=8",
        "autoencoder.checkpoint_every=4",
    )
    config = full_recipe(tmp_path, shards, *two_ranks)
    first = train_autoencoder(config, progress=False)
    assert first["world_size"] == 2
    layout = RunLayout.of(config)
    tag = layout.autoencoder_checkpoints.local / "step_00000008"
    state = json.loads((tag / "train_state.json").read_text())
    assert state["world_size"] == 2
    # Each rank drew its own crops: two different generator states.
    rngs = state["rng"]
    assert sorted(rngs) == ["0", "1"]
    assert rngs["0"]["generators"]["crops"] != rngs["1"]["generators"]["crops"]
    for engine in ("autoencoder", "discriminator"):  # ZeRO-2: each rank holds its shard
        shards_of = sorted(p.name for p in (tag / engine).glob("zero_pp_rank_*"))
        assert [s[:14] for s in shards_of] == ["zero_pp_rank_0", "zero_pp_rank_1"], shards_of
    uninterrupted = _weights(Path(layout.autoencoder_dir))
    final_disc = _engine_module(tag, "discriminator")
    client = MlflowClient(tracking_uri=layout.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ae-test").experiment_id])
    assert run.data.tags["ldm.world_size"] == "2" and run.data.tags["ldm.zero_stage"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 8
    d_steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "d_loss")})
    assert d_steps == list(range(3, 9))

    # The same run in another folder, with one worker SIGKILLed after the step-4 checkpoint.
    again = full_recipe(
        tmp_path, shards, *two_ranks, "autoencoder.max_failures=1", f"run.root={tmp_path}/again"
    )
    place = RunLayout.of(again).autoencoder_checkpoints
    killed: list[int | None] = []
    watcher = when_file_appears(
        place.local / "step_00000004" / "COMMITTED.json",
        lambda: killed.append(kill_a_train_worker()),
    )
    second = train_autoencoder(again, progress=False)
    watcher.join(timeout=5)
    assert killed and killed[0], "no Ray Train worker was found to kill"
    out = capsys.readouterr().out
    assert "restarted from step_000000" in out, out[-3000:]
    assert second["world_size"] == 2
    _assert_equal(_weights(Path(RunLayout.of(again).autoencoder_dir)), uninterrupted)
    _assert_equal(_engine_module(place.local / "step_00000008", "discriminator"), final_disc)
    # The embedded Ray runs no State API: Ray Train's placement-group cleaner would log a
    # warning a second while it waits (see orchestrator.cluster.on_worker_start); nor Ray
    # Train's PreemptionWatcher, whose start logged an ERROR line (cluster._EMBEDDED_ENV).
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    logged = {p.name: p.read_bytes() for p in logs.glob("worker-*")}
    noisy = [
        n
        for n, text in logged.items()
        if b"Failed to query" in text or b"PreemptionWatcher" in text
    ]
    assert not noisy, noisy


def test_sigterm_saves_and_the_same_command_continues(tmp_path: Path, monkeypatch) -> None:
    """SIGTERM to `ldm autoencoder` (one rank, in the command's own process): a committed
    checkpoint within the grace period, exit status 143; the same command then continues
    from it into the weights of an uninterrupted run."""
    monkeypatch.chdir(tmp_path)
    config = full_recipe(
        tmp_path,
        write_shard(tmp_path / "shards"),
        "autoencoder.num_steps=40",
        "autoencoder.checkpoint_every=1000",
    )
    path = tmp_path / "exp.yaml"
    path.write_text(config.to_yaml())
    job = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "autoencoder", str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    for line in job.stdout:
        lines.append(line)
        if "autoencoder: step 5/40" in line:
            job.send_signal(signal.SIGTERM)
    code = job.wait(timeout=120)
    out = "".join(lines)
    assert code == 143, out[-3000:]
    assert "stopped by SIGTERM: the checkpoint was saved" in out, out[-3000:]
    layout = RunLayout.of(config)
    (tag,) = ckpt.committed(layout.autoencoder_checkpoints)
    stopped_at = ckpt.TrainState.load(Path(tag) / ckpt.TRAIN_STATE).step
    assert 5 <= stopped_at < 40 and not Path(layout.autoencoder_dir).exists()

    resumed = train_autoencoder(config, progress=False)
    assert resumed["resumed_at_step"] == stopped_at
    reference = full_recipe(
        tmp_path,
        tmp_path / "shards",
        "autoencoder.num_steps=40",
        "autoencoder.checkpoint_every=1000",
        f"run.root={tmp_path}/reference",
    )
    train_autoencoder(reference, progress=False)
    _assert_equal(
        _weights(Path(layout.autoencoder_dir)),
        _weights(Path(RunLayout.of(reference).autoencoder_dir)),
    )
