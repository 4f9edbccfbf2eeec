"""A text encoder trained jointly with the UNet (the paper's LDM-KL-8-G recipe): a token-id
cache, both models in one DeepSpeed engine with their optimizer state sharded over the
ranks, exact resume (raw and EMA weights of both), and the trained encoder in samples and
the exported pipeline.

A real `ldm precompute` / `ldm train` (Ray Train, 2 ZeRO-2 ranks on the suite's embedded
Ray, stopped by SIGTERM to the command's process, then continued on one rank: an elastic
restart) / sampling / export on the session's `pipeline` fixture, with a 2-layer `ldmbert`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ldm, ok, sigterm_to_this_process_when
from training import checkpoint as ckpt

pytestmark = pytest.mark.slow

JOINT = (
    "text_encoder.name_or_path=ldmbert",
    "text_encoder.trainable=true",
    "text_encoder.num_layers=2",
    "text_encoder.hidden_size=64",
    "text_encoder.max_length=16",
)
QUIET = ("train.log_every=1", "tracking.log_model=false", "train.checkpoint_every=2")


def _weights(tag: Path, part: str) -> dict[str, torch.Tensor]:
    return load_file(tag / f"{part}.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_joint_text_encoder_trains_shards_resumes_samples_and_exports(
    pipeline, embedded_ray, tmp_path
):
    work, _, _ = pipeline
    exp = [
        str(work / "exp.yaml"),
        f"autoencoder.pretrained={work / 'runs' / 'tiny' / 'autoencoder'}",
        *JOINT,
    ]
    ok(ldm("precompute", *exp, "run.name=joint"))
    manifests = [json.loads(p.read_text()) for p in (work / "runs").glob("cache/*/manifest.json")]
    (spec,) = [m["spec"] for m in manifests if m["spec"]["text"] == "token_ids"]
    assert spec["text_encoder"] == "ldmbert" and spec["text_max_length"] == 16

    # Two ZeRO-2 ranks (Ray Train workers) until SIGTERM to the process running `ldm train`
    # (this one; as Ctrl-C, a scheduler or `ldm jobs stop` stops it) after the step-2
    # checkpoint: every rank saves at the step that sees the request, and the command exits
    # 143. The request reaches the ranks within a few of these short steps (the signal waits
    # for the driver's main thread, the stop file for rank 0's next poll): room for 40 steps,
    # every tag kept.
    tags = work / "runs" / "joint" / "checkpoints"
    train = [*exp, "run.name=joint", "train.num_steps=40", "train.keep_last=40", *QUIET]
    with sigterm_to_this_process_when(tags / "step_00000002" / "COMMITTED.json") as stray:
        stopped = ldm("train", *train)
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 143 and not stray, out[-3000:]
    assert "stopped by SIGTERM: the checkpoint was saved" in out, out[-3000:]
    assert not (work / "runs" / "joint" / "STOP_REQUESTED").exists()
    full = ckpt.committed_tags(tags)[-1]  # the one the stop saved
    assert 2 < int(full.name.split("_")[1]) < 40, full
    parts = ("unet", "text_encoder", "ema_unet", "ema_text_encoder")

    # Exact resume, on one rank in process: uninterrupted to step 4; then step 4 is lost and
    # the run resumes from step 2 into the same raw and EMA weights of both models.
    one = [*exp, "run.name=joint1", "train.num_workers=1", "train.num_steps=4", *QUIET]
    ok(ldm("train", *one))
    full1 = work / "runs" / "joint1" / "checkpoints" / "step_00000004"
    uninterrupted = {part: _weights(full1, part) for part in parts}
    (full1 / "COMMITTED.json").unlink()
    resumed = ok(ldm("train", *one))
    assert "step_00000002 (step 2)" in resumed.stdout
    for part in parts:
        assert _same(uninterrupted[part], _weights(full1, part)), part

    # The encoder trained: its weights moved after step 2, and its EMA lags them.
    step2 = work / "runs" / "joint" / "checkpoints" / "step_00000002"
    raw2, raw4 = _weights(step2, "text_encoder"), _weights(full, "text_encoder")
    moved = [k for k in raw4 if not torch.equal(raw2[k], raw4[k])]
    assert "model.embed_tokens.weight" in moved and any(".self_attn." in k for k in moved)
    assert not _same(raw4, _weights(full, "ema_text_encoder"))
    assert torch.equal(raw2["to_logits.weight"], raw4["to_logits.weight"])  # unused head

    # One engine, ZeRO-2: each rank's optimizer partition holds half of UNet + encoder.
    trained = sum(
        t.numel()
        for k, t in {**_weights(full, "unet"), **raw4}.items()
        if not k.startswith("to_logits.")
    )
    partitions = []
    for rank in (0, 1):
        state = torch.load(
            full / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
            map_location="cpu",
            weights_only=False,
        )["optimizer_state_dict"]
        partitions.append(sum(t.numel() for t in state["single_partition_of_fp32_groups"]))
    assert all(trained / 2 <= n < trained / 2 + 1024 for n in partitions), (partitions, trained)

    # Sampling and export use the trained encoder from the checkpoint.
    from orchestrator.export import export_pipeline
    from orchestrator.sample import sample_from_checkpoint

    (png,) = sample_from_checkpoint(full, ["a red heart"], tmp_path, num_images=1, num_steps=2)
    assert png.stat().st_size > 0
    exported = export_pipeline(full, tmp_path / "pipe")
    index = json.loads((exported / "model_index.json").read_text())
    assert index["text_encoder"][1] == "LDMBertModel"
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(exported)
    ema = _weights(full, "ema_text_encoder")
    exported_encoder = pipe.text_encoder.state_dict()
    assert all(torch.equal(exported_encoder[k], ema[k]) for k in ema)
    image = pipe("a red heart", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)

    # Elastic: the two ranks' run continues on one worker (in process) from the tag the stop
    # saved, its ZeRO-2 partitions merged through DeepSpeed's universal format.
    stopped_at = int(full.name.split("_")[1])
    onward = [*train, "train.num_workers=1", f"train.num_steps={stopped_at + 1}"]
    continued = ok(ldm("train", *onward))
    assert f"resuming from {full} (step {stopped_at})" in continued.stdout, continued.stdout
    assert "converted for a new world size" in continued.stdout
    assert "train.num_workers: 2 -> 1" in continued.stdout
    state = json.loads((tags / f"step_{stopped_at + 1:08d}" / ckpt.TRAIN_STATE).read_text())
    assert state["step"] == stopped_at + 1 and state["world_size"] == 1
