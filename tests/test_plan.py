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
    bad = ldm("plan", "--preset", "sd1", "--gpu-type", "tpu")
    assert bad.returncode == 2 and "--gpu-type 'tpu'" in bad.stderr
