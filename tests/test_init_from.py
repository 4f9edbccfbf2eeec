"""`train.init_from`: a new run from another model's weights only.

Every run here is a real `ldm train` on the latent cache the session's `pipeline` fixture
built, its one rank in the command's own process, for one step: the sources are that
fixture's last checkpoint, its `ldm export` folder, and an original-format single file
written from that folder.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from tests.conftest import QUIET, REFERENCE_STEPS, ldm, ok, one_line_error

pytestmark = pytest.mark.slow


def _experiment(work: Path, name: str) -> list[str]:
    """The fixture's config on one rank, under another run name (its autoencoder and cache)."""
    return [
        str(work / "exp.yaml"),
        f"autoencoder.pretrained={work / 'runs' / 'tiny' / 'autoencoder'}",
        f"run.name={name}",
        "train.num_workers=1",
        *QUIET,
    ]


def _tag_dir(work: Path, name: str, step: int) -> Path:
    return work / "runs" / name / "checkpoints" / f"step_{step:08d}"


def _run_tags(uri: str, name: str) -> dict[str, str]:
    client = MlflowClient(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("ldm").experiment_id],
        f"attributes.run_name = '{name}' and tags.`ldm.stage` = 'train'",
    )
    return run.data.tags


def _compare_first_losses(monkeypatch, source: torch.nn.Module) -> list[tuple[float, float]]:
    """Make the run compute each micro-batch's loss with `source` too, on the same batch with
    the same random draws (noise, timesteps, dropped captions): (run's, source's) pairs."""
    import training.loop

    objective = training.loop.diffusion_loss
    pairs: list[tuple[float, float]] = []

    def both(model, batch, *args):
        rng = torch.get_rng_state()
        with torch.no_grad():
            expected, _ = objective(source, batch, *args)
        torch.set_rng_state(rng)
        loss, dropped = objective(model, batch, *args)
        pairs.append((loss.item(), expected.item()))
        return loss, dropped

    monkeypatch.setattr(training.loop, "diffusion_loss", both)
    return pairs


@pytest.fixture(scope="module")
def source_tag(pipeline) -> Path:
    work, _, _ = pipeline
    return _tag_dir(work, "tiny", REFERENCE_STEPS)


@pytest.fixture(scope="module")
def exported(source_tag, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("init-from") / "pipe"
    ok(ldm("export", str(source_tag), str(out)))  # the tag's EMA UNet
    return out


def test_a_pipeline_folder_starts_a_run_at_its_loss(pipeline, source_tag, exported, monkeypatch):
    """`ldm export` of a checkpoint, then `train.init_from` that folder (ZeRO-3): the first
    step's losses are the source checkpoint's on the same batches, bit for bit."""
    from training.sampling import load_model

    work, uri, _ = pipeline
    pairs = _compare_first_losses(monkeypatch, load_model(source_tag, use_ema=True))
    args = _experiment(work, "from_pipe")
    out = ok(
        ldm(
            "train", *args, "train.num_steps=1", "train.zero_stage=3", f"train.init_from={exported}"
        )
    )
    assert f"a new run from the weights of {exported} (diffusers UNet)" in out.stdout
    assert len(pairs) == 2  # one step: two micro-batches of 4, both before the update
    assert all(got == expected for got, expected in pairs), pairs
    tags = _run_tags(uri, "from_pipe")
    assert tags["ldm.init_from"] == str(exported) and "ldm.init_from_step" not in tags


@pytest.fixture(scope="module")
def from_tag(pipeline, source_tag):
    """A one-step run started from the fixture's last checkpoint, and the pairs of losses
    its first step computed with the tag's raw weights."""
    from training.sampling import load_model

    work, _, _ = pipeline
    with pytest.MonkeyPatch.context() as monkeypatch:
        pairs = _compare_first_losses(monkeypatch, load_model(source_tag, use_ema=False))
        args = [*_experiment(work, "from_tag"), f"train.init_from={source_tag}"]
        result = ok(ldm("train", *args, "train.num_steps=1"))
    return args, result, pairs


def test_an_ldm_tag_gives_raw_and_ema_weights_and_nothing_else(pipeline, source_tag, from_tag):
    from diffusers.training_utils import EMAModel

    from training.engine import weights_only_loads

    work, uri, _ = pipeline
    _, result, pairs = from_tag
    assert f"(ldm checkpoint, step {REFERENCE_STEPS})" in result.stdout
    # Raw weights: the first step trains from them (its losses are theirs).
    assert len(pairs) == 2 and all(got == expected for got, expected in pairs), pairs
    tag = _tag_dir(work, "from_tag", 1)
    state = json.loads((tag / "train_state.json").read_text())
    source = json.loads((source_tag / "train_state.json").read_text())
    # Step 0 -> 1, its own MLflow run, the data from its first sample.
    assert state["step"] == 1 and state["samples_seen"] == 8
    assert state["mlflow_run_id"] != source["mlflow_run_id"]
    cursor = state["data_cursor"]
    assert cursor["epoch"] == 0 and cursor["finished_segments"] == []
    assert cursor["batches_per_rank"] == 2
    # A fresh optimizer: Adam has taken one step, not the source's 21.
    (optim,) = tag.glob("*optim_states.pt")
    with weights_only_loads(tag):
        saved = torch.load(optim)["optimizer_state_dict"]
    steps = {int(s["step"]) for s in saved["base_optimizer_state"]["state"].values()}
    assert steps == {1}, steps
    # EMA weights: the source's EMA, one decay step (at the source's step) toward the new
    # raw weights; a fresh EMA would equal the raw weights after its first step.
    ema_source = load_file(source_tag / "ema_unet.safetensors")
    raw, ema = load_file(tag / "unet.safetensors"), load_file(tag / "ema_unet.safetensors")
    one_minus = 1 - EMAModel([torch.zeros(1)], decay=0.999).get_decay(REFERENCE_STEPS + 1)
    for name, expected in ema_source.items():
        expected = expected.clone()
        expected.sub_(one_minus * (expected - raw[name]))
        assert torch.equal(ema[name], expected), name
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    tags = _run_tags(uri, "from_tag")
    assert tags["ldm.init_from"] == str(source_tag)
    assert tags["ldm.init_from_step"] == str(REFERENCE_STEPS)


def test_a_run_with_its_own_checkpoint_resumes_and_ignores_init_from(pipeline, from_tag):
    work, _, _ = pipeline
    args, _, _ = from_tag
    # To the step it has: it resumes, finds nothing left to do, and ends.
    resumed = ok(ldm("train", *args, "train.num_steps=1"))
    assert "train.init_from is ignored: the run continues its own checkpoint step_00000001" in (
        resumed.stdout
    )
    assert "resuming from" in resumed.stdout and "(step 1)" in resumed.stdout
    assert "a new run from the weights" not in resumed.stdout


def test_an_original_single_file_loads_back_bitwise(pipeline, exported, tmp_path):
    """A pipeline's UNet written under Stable Diffusion's original names (the inverse of
    diffusers' conversion) reads back, through that conversion, into the same weights."""
    from core.loader import build_config
    from data_pipeline.cache import read_manifest
    from models.original_checkpoint import ORIGINAL_PREFIX, to_original
    from models.unet import build_unet
    from training.init_from import check_source, load_source

    work, _, _ = pipeline
    weights = load_file(exported / "unet" / "diffusion_pytorch_model.safetensors")
    unet_config = json.loads((exported / "unet" / "config.json").read_text())
    original = to_original(weights, unet_config)
    assert all(name.startswith(ORIGINAL_PREFIX) for name in original)
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in original
    file = tmp_path / "model.safetensors"
    # What a published file also holds: the autoencoder's and the text encoder's weights.
    save_file({**original, "first_stage_model.decoder.conv_in.weight": torch.ones(2)}, file)

    config = build_config({"preset": "tiny"}, [f"train.init_from={file}"])
    (cache,) = (work / "runs" / "cache").iterdir()
    channels = read_manifest(cache)["spec"]["latent_channels"]
    source = check_source(str(file), config, channels)
    assert source.kind == "original Stable Diffusion checkpoint"
    unet = build_unet(config, channels)
    assert load_source(str(file), unet).ema is None  # the EMA starts from these weights
    loaded = unet.state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_original_names_are_stable_diffusions(tmp_path):
    """The inverse mapping on Stable Diffusion 1's UNet (meta device): the names its
    published checkpoints use, each read back by diffusers' conversion."""
    from diffusers import UNet2DConditionModel

    from models.original_checkpoint import original_names

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    names = original_names(unet.state_dict(), unet.config)
    assert len(names) == 686
    prefix = "model.diffusion_model."
    assert (
        names["down_blocks.1.downsamplers.0.conv.weight"] == prefix + "input_blocks.6.0.op.weight"
    )
    assert names["up_blocks.0.upsamplers.0.conv.bias"] == prefix + "output_blocks.2.1.conv.bias"
    assert names["up_blocks.1.upsamplers.0.conv.bias"] == prefix + "output_blocks.5.2.conv.bias"
    assert (
        names["mid_block.resnets.1.conv2.weight"] == prefix + "middle_block.2.out_layers.3.weight"
    )
    assert (
        names["up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"]
        == prefix + "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"
    )


def test_a_pipeline_folder_names_the_autoencoder_and_text_encoder(pipeline, exported):
    from core.layout import RunLayout
    from core.loader import build_config
    from models.autoencoder import load_autoencoder
    from models.text_encoders import load_text_encoder

    work, _, _ = pipeline
    config = build_config(
        {"preset": "tiny"},
        [f"autoencoder.pretrained={exported}", f"text_encoder.name_or_path={exported}"],
    )
    assert RunLayout.of(config).autoencoder_dir == str(exported / "vae")
    assert type(load_autoencoder(RunLayout.of(config).autoencoder_dir)).__name__ == "AutoencoderKL"
    encoder, tokenizer = load_text_encoder(config.text_encoder.name_or_path)
    minilm, _ = load_text_encoder("minilm")
    theirs, ours = encoder.state_dict(), minilm.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert tokenizer("a red heart")["input_ids"][:2] == [101, 1037]


def test_sources_that_do_not_fit_are_refused_in_one_line(pipeline, source_tag, exported, tmp_path):
    from models.text_encoders import load_text_encoder
    from training.checkpoint import commit

    work, _, _ = pipeline
    args = _experiment(work, "refused")
    # The tiny UNet's second level is 64 wide: its first convolution is the first to differ.
    one_line_error(
        ldm("train", *args, f"train.init_from={source_tag}", "unet.block_out_channels=[32,96]"),
        "train.init_from:",
        "down_blocks.1.resnets.0.conv1.weight is [64, 32, 3, 3] there and [96, 32, 3, 3] here",
    )
    one_line_error(
        ldm("train", *args, f"train.init_from={exported}", "unet.num_attention_heads=4"),
        "attention heads [2, 2]",
        "[4, 4]",
    )
    # A tag whose UNet was trained with its own text encoder, into a frozen-encoder config.
    joint = tmp_path / "runs" / "joint" / "checkpoints" / source_tag.name
    shutil.copytree(source_tag, joint, ignore=shutil.ignore_patterns("COMMITTED.json"))
    encoder, _ = load_text_encoder("minilm")
    save_file(encoder.state_dict(), joint / "text_encoder.safetensors")
    save_file(dict(encoder.named_parameters()), joint / "ema_text_encoder.safetensors")
    (joint / "text_encoder_config.json").write_text(encoder.config.to_json_string())
    commit(joint)
    one_line_error(
        ldm("train", *args, f"train.init_from={joint}"),
        "holds a text encoder trained with its UNet",
        "text_encoder.trainable=true",
    )
    pickled = tmp_path / "sd.ckpt"
    pickled.write_bytes(b"never read")
    one_line_error(ldm("train", *args, f"train.init_from={pickled}"), "pickle", ".safetensors")
    one_line_error(ldm("train", *args, f"train.init_from={tmp_path / 'nowhere'}"), "does not exist")
    assert not (work / "runs" / "refused" / "checkpoints").exists()
