"""`ldm plan`: sizes from the meta device, ZeRO memory by the paper's formulas, and a
throughput model checked against published figures no one here produced (MosaicML's SD2)."""

import pytest

from core.loader import build_config
from orchestrator import plan
from tests.conftest import ldm, ok


def test_zero_memory_follows_the_paper():
    psi, n = 1_000_000_000, 8
    gib = plan.GIB
    # Mixed-precision Adam: 2 + 2 + 12 bytes per parameter, plus the fp32 EMA (4).
    assert plan.memory_per_gpu(psi, n, 0, 0) == pytest.approx((16 + 4) * psi / gib)
    assert plan.memory_per_gpu(psi, n, 1, 0) == pytest.approx((4 + 12 / n + 4) * psi / gib)
    assert plan.memory_per_gpu(psi, n, 2, 0) == pytest.approx((2 + 14 / n + 4) * psi / gib)
    assert plan.memory_per_gpu(psi, n, 3, 0) == pytest.approx((16 / n + 4) * psi / gib)


def test_predicts_mosaicml_sd2_throughput_from_one_calibration():
    rows = {(r["gpus"], r["resolution"]): r for r in plan.mosaic_check(overlap=0.5)}
    assert rows[(8, 256)]["error"] == pytest.approx(0.0, abs=1e-6)  # the calibration point
    assert abs(rows[(8, 512)]["error"]) < 0.25  # the acceptance bar
    for row in rows.values():
        assert abs(row["error"]) < 0.35, row
    assert 0.1 < rows[(8, 256)]["utilisation"] < 0.5  # a plausible MFU for a UNet on A100s


def test_activations_exclude_weights_and_attention_probabilities():
    config = build_config({"preset": "sd2_base"})
    per_sample = plan.activation_bytes_per_sample(config)
    assert 0.5 * 2**30 < per_sample < 2 * 2**30  # ~1 GiB at 512 px in bf16


def test_plan_command_reports_a_preset(tmp_path):
    out = ok(ldm("plan", "--preset", "sd1", "--gpus", "16", "--gpu-type", "a100")).stdout
    assert "unet 859,520,964" in out and "ZeRO-3" in out and "img/s" in out
    assert "of the bf16 peak, from MosaicML's SD2 base on 8 x A100" in out
    bad = ldm("plan", "--preset", "sd1", "--gpu-type", "tpu")
    assert bad.returncode == 2 and "--gpu-type 'tpu'" in bad.stderr


def test_each_gpu_family_has_its_own_named_utilisation():
    """A100s from MosaicML's figure, H100/H200 from NVIDIA's MLPerf one, an L40S (no
    published figure) borrowing the A100's, each named. (The two figures come from different
    software, NeMo's CUDA graphs and fused kernels on Hopper: each family keeps its own.)"""
    sources = {name: plan.calibration_of(name).source for name in plan.GPUS}
    assert "MosaicML" in sources["a100"] and "MLPerf" in sources["h100"] == sources["h200"]
    assert sources["l40s"].startswith("no published ada figure; borrowed: MosaicML")
    ampere = plan.calibrated_utilisation(plan.CALIBRATIONS["ampere"], 0.5)
    hopper = plan.calibrated_utilisation(plan.CALIBRATIONS["hopper"], 0.5)
    assert 0.1 < ampere < 0.6 and 0.1 < hopper < 0.6 and abs(hopper - ampere) > 0.05


def test_a_gpu_check_result_calibrates_its_family(tmp_path):
    """A `make gpu-check` result replaces the published figure of its GPU's family only, and
    the plan then reproduces the configuration it measured. (The figures here are made up:
    the test checks the arithmetic, not a GPU.)"""
    result = tmp_path / "gpu.json"
    result.write_text(
        '{"gpu": "NVIDIA H200", "date": "2026-01-01", "calibration": {"preset": "sd1", '
        '"resolution": 512, "micro_batch": 32, "images_per_s": 50.0}}'
    )
    measured = plan.calibration_of("h100", measured=result)
    assert measured.source.startswith("measured: make gpu-check on one NVIDIA H200 (2026-01-01)")
    assert plan.calibration_of("a100", measured=result) == plan.CALIBRATIONS["ampere"]
    utilisation = plan.calibrated_utilisation(measured, 0.5)
    config = build_config({"preset": "sd1"}, ["data.resolution=512"])
    predicted = plan.plan(config, 1, "h200", utilisation, 0.5, global_batch=32)
    assert predicted.images_per_s == pytest.approx(50.0, rel=1e-9)
    published = plan.calibration_of("h200", measured=tmp_path / "none.json")
    assert published == plan.CALIBRATIONS["hopper"]
