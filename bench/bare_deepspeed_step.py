"""The start-up baseline: one DeepSpeed training step with nothing around it, one process.

Builds the same UNet as `ldm train` (`training.models.build_unet`, same config and seed),
wraps it with `deepspeed.initialize` through `training.engine.build_engine` (the same AdamW,
schedule and derived DeepSpeed JSON), and runs one noise-prediction step on random tensors of
a training batch's shapes. No Ray, no data loader, no MLflow.

Writes time.time() at each milestone as JSON to the job's `out` path:

    python bench/bare_deepspeed_step.py JOB.json

It sets up its one-rank process group as torchrun would, but through a file rendezvous:
torchrun's TCP store listens on every network interface (whatever --master_addr says), and
nothing started here may listen beyond loopback. torchrun itself adds ~1 s of launcher
start-up, which this baseline therefore does not pay.
"""

import time

STARTED = time.time()  # first thing: interpreter start-up is all that comes before

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as training/engine.py on a CPU machine


def main(job_path: str) -> dict[str, float]:
    marks = {"script_start": STARTED}
    job = json.loads(Path(job_path).read_text())

    import torch
    import torch.distributed as dist

    marks["import_torch"] = time.time()
    # training.engine is the project's one deepspeed import: it selects the accelerator and
    # skips the shared-memory op (whose first use would compile C++ for a minute).
    from training.engine import build_engine

    marks["import_deepspeed"] = time.time()
    from core.loader import load_config
    from models.schedulers import build_noise_scheduler
    from models.unet import build_unet

    config = load_config(job["config"])
    marks["import_project_and_config"] = time.time()

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what torchrun would set
    dist.init_process_group(  # gloo, as Ray Train sets up for CPU workers
        "gloo", init_method=f"file://{job['rendezvous']}", rank=0, world_size=1
    )
    marks["process_group"] = time.time()

    torch.manual_seed(config.run.seed)
    unet = build_unet(config, latent_channels=job["latent_channels"])  # imports diffusers
    marks["build_unet"] = time.time()
    t = config.train
    # The same AdamW, warmup schedule and derived DeepSpeed JSON as `ldm train`.
    engine = build_engine(unet, config, world_size=1)
    marks["deepspeed_initialize"] = time.time()

    scheduler = build_noise_scheduler(config)
    b, size = t.micro_batch_size, unet.config.sample_size
    latents = torch.randn(b, job["latent_channels"], size, size)
    context = torch.randn(b, config.text_encoder.max_length, unet.config.cross_attention_dim)
    mask = torch.ones(b, config.text_encoder.max_length, dtype=torch.bool)
    noise = torch.randn_like(latents)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (b,))
    noisy = scheduler.add_noise(latents, noise, steps)
    engine.train()
    pred = engine(noisy, steps, encoder_hidden_states=context, encoder_attention_mask=mask).sample
    loss = (pred - noise).pow(2).mean()
    engine.backward(loss)
    engine.step()
    marks["first_step"] = time.time()
    Path(job["out"]).write_text(json.dumps(marks))
    dist.destroy_process_group()
    return marks


if __name__ == "__main__":
    main(sys.argv[1])
