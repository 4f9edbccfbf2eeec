"""`make gpu-check`'s CPU dry run: the script the GPU machine runs, on the `tiny` preset, so
that none of its sections rots between GPU runs (it writes no result)."""

import pytest

from bench import gpu_check
from bench.common import RESULTS


def test_the_dry_run_goes_through_every_section(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "GPU_WORK", tmp_path)
    before = (RESULTS / "gpu.json").read_bytes() if (RESULTS / "gpu.json").exists() else None
    result = gpu_check.main(dry_run=True)

    (cache,) = result["precompute"]  # real images through the precompute actors' code
    assert cache["num_samples"] == 64 and cache["encoder_images_per_s"] > 0
    rows = {(r["kind"], r["switches"]): r for r in result["rows"]}
    # Two switch rows (the GPU plan has every one; they differ only in their overrides).
    labels = set(gpu_check.DRY_PLAN.switch_rows)
    assert gpu_check.GPU_PLAN.switch_rows is None and gpu_check.GPU_PLAN.zero_stages == (0, 1, 2)
    assert {key for key in rows if key[0] != "sweep"} == {("bare", "bare loop")} | {
        ("ldm", label) for label in labels
    }
    assert ("ldm", "compile") not in rows and not gpu_check.DRY_PLAN.compile_rows
    assert rows[("ldm", "baseline")]["compiled_graphs"] == 0
    profile = rows[("ldm", "baseline")]["top_operators"]  # where the time goes
    assert len(profile) == 15 and 0 < sum(op["share"] for op in profile) <= 1.0001
    assert any("conv" in op["name"] for op in profile), [op["name"] for op in profile]
    assert {"forward", "backward", "optimizer"} <= set(rows[("ldm", "baseline")]["phases_s"])
    assert rows[("ldm", "baseline")]["vs_bare"] > 0
    swept = [r["micro_batch"] for r in result["rows"] if r["kind"] == "sweep"]
    assert swept == [2]
    assert result["calibration"]["micro_batch"] in swept
    assert [z["zero_stage"] for z in result["zero_memory"]] == [0, 2]
    assert all(z["plan_gib"] > 0 for z in result["zero_memory"])
    resume = result["resume"]  # deterministic on a CPU
    assert resume["bitwise"] and len(resume["resumed"]) == 2, resume
    out = capsys.readouterr().out
    assert "resume: the next steps' losses bitwise equal" in out and "ZeRO-2: peak" in out
    after = (RESULTS / "gpu.json").read_bytes() if (RESULTS / "gpu.json").exists() else None
    assert after == before  # a dry run is no result
    assert (tmp_path / "gpu_dry_run.json").is_file()


def test_without_a_gpu_it_refuses_in_one_line(capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
