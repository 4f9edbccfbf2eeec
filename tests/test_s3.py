"""Data and run state on an S3-compatible server (moto, on loopback): precompute reads raw
shards from it and writes the cache there, `ldm cache verify` checks it there, and training
streams from it and keeps its checkpoints there, so a second "node" with an empty local run
folder resumes the run from S3 alone. The command line runs in this process, and the Ray it
starts inherits the S3 settings as a cluster's nodes would have them.
"""

import hashlib
import json
from pathlib import Path

import pytest

from core import storage
from core.errors import LdmError
from models.digests import weights_digest
from tests.conftest import ldm, ok, shared_s3, start_shared_ray
from tests.s3_server import s3_filesystem
from tests.test_precompute import reference_cache

pytestmark = pytest.mark.slow


@pytest.fixture
def s3():
    """The session's S3 server (each test uses buckets of its own): its environment is the
    embedded Ray's too, as a cluster's nodes have theirs."""
    with shared_s3() as env:
        yield s3_filesystem(env)


@pytest.fixture
def ray_on_s3(s3):
    """The suite's embedded Ray, started inside the S3 settings (once in a session that has
    S3 tests: see `tests.conftest.shared_s3`)."""
    start_shared_ray()


def test_s3_input_and_cache_end_to_end(pipeline, s3, ray_on_s3, tmp_path):
    work, _, _ = pipeline
    reference, expected = reference_cache(work)
    fs = s3
    fs.mkdir("ldm")
    for shard in sorted((work / "shards").glob("*.tar")):
        fs.put_file(str(shard), f"ldm/raw/{shard.name}")
    exp = str(work / "exp.yaml")
    on_s3 = ["data.shards=s3://ldm/raw", "precompute.cache_dir=s3://ldm/cache"]
    first = ok(ldm("precompute", exp, *on_s3))
    assert "0 of 4 shards already cached in s3://ldm/cache" in first.stdout
    manifest = json.loads(fs.cat("ldm/cache/manifest.json"))
    assert manifest["source"] == "s3://ldm/raw"
    for entry in expected["shards"]:
        assert fs.cat(f"ldm/cache/{entry['name']}") == (reference / entry["name"]).read_bytes()
    again = ok(ldm("precompute", exp, *on_s3))
    assert "4 of 4 shards already cached" in again.stdout

    verified = ok(ldm("cache", "verify", "s3://ldm/cache", "--num-decode", "2"))
    assert "cache OK: 4 shards, 64 samples" in verified.stdout and "PSNR" in verified.stdout

    # Training streams from S3 and keeps its run state there: a second "node" with an
    # empty local run folder resumes the run from S3 alone. (Both runs have one worker, in
    # process; the elastic restart onto another worker count is test_joint_text_encoder's.)
    train = [
        "train",
        exp,
        *on_s3,
        "run.name=from-s3",
        "run.storage=s3://ldm/runs",
        f"autoencoder.pretrained={work / 'runs' / 'tiny' / 'autoencoder'}",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "train.keep_last=1",
    ]
    trained = ok(
        ldm(
            *train,
            "train.num_workers=1",
            "train.num_loader_workers=1",  # a forked loader process reads S3 too
            "train.num_steps=2",
            "tracking.log_model=false",
        )
    )
    assert "train: done" in trained.stdout
    first = "ldm/runs/from-s3/checkpoints/step_00000002"
    marker = json.loads(fs.cat(f"{first}/COMMITTED.json"))["files"]
    assert {"train_state.json", "ema_unet.safetensors", "mp_rank_00_model_states.pt"} <= set(marker)
    for name, digest in marker.items():
        assert hashlib.sha256(fs.cat(f"{first}/{name}")).hexdigest() == digest, name
    staging = work / "runs" / "from-s3" / "staging" / "checkpoints"
    assert not list(staging.rglob("*.pt")), "staged files stay behind after the upload"

    other_node = tmp_path / "other-node"
    resumed = ok(
        ldm(
            *train,
            f"run.root={other_node}",
            "train.num_workers=1",
            "train.num_loader_workers=0",
            "train.num_steps=4",
        )
    )
    assert "resuming from" in resumed.stdout and "(step 2)" in resumed.stdout
    assert "train: continuing s3://ldm/runs/from-s3/checkpoints/step_00000002 with " in (
        resumed.stdout
    )
    assert "train.num_loader_workers: 1 -> 0" in resumed.stdout
    last = "ldm/runs/from-s3/checkpoints/step_00000004"
    state = json.loads(fs.cat(f"{last}/train_state.json"))
    assert state["step"] == 4 and state["world_size"] == 1
    first_state = json.loads(
        (
            other_node
            / "from-s3"
            / "staging"
            / "checkpoints"
            / ".pulled"
            / "rank0"
            / "step_00000002"
            / "train_state.json"
        ).read_text()
    )
    assert state["mlflow_run_id"] == first_state["mlflow_run_id"]  # one run, two jobs
    assert not fs.exists(f"{first}/COMMITTED.json")  # keep_last=1 pruned the older tag
    assert "exported step_00000004" in resumed.stdout

    # A new run starts from that S3 tag's weights (`train.init_from`): each node stages the
    # files it reads, never the optimizer shards.
    started = ok(
        ldm(
            *train,
            f"run.root={tmp_path / 'third-node'}",
            "run.name=from-s3-tag",
            f"train.init_from=s3://{last}",
            "train.num_workers=1",
            "train.num_loader_workers=0",
            "train.num_steps=1",
            "tracking.log_model=false",
        )
    )
    assert "a new run from the weights of" in started.stdout
    copy = tmp_path / "third-node" / "from-s3-tag" / "staging" / "init-from" / "step_00000004"
    assert {p.name for p in copy.iterdir()} == {
        "COMMITTED.json",
        "train_state.json",
        "unet.safetensors",
        "ema_unet.safetensors",
        "unet_config.json",
    }
    assert fs.exists("ldm/runs/from-s3-tag/checkpoints/step_00000001/COMMITTED.json")


def test_no_shards_at_an_s3_prefix_is_one_line(pipeline, s3):
    work, _, _ = pipeline
    s3.mkdir("empty")
    result = ldm("precompute", str(work / "exp.yaml"), "data.shards=s3://empty/raw")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no *.tar shards in s3://empty/raw" in result.stderr


def test_stage_1_checkpoints_on_s3_resume_from_an_empty_run_folder(s3, tmp_path):
    """Stage 1 keeps its checkpoints on `run.storage` too, and publishes its model there,
    where every node reads it: a rerun whose local run folder is gone continues from the tag
    on S3 and publishes the same model."""
    import shutil

    from safetensors.torch import load_file

    from core.layout import RunLayout
    from core.loader import build_config
    from orchestrator.autoencoder import train_autoencoder
    from tests.test_autoencoder import tiny_config, write_shard

    s3.mkdir("stage1")
    base = tiny_config(tmp_path, write_shard(tmp_path / "shards"), train_crop=16, num_steps=6)
    config = build_config(
        base.to_dict(), ["autoencoder.checkpoint_every=3", "run.storage=s3://stage1/runs"]
    )
    layout = RunLayout.of(config)
    first = train_autoencoder(config, progress=False)
    assert s3.exists("stage1/runs/tiny/autoencoder-checkpoints/step_00000006/COMMITTED.json")
    assert layout.autoencoder_dir == "s3://stage1/runs/tiny/autoencoder"
    assert {"config.json", "lineage.json", "metrics.json"} <= {
        p.rsplit("/", 1)[1] for p in s3.ls("stage1/runs/tiny/autoencoder")
    }
    copy = storage.local_folder(layout.autoencoder_dir)  # what a node reads: a local copy
    assert storage.local_folder(layout.autoencoder_dir) == copy  # made once
    (weights,) = copy.glob("*.safetensors")
    published = load_file(weights)
    shutil.rmtree(layout.run_dir)  # another node: nothing local
    again = train_autoencoder(config, progress=False)
    assert again["resumed_at_step"] == 6 and again["psnr"] == first["psnr"]
    (weights,) = storage.local_folder(layout.autoencoder_dir).glob("*.safetensors")
    republished = load_file(weights)
    assert all(published[k].equal(republished[k]) for k in published)
    # Precompute and training identify the model by its bytes, wherever it is read from.
    assert weights_digest(copy) == weights_digest(Path(layout.run_dir) / "autoencoder")
    with pytest.raises(LdmError, match="s3://stage1/nothing: no such folder"):
        storage.local_folder("s3://stage1/nothing")
