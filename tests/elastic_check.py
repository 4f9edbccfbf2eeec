"""Run as a script: load a 2-rank ZeRO checkpoint into a 1-rank engine the way an elastic
restart does, and print how far its optimizer state is from the saved one (JSON)."""

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from core.loader import build_config
from models.unet import build_unet
from training.engine import build_engine, load_engine, to_universal


def main(tag: Path, scratch: Path, port: int) -> dict:
    config = build_config(yaml.safe_load((tag / "config.yaml").read_text()), absolute_paths=False)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    dist.init_process_group("gloo", rank=0, world_size=1)
    universal = scratch / tag.name
    shutil.rmtree(universal, ignore_errors=True)
    to_universal(tag, universal)
    engine = build_engine(build_unet(config, 4), config, 1, load_universal=True)
    load_engine(engine, universal)
    optimizer = engine.optimizer.optimizer
    (flat,) = optimizer.param_groups[0]["params"]
    n = sum(p.numel() for p in engine.module.parameters())
    saved = [
        torch.load(path, weights_only=False)["optimizer_state_dict"]
        for path in sorted(tag.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    ]
    diffs = {}
    for key in ("exp_avg", "exp_avg_sq"):
        ref = torch.cat([s["base_optimizer_state"]["state"][0][key] for s in saved])[:n]
        diffs[key] = float((optimizer.state[flat][key][:n] - ref).abs().max())
        diffs[key + "_norm"] = float(ref.norm())
    master = torch.cat([s["single_partition_of_fp32_groups"][0] for s in saved])[:n]
    diffs["fp32_master"] = float(
        (engine.optimizer.single_partition_of_fp32_groups[0].detach()[:n] - master).abs().max()
    )
    diffs["saved_ranks"] = len(saved)
    diffs["adam_step"] = float(optimizer.state[flat]["step"])
    diffs["lr_scheduler_step"] = engine.lr_scheduler.state_dict()["last_epoch"]
    return diffs


if __name__ == "__main__":
    print("ELASTIC " + json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))))
