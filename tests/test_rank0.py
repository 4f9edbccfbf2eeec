"""Rank-0 side effects sit behind one object whose methods return early off rank 0, and a
method that forgets the guard cannot be defined."""

from __future__ import annotations

import pytest

from core.layout import RunLayout
from core.loader import build_config
from training.autoencoder_loop import AutoencoderRank0
from training.loop import UNetRank0
from training.rank0 import Rank0, rank0_only


def _rank0(rank: int, tmp_path) -> Rank0:
    config = build_config({"preset": "tiny"}, [f"run.root={tmp_path}", "run.name=r"])
    return Rank0(rank, config, RunLayout.of(config), None)


def test_guarded_methods_run_on_rank_0_only(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "STOP_REQUESTED").write_text("SIGTERM")
    for rank in (1, 0):
        main = _rank0(rank, tmp_path)
        main.note(f"hello from {rank}")
        assert main.stop_requested() is (True if rank == 0 else None)
        main.close()
    assert capsys.readouterr().out == "hello from 0\n"


def test_a_public_method_without_the_guard_is_refused():
    with pytest.raises(TypeError, match="Forgetful.log is not marked @rank0_only"):

        class Forgetful(Rank0):
            def log(self, metrics):  # would run on every rank
                pass

    class Careful(Rank0):
        @rank0_only
        def log(self, metrics):
            return metrics

        def _helper(self):  # private helpers are the guarded methods' business
            return 1

    assert Careful.log.__name__ == "log"


@pytest.mark.parametrize("cls", [UNetRank0, AutoencoderRank0])
def test_every_stage_guards_every_public_method(cls):
    public = [name for name, value in vars(cls).items() if callable(value) and name[0] != "_"]
    assert public and all(getattr(getattr(cls, name), "_rank0_only", False) for name in public)
