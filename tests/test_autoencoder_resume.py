"""Stage 1 resumes from its checkpoints into the weights an uninterrupted run ends with,
here with the paper's full loss switched on (L1, the perceptual term asked for but without
weights, the PatchGAN discriminator after a start step), so every piece of state counts:
with one worker, and with two DeepSpeed ranks at ZeRO-2 that each draw their own crops
(Ray Train workers of the suite's embedded Ray). A killed worker (`autoencoder.max_failures`),
SIGTERM to one worker of two (a preempted node) and SIGTERM to `ldm autoencoder` all end in
the state of an uninterrupted run, bit for bit. (The UNet stage stops and restarts through the
same launcher, checkpointer and stop agreement: test_resume, test_multihost.)"""

from __future__ import annotations

import collections
import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from core import storage
from core.errors import LdmError, Preempted
from core.layout import RunLayout
from core.loader import build_config
from orchestrator.autoencoder import read_resume_state, train_autoencoder
from tests.conftest import (
    kill_a_train_worker,
    sigterm_to_this_process_when,
    train_helper_actors,
    train_worker_listeners,
)
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


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two loaded checkpoint structures differ (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.equal(b)
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} keys"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path} length"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in _differences(x, y, f"{path}/{i}")]
    if hasattr(a, "__dict__") and type(a) is type(b):  # e.g. DeepSpeed's loss scaler
        return _differences(vars(a), vars(b), path)
    return [] if a == b else [path]


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    different = _differences(a, b)
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


def _resumable_state(tag: Path) -> dict[str, Any]:
    """Everything in a stage-1 tag that the run continuing from it depends on: each engine's
    weights and every rank's optimizer partition, and every rank's RNG states."""
    state = json.loads((tag / ckpt.TRAIN_STATE).read_text())
    # Python's and NumPy's global generators are saved too, but training draws from torch's
    # (libraries on rank 0, such as the MLflow client's retries, draw from Python's).
    rng = {rank: {k: v[k] for k in ("torch", "generators")} for rank, v in state["rng"].items()}
    held: dict[str, Any] = {"step": state["step"], "rng": rng}
    for engine in ("autoencoder", "discriminator"):
        for file in sorted((tag / engine).glob("*_states.pt")):
            loaded = torch.load(file, map_location="cpu", weights_only=False)  # our own file
            for key in ("module", "optimizer_state_dict", "lr_scheduler", "global_steps"):
                if key in loaded:
                    held[f"{engine}/{file.name}/{key}"] = loaded[key]
    return held


def test_two_ranks_survive_a_killed_worker_and_a_preempted_one_exactly(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Two DeepSpeed ranks at ZeRO-2, each drawing its own crops, on the suite's embedded Ray.
    With `autoencoder.max_failures=1`, a worker SIGKILLed after the step-2 checkpoint costs
    a restart from the newest committed tag; then SIGTERM to one worker (a preempted node)
    makes every rank save at the next step and the job stop, naming that rank. The tag it
    saved holds what the uninterrupted run's tag of that step holds (both engines' weights,
    every rank's optimizer partition and RNG states), bit for bit: continuing from it is
    continuing the uninterrupted run."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    shards = write_shard(tmp_path / "shards")
    two_ranks = (
        "autoencoder.num_workers=2",
        "autoencoder.zero_stage=2",
        # Room past the SIGTERM: the stop lands at whichever step sees it (a short one).
        "autoencoder.num_steps=16",
        "autoencoder.checkpoint_every=1",  # cadence only: a tag at every step to compare
        "autoencoder.keep_last=16",
    )
    config = full_recipe(tmp_path, shards, *two_ranks)
    first = train_autoencoder(config, progress=False)
    assert first["world_size"] == 2
    layout = RunLayout.of(config)
    reference = layout.autoencoder_checkpoints.local
    tag = reference / "step_00000016"
    state = json.loads((tag / "train_state.json").read_text())
    assert state["world_size"] == 2
    # Each rank drew its own crops: two different generator states.
    rngs = state["rng"]
    assert sorted(rngs) == ["0", "1"]
    assert rngs["0"]["generators"]["crops"] != rngs["1"]["generators"]["crops"]
    for engine in ("autoencoder", "discriminator"):  # ZeRO-2: each rank holds its shard
        shards_of = sorted(p.name for p in (tag / engine).glob("zero_pp_rank_*"))
        assert [s[:14] for s in shards_of] == ["zero_pp_rank_0", "zero_pp_rank_1"], shards_of
    client = MlflowClient(tracking_uri=layout.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ae-test").experiment_id])
    assert run.data.tags["ldm.world_size"] == "2" and run.data.tags["ldm.zero_stage"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 16
    d_steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "d_loss")})
    assert d_steps == list(range(3, 17))

    # The same run in another folder: one worker SIGKILLed after the step-2 checkpoint; once
    # the restarted workers committed two tags of their own, their sockets and helpers looked
    # at; after a third, SIGTERM to one worker.
    again = full_recipe(
        tmp_path, shards, *two_ranks, "autoencoder.max_failures=1", f"run.root={tmp_path}/again"
    )
    place = RunLayout.of(again).autoencoder_checkpoints
    killed: list[int | None] = []
    signalled: list[int | None] = []
    listeners: list[tuple[int, str, int]] = []
    helpers: list[str] = []
    restarted_after: list[int] = []

    def wait_for_tag(step: int) -> bool:
        marker = Path(place.local) / f"step_{step:08d}" / "COMMITTED.json"
        deadline = time.monotonic() + 300
        while not marker.is_file():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def disrupt() -> None:
        if not wait_for_tag(2):
            return
        killed.append(kill_a_train_worker())
        # A commit the dying group had under way may still land: count from one past it.
        after = int(Path(ckpt.committed(place)[-1]).name.split("_")[1]) + 1
        restarted_after.append(after)
        if wait_for_tag(after + 2):
            listeners.extend(train_worker_listeners())
            helpers.extend(train_helper_actors())
        if wait_for_tag(after + 3):
            signalled.append(kill_a_train_worker(signal.SIGTERM))

    watcher = threading.Thread(target=disrupt, daemon=True)
    watcher.start()
    with pytest.raises(Preempted) as stopped:
        train_autoencoder(again, progress=False)
    watcher.join(timeout=5)
    assert killed and killed[0], "no Ray Train worker was found to kill"
    assert signalled and signalled[0], "no Ray Train worker was found to signal"
    out = capsys.readouterr().out
    assert "restarted from step_000000" in out, out[-3000:]
    assert re.search(
        r"stopped by SIGTERM to worker rank [01]: the checkpoint was saved", str(stopped.value)
    )
    assert not storage.exists(RunLayout.of(again).stop_file)
    saved = ckpt.committed(place)[-1]
    saved_step = int(Path(saved).name.split("_")[1])
    assert restarted_after[0] + 3 < saved_step < 16, ckpt.committed(place)
    expected = _resumable_state(reference / Path(saved).name)
    held = _resumable_state(Path(saved))
    diffs = _differences(held, expected)
    assert not diffs, diffs[:10]
    assert _differences(held, _resumable_state(reference / f"step_{saved_step - 1:08d}"))
    # The process group (torch's store on rank 0, gloo's pairs) listens on the node's address
    # only. The one socket on every interface in each process is Ray's own worker server
    # (token-authenticated; every Ray worker has it, idle ones too); Ray Train's default
    # store would add a second one on rank 0. No process for Ray Train helpers an embedded
    # job never uses.
    everywhere = collections.Counter(pid for pid, ip, _ in listeners if ip in ("0.0.0.0", "::"))
    assert set(everywhere.values()) == {1}, listeners
    assert len({ip for _, ip, _ in listeners if ip not in ("0.0.0.0", "::")}) == 1, listeners
    assert not helpers, helpers
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
    """SIGTERM to the process running `ldm autoencoder`'s one rank (here this one): a
    committed checkpoint within the grace period and `Preempted` (exit status 143 on the
    command line); the same command then continues from it into the weights of an
    uninterrupted run."""
    monkeypatch.chdir(tmp_path)
    recipe = ("autoencoder.num_steps=40", "autoencoder.checkpoint_every=4")
    config = full_recipe(tmp_path, write_shard(tmp_path / "shards"), *recipe)
    layout = RunLayout.of(config)
    marker = Path(layout.autoencoder_checkpoints.local) / "step_00000004" / "COMMITTED.json"
    with sigterm_to_this_process_when(marker) as stray:
        with pytest.raises(Preempted, match="stopped by SIGTERM: the checkpoint was saved"):
            train_autoencoder(config, progress=False)
    assert not stray
    (tag,) = ckpt.committed(layout.autoencoder_checkpoints)[-1:]
    stopped_at = ckpt.TrainState.load(Path(tag) / ckpt.TRAIN_STATE).step
    assert 4 < stopped_at < 40 and not Path(layout.autoencoder_dir).exists()

    resumed = train_autoencoder(config, progress=False)
    assert resumed["resumed_at_step"] == stopped_at
    reference = full_recipe(
        tmp_path,
        tmp_path / "shards",
        *recipe,
        f"run.root={tmp_path}/reference",
    )
    train_autoencoder(reference, progress=False)
    _assert_equal(
        _weights(Path(layout.autoencoder_dir)),
        _weights(Path(RunLayout.of(reference).autoencoder_dir)),
    )
