"""The one `Checkpointer`, in process on a one-rank gloo group with real DeepSpeed engines
(seconds each): collective saves sealed by a commit marker, pruning, resume that ignores
half-written tags and refuses damaged ones, RNG states, the same protocol on an S3-compatible
server, and an elastic load of a tag two ranks wrote."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import LdmError
from core.layout import CheckpointPlace
from core.loader import build_config, load_saved_config
from models.unet import build_unet
from tests.conftest import shared_s3
from tests.s3_server import s3_filesystem
from training import checkpoint as ckpt
from training.checkpoint import AT_ROOT, Checkpointer, TrainState
from training.engine import build_engine


@pytest.fixture
def one_rank():
    """A one-rank process group for this test alone: what the launcher gives one worker in
    process (the session's `pipeline` may start its own groups between tests)."""
    from orchestrator.launcher import single_rank_group

    with single_rank_group():
        yield


def _engine(seed: int = 0):
    config = build_config({"preset": "tiny"}, ["train.num_workers=1"], absolute_paths=False)
    torch.manual_seed(seed)
    unet = build_unet(config, latent_channels=4)
    return build_engine(unet, config, world_size=1), config


def _train(engine, steps: int = 2) -> None:
    for _ in range(steps):
        x = torch.randn(4, 4, 8, 8)
        out = engine(
            x, torch.zeros(4, dtype=torch.long), encoder_hidden_states=torch.randn(4, 3, 384)
        )
        engine.backward(out.sample.pow(2).mean())
        engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _write_marker_file(tag_dir: Path) -> None:
    (tag_dir / "extra.txt").write_text("rank 0's own file")


def test_save_prune_and_resume_exactly(one_rank, tmp_path):
    engine, _ = _engine()
    place = CheckpointPlace(tmp_path / "checkpoints", None)
    checkpointer = Checkpointer(place, keep_last=2)
    crops = torch.Generator().manual_seed(3)
    for step in (1, 2, 3):
        _train(engine)
        tag = checkpointer.save(
            step, {AT_ROOT: engine}, TrainState(), _write_marker_file, {"crops": crops}
        )
    # Only the newest two stay; each lists every file with its sha256.
    assert [Path(t).name for t in ckpt.committed(place)] == ["step_00000002", "step_00000003"]
    marker = json.loads((Path(tag) / ckpt.MARKER).read_text())["files"]
    assert "extra.txt" in marker and ckpt.TRAIN_STATE in marker
    assert any(name.endswith("optim_states.pt") for name in marker)
    saved_weights = _weights(engine)
    expected = (
        random.random(),
        np.random.rand(),
        torch.rand(1).item(),
        torch.rand(1, generator=crops).item(),
    )

    # A save cut short by a crash: no marker, so never the newest.
    (place.local / "step_00000004").mkdir()
    (place.local / "step_00000004" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert ckpt.newest(place) == tag

    fresh, _ = _engine(seed=1)
    tag_dir, state = checkpointer.open(ckpt.newest(place))
    checkpointer.load_engines(tag_dir, {AT_ROOT: fresh})
    again = torch.Generator()
    assert checkpointer.restore_rng(state, {"crops": again})
    assert state.step == 3 and state.world_size == 1
    for key, value in _weights(fresh).items():
        assert torch.equal(value, saved_weights[key]), key
    drawn = (
        random.random(),
        np.random.rand(),
        torch.rand(1).item(),
        torch.rand(1, generator=again).item(),
    )
    assert drawn == expected  # every stream continues where the saved run's did
    # The optimizer state came back too: the next steps match the saved engine's.
    _train(engine, 1)
    checkpointer.restore_rng(state, None)
    _train(fresh, 1)
    for key, value in _weights(fresh).items():
        assert torch.equal(value, _weights(engine)[key]), key


def test_a_damaged_tag_is_refused_before_anything_is_unpickled(one_rank, tmp_path):
    engine, _ = _engine()
    place = CheckpointPlace(tmp_path / "checkpoints", None)
    tag = Checkpointer(place, keep_last=1).save(1, {AT_ROOT: engine}, TrainState(), lambda d: None)
    states = Path(tag) / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[-1] ^= 0xFF
    states.write_bytes(bytes(data))
    with pytest.raises(
        LdmError, match="mp_rank_00_model_states.pt is missing or does not match"
    ) as err:
        Checkpointer(place, keep_last=1).open(tag)
    assert "\n" not in str(err.value)


class _RunsCode:
    """What an attacker pickles: unpickling it runs a shell command."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "optim_states.pt"])
def test_a_sealed_tag_holding_code_is_refused_and_the_code_never_runs(one_rank, tmp_path, victim):
    """Someone who can write the checkpoint storage replaces a DeepSpeed file with a pickle
    that runs code and reseals the tag (the marker proves completeness, not authorship): the
    load is refused with one line, on the same world size and through the elastic path."""
    engine, _ = _engine()
    place = CheckpointPlace(tmp_path / "checkpoints", None)
    tag = Path(
        Checkpointer(place, keep_last=1).save(
            1, {AT_ROOT: engine}, TrainState(), _write_marker_file
        )
    )
    (path,) = [p for p in tag.glob("*.pt") if p.name.endswith(victim)]
    pwned = tmp_path / "pwned"
    torch.save({"module": _RunsCode(pwned)}, path)
    (tag / ckpt.MARKER).unlink()
    ckpt.commit(tag)  # a marker that matches the planted file
    checkpointer = Checkpointer(place, keep_last=1)
    tag_dir, _ = checkpointer.open(str(tag))  # the hashes match: only the loader can refuse
    for elastic in (False, True):
        fresh, _ = _engine(seed=1)
        with pytest.raises(LdmError, match="refused to load it: a file in it holds") as err:
            checkpointer.load_engines(tag_dir, {AT_ROOT: fresh}, elastic=elastic)
        assert "\n" not in str(err.value) and "system" in str(err.value)
        assert not pwned.exists(), "the planted pickle ran"


@pytest.mark.parametrize("name", ["../outside.pt", "/etc/passwd", "a/b/c.pt", ".."])
def test_a_marker_naming_files_outside_its_tag_is_refused(one_rank, tmp_path, monkeypatch, name):
    engine, _ = _engine()
    place = CheckpointPlace(tmp_path / "checkpoints", None)
    tag = Path(
        Checkpointer(place, keep_last=1).save(
            1, {AT_ROOT: engine}, TrainState(), _write_marker_file
        )
    )
    marker = json.loads((tag / ckpt.MARKER).read_text())
    marker["files"][name] = "0" * 64
    (tag / ckpt.MARKER).write_text(json.dumps(marker))
    with pytest.raises(LdmError, match="is not one ldm wrote") as err:
        Checkpointer(place, keep_last=1).open(str(tag))
    assert "\n" not in str(err.value)
    # A pull from an object store reads the same names and writes nothing outside staging.
    with pytest.raises(LdmError, match="is not one ldm wrote"):
        ckpt.pull(str(tag), tmp_path / "staging")  # storage reads local paths the same way
    assert not (tmp_path / "outside.pt").exists()


def test_a_file_added_to_a_sealed_tag_is_refused(one_rank, tmp_path):
    engine, _ = _engine()
    place = CheckpointPlace(tmp_path / "checkpoints", None)
    tag = Path(
        Checkpointer(place, keep_last=1).save(
            1, {AT_ROOT: engine}, TrainState(), _write_marker_file
        )
    )
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"planted")
    with pytest.raises(LdmError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt is not listed"):
        Checkpointer(place, keep_last=1).open(str(tag))


def test_the_protocol_on_an_object_store(one_rank, tmp_path):
    engine, _ = _engine()
    with shared_s3() as env:
        _the_protocol_on(s3_filesystem(env), engine, tmp_path)


def _the_protocol_on(fs, engine, tmp_path: Path) -> None:
    fs.mkdir("ckpt")
    place = CheckpointPlace(tmp_path / "staging", "s3://ckpt/run/checkpoints")
    checkpointer = Checkpointer(place, keep_last=1)
    for step in (1, 2):
        _train(engine)
        tag = checkpointer.save(step, {AT_ROOT: engine}, TrainState(), _write_marker_file)
    assert tag == "s3://ckpt/run/checkpoints/step_00000002"
    assert ckpt.committed(place) == [tag]  # step 1 pruned from the store
    assert not list(place.local.glob("step_*"))  # staging holds no tag once uploaded
    tag_dir, state = checkpointer.open(tag)  # a verified download into staging
    assert tag_dir.is_relative_to(place.local) and state.step == 2
    fresh, _ = _engine(seed=1)
    checkpointer.load_engines(tag_dir, {AT_ROOT: fresh})
    assert all(torch.equal(v, _weights(engine)[k]) for k, v in _weights(fresh).items())


def test_elastic_load_carries_the_optimizer_state_exactly(one_rank, pipeline):
    """A tag two ZeRO-2 ranks wrote, loaded into one rank the way an elastic restart does."""
    work, _, _ = pipeline
    checkpoints = work / "runs" / "tiny" / "checkpoints"
    tag = checkpoints / "step_00000010"
    config = load_saved_config(tag)
    torch.manual_seed(0)
    engine = build_engine(build_unet(config, 4), config, 1, load_universal=True)
    checkpointer = Checkpointer(CheckpointPlace(checkpoints, None), keep_last=3)
    tag_dir, state = checkpointer.open(str(tag))
    assert state.world_size == 2
    checkpointer.load_engines(tag_dir, {AT_ROOT: engine}, elastic=True)
    assert not (checkpoints / ".universal").exists()  # the converted copy is removed

    optimizer = engine.optimizer.optimizer
    (flat,) = optimizer.param_groups[0]["params"]
    n = sum(p.numel() for p in engine.module.parameters())
    saved = [
        torch.load(path, weights_only=False)["optimizer_state_dict"]  # files this test wrote
        for path in sorted(tag.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    ]
    assert len(saved) == 2
    for key in ("exp_avg", "exp_avg_sq"):
        reference = torch.cat([s["base_optimizer_state"]["state"][0][key] for s in saved])[:n]
        assert reference.norm() > 0
        assert torch.equal(optimizer.state[flat][key][:n], reference), key
    master = torch.cat([s["single_partition_of_fp32_groups"][0] for s in saved])[:n]
    assert torch.equal(engine.optimizer.single_partition_of_fp32_groups[0].detach()[:n], master)
    assert float(optimizer.state[flat]["step"]) == 10
    assert engine.lr_scheduler.state_dict()["last_epoch"] == 10
