"""Resume compares the checkpoint's config with the new one: what would change the trained
function or its data is refused with one line naming the keys; what only changes cadence,
length, placement or speed is allowed and reported."""

import pytest

from core.errors import LdmError
from core.loader import build_config
from core.resume import check_resumable, resume_changes
from tests.conftest import ldm, one_line_error


def _config(*overrides: str):
    return build_config({"preset": "tiny"}, list(overrides), absolute_paths=False)


def test_safe_changes_are_allowed_and_listed():
    allowed, refused = resume_changes(
        _config(),
        _config(
            "train.num_steps=60",
            "train.log_every=1",
            "train.keep_last=1",
            "train.num_workers=1",
            "train.micro_batch_size=2",
            "sample.guidance_scale=7.5",
            "tracking.experiment=other",
            "cluster.num_cpus_per_worker=2",
        ),
    )
    assert refused == []
    assert "train.num_steps: 6 -> 60" in allowed and len(allowed) == 8


@pytest.mark.parametrize(
    "override",
    [
        "unet.block_out_channels=[64,64]",
        "train.learning_rate=0.001",
        "train.global_batch_size=16",
        "train.precision=bf16",
        "diffusion.prediction_type=v_prediction",
        "run.seed=7",
        "text_encoder.max_length=32",
    ],
)
def test_changes_to_what_is_trained_are_refused_with_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(LdmError, match=f"{key}: ") as err:
        check_resumable("step_00000006", _config(), _config(override), "a" * 64, "a" * 64)
    assert "\n" not in str(err.value) and "another run.name" in str(err.value)


def test_another_cache_is_refused_even_with_the_same_keys():
    with pytest.raises(LdmError, match="latent cache spec: bbbb"):
        check_resumable("step_00000006", _config(), _config(), "b" * 64, "c" * 64)
    assert check_resumable("step_00000006", _config(), _config(), None, "c" * 64) == []


def test_ldm_train_refuses_a_changed_run_before_any_worker_starts(pipeline):
    work, _, _ = pipeline
    exp = str(work / "exp.yaml")
    refused = ldm("train", exp, "train.num_steps=8", "train.learning_rate=0.001")
    one_line_error(refused, "train.learning_rate: 0.0001 -> 0.001", "another run.name")
    refused = ldm("train", exp, "unet.layers_per_block=2")
    one_line_error(refused, "unet.layers_per_block: 1 -> 2")
    # Allowed changes are reported as the job starts: test_joint_text_encoder resumes with
    # other workers, test_s3 with other loader workers.
