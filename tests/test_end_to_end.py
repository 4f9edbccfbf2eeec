"""Every stage through the real `ldm` command on the fixture images, at tiny sizes.

shards -> autoencoder (one DeepSpeed rank in process) -> precompute (Ray Data) -> train (Ray
Train, 2 workers, DeepSpeed ZeRO-2, MLflow in SQLite) -> sample, then the bad inputs a user
is most likely to hit (resuming into the same MLflow run is tested in test_resume). The
command line runs in the test process (`ldm`); one check runs it as its own process.
"""

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import FIXTURE_IMAGES, ldm, ok, one_line_error, run_ldm
from tests.test_precompute import reference_cache

pytestmark = pytest.mark.slow


def test_shards_and_autoencoder(pipeline):
    work, _, results = pipeline
    assert sorted(p.name for p in (work / "shards").glob("*.tar")) == [
        f"{i:05d}.tar" for i in range(4)
    ]
    assert "64 samples in 4 shards" in results["shards"].stdout
    ae = work / "runs" / "tiny" / "autoencoder"
    assert (ae / "config.json").is_file() and list(ae.glob("*.safetensors"))


def test_latent_cache(pipeline):
    work, _, _ = pipeline
    # The pipeline's cache (other tests add caches of other specs beside it).
    (manifest_path,) = [
        path
        for path in (work / "runs" / "cache").glob("*/manifest.json")
        if json.loads(path.read_text())["spec"]["text"] == "hidden_states"
    ]
    manifest = json.loads(manifest_path.read_text())
    assert manifest["num_samples"] == 64 and len(manifest["shards"]) == 4
    assert manifest["spec"]["latent_channels"] == 4 and manifest["spec"]["resolution"] == 32
    assert manifest["spec"]["scaling_factor"] != 1.0
    assert (manifest_path.parent / "empty_prompt.npy").is_file()


def test_training_checkpoints_and_mlflow(pipeline):
    work, uri, _ = pipeline
    tags = sorted(p.name for p in (work / "runs" / "tiny" / "checkpoints").glob("step_*"))
    assert tags == ["step_00000010", "step_00000015", "step_00000020"]  # train.keep_last=3
    final = work / "runs" / "tiny" / "checkpoints" / "step_00000020"
    assert (final / "COMMITTED.json").is_file()
    assert len(list(final.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # ZeRO-2 over 2 ranks

    client = MlflowClient(uri)
    runs = client.search_runs(client.get_experiment_by_name("ldm").experiment_id)
    train_runs = [
        r for r in runs if r.data.tags.get("ldm.stage") == "train" and r.info.run_name == "tiny"
    ]
    assert len(train_runs) == 1
    run = train_runs[0]
    assert (
        run.data.params["train.zero_stage"] == "2" and run.data.params["train.num_workers"] == "2"
    )
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(
        range(1, 21)
    )
    for key in ("lr", "samples_per_s", "grad_norm"):
        assert client.get_metric_history(run.info.run_id, key)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("samples" in a for a in artifacts), artifacts


def test_sample_writes_pngs(pipeline, tmp_path):
    work, _, _ = pipeline
    tag = work / "runs" / "tiny" / "checkpoints" / "step_00000020"
    result = ok(
        ldm(
            "sample",
            str(tag),
            "--prompt",
            "an emoji of red heart",
            "--prompt",
            "an emoji of blue heart",
            "--out",
            str(tmp_path),
            "--num-images",
            "2",
            "--steps",
            "3",
        )
    )
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 4 and str(pngs[0]) in result.stdout


def test_cache_from_another_autoencoder_is_refused(pipeline, tmp_path):
    work, _, _ = pipeline
    (cache,) = (work / "runs" / "cache").iterdir()
    other = tmp_path / "other-ae"
    shutil.copytree(work / "runs" / "tiny" / "autoencoder", other)
    weights = next(other.glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    save_file(tensors, weights)
    result = ldm(
        "train",
        str(work / "exp.yaml"),
        f"autoencoder.pretrained={other}",
        f"precompute.cache_dir={cache}",
    )
    one_line_error(result, "was built with autoencoder_sha256=", "ldm precompute")


def test_too_little_data_is_refused_before_launch(pipeline):
    # 64 samples cannot give 2 ranks x 3 loader workers one micro-batch of 16 each per epoch.
    # (Fewer shards than streams is fine: the stream deals samples, not shards.)
    work, _, _ = pipeline
    result = ldm(
        "train",
        str(work / "exp.yaml"),
        "train.num_loader_workers=3",
        "train.micro_batch_size=16",
        "train.global_batch_size=32",
    )
    one_line_error(result, "has 64 samples", "at least 96 samples", "train.num_loader_workers")


def test_unreachable_cluster(pipeline, no_ray):
    work, _, _ = pipeline
    one_line_error(ldm("train", str(work / "exp.yaml"), "--address", "127.0.0.1:9"), "127.0.0.1:9")
    one_line_error(ldm("jobs", "list", "--address", "http://127.0.0.1:9"), "127.0.0.1:9")


def test_bad_inputs_get_one_line(tmp_path):
    one_line_error(ldm("shards", str(tmp_path / "missing"), str(tmp_path / "out")), "missing")
    (tmp_path / "empty").mkdir()
    one_line_error(ldm("shards", str(tmp_path / "empty"), str(tmp_path / "out")), "empty")
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    shutil.copy(next(FIXTURE_IMAGES.glob("*.png")), nocap / "a.png")
    one_line_error(ldm("shards", str(nocap), str(tmp_path / "out")), "caption")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("preset: tiny\ntrain:\n  num_stepz: 3\n")
    # As its own process too: the exit status and the one line a shell sees.
    one_line_error(run_ldm("train", str(cfg)), "train.num_stepz", "unknown key")
    cfg.write_text("preset: tiny\n")
    one_line_error(ldm("train", str(cfg), "train.micro_batch_size=big"), "train.micro_batch_size")
    for override, named in [
        ("unet.block_out_channels=[]", "unet.block_out_channels"),
        ("autoencoder.block_out_channels=[0,0,0]", "autoencoder.block_out_channels"),
        ("train.num_steps=true", "train.num_steps"),
        ("train.num_steps=2.0", "train.num_steps"),
        ("diffusion.beta_start=0.5", "diffusion.beta_start"),
        ("sample.prompts=[]", "sample.prompts"),
    ]:
        one_line_error(ldm("train", str(cfg), override), named)
    one_line_error(
        ldm("autoencoder", str(cfg), "cluster.use_gpu=true", f"run.root={tmp_path}/runs"),
        "cluster.use_gpu",
        "no GPU",
    )
    assert not (tmp_path / "runs").exists()  # refused before an MLflow run was made
    cfg.write_bytes("preset: tiny\nrun:\n  name: caf\xe9\n".encode("latin-1"))
    one_line_error(ldm("train", str(cfg)), "not UTF-8")


def test_cache_info_and_verify(pipeline, tmp_path):
    work, _, _ = pipeline
    cache, _ = reference_cache(work)
    info = ok(ldm("cache", "info", str(cache))).stdout
    assert "64 in 4 shards" in info and "KiB per sample" in info
    verified = ok(ldm("cache", "verify", str(cache), "--num-decode", "4")).stdout
    assert "cache OK: 4 shards, 64 samples" in verified and "decoded 4 samples: PSNR" in verified
    psnr = float(verified.split("PSNR ")[1].split(" dB")[0])
    assert 5 < psnr < 60  # a real decode of a barely trained autoencoder, not a copy or noise

    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    shard = sorted(broken.glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    one_line_error(ldm("cache", "verify", str(broken)), shard.name, "sha256", "ldm precompute")
    other = tmp_path / "other-ae"
    shutil.copytree(work / "runs" / "tiny" / "autoencoder", other)
    weights = next(other.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")  # one byte of one weight differs
    one_line_error(
        ldm("cache", "verify", str(cache), "--autoencoder", str(other)),
        "not the one this cache was built with",
    )
