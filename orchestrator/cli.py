"""`ldm`: the one command users run. Each subcommand is one pipeline stage or tool.

Stages take an experiment YAML plus `section.key=value` overrides. Problems the user can fix
(`LdmError`) print as one line and exit with status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.config import STAGES, ExperimentConfig, Section
from core.errors import LdmError
from core.layout import RunLayout
from core.loader import build_config, load_config
from core.presets import get_preset
from orchestrator.cluster import cache_env


def set_default_env() -> None:
    """Keep every tool's caches in the cache folder (never $HOME), run offline and quiet."""
    defaults = {
        **cache_env(),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cuda" if _has_cuda() else "cpu",
        # Ray folds a worker's line into "[repeated Nx across cluster]" when an earlier one
        # differed only in its numbers: a job's log then hid that it resumed a second time.
        "RAY_DEDUP_LOGS": "0",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# Set by `main` for a command line run as its own process (not `main([...])` in a test):
# stages then show ldm's lines on the console and write everything to the run's log.
_filter_console = False


@contextmanager
def _stage_output(config: ExperimentConfig, stage: str) -> Iterator[None]:
    if not _filter_console:
        yield
        return
    from orchestrator.console import log_path, stage_console

    with stage_console(log_path(RunLayout.of(config).run_dir, stage), stage):
        yield


def _split_overrides(items: list[str]) -> list[str]:
    """`resume=auto` is shorthand for `train.resume=auto`."""
    return [f"train.{item}" if item.startswith("resume=") else item for item in items]


def _load(args: argparse.Namespace):
    config = load_config(args.config, _split_overrides(args.overrides))
    if getattr(args, "address", None):
        config.cluster.address = args.address
    return config


def cmd_config(args: argparse.Namespace) -> None:
    if args.show_defaults:
        print(ExperimentConfig().to_yaml(), end="")
        for name, section in ExperimentConfig.model_fields.items():
            for key, field in section.annotation.model_fields.items():
                print(f"# {name}.{key}: {field.description}")
                group = field.annotation
                if isinstance(group, type) and issubclass(group, Section):  # data.filters
                    for inner, part in group.model_fields.items():
                        print(f"# {name}.{key}.{inner}: {part.description}")
        return
    config = get_preset(args.preset) if args.preset else _load(args)
    print(config.to_yaml(), end="")


def cmd_shards(args: argparse.Namespace) -> None:
    from data_pipeline.shards import write_shards

    summary = write_shards(Path(args.src), Path(args.out), args.samples_per_shard, progress=True)
    print(
        f"shards: {summary.num_samples} samples in {summary.num_shards} shards at {args.out}; "
        f"{len(summary.skipped)} skipped"
    )
    for name, reason in summary.skipped[:20]:
        print(f"  skipped {name}: {reason}")


def cmd_autoencoder(args: argparse.Namespace) -> None:
    config = _load(args)  # a bad config fails in a fraction of a second, before the imports
    from orchestrator.autoencoder import train_autoencoder

    with _stage_output(config, "autoencoder"):
        train_autoencoder(config)


def cmd_precompute(args: argparse.Namespace) -> None:
    config = _load(args)
    from orchestrator.precompute import precompute

    with _stage_output(config, "precompute"):
        precompute(config)


def cmd_train(args: argparse.Namespace) -> None:
    config = _load(args)
    from orchestrator.train import train

    with _stage_output(config, "train"):
        result = train(config)
        print(
            f"train: done; checkpoints in {result['checkpoint_dir']}; MLflow run {result['run_id']}"
        )


def cmd_cache(args: argparse.Namespace) -> None:
    from data_pipeline.cache_tools import cache_info, verify_cache

    cache_dir = args.path
    if args.action == "info":
        print("\n".join(cache_info(cache_dir)))
        return
    result = verify_cache(
        cache_dir, args.num_decode, Path(args.autoencoder) if args.autoencoder else None
    )
    psnr = (
        f"decoded {result['num_decoded']} samples: PSNR {result['psnr']:.2f} dB vs their sources"
        if "psnr" in result
        else f"decode check skipped ({result['psnr_skipped']})"
    )
    print(
        f"cache OK: {result['shards']} shards, {result['samples']} samples as the manifest says; "
        f"{result['sources_checked']} of {result['shards']} source shards found and unchanged; "
        + psnr
    )


def cmd_sample(args: argparse.Namespace) -> None:
    from orchestrator.sample import sample_from_checkpoint

    paths = sample_from_checkpoint(
        Path(args.checkpoint),
        args.prompt,
        Path(args.out),
        num_images=args.num_images,
        seed=args.seed,
        num_steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        use_ema=not args.raw,
        sampler=args.sampler,
        height=args.height,
        width=args.width,
    )
    for path in paths:
        print(path)


def cmd_export(args: argparse.Namespace) -> None:
    from orchestrator.export import export_pipeline

    out = export_pipeline(
        Path(args.checkpoint), Path(args.out), use_ema=not args.raw, overwrite=args.overwrite
    )
    print(f"export: {'raw' if args.raw else 'EMA'} weights of {args.checkpoint} -> {out}")


def cmd_submit(args: argparse.Namespace) -> None:
    from orchestrator.cluster import check_resources
    from orchestrator.jobs import cluster_nodes, submit
    from orchestrator.shared_paths import unshared_paths_problem

    config = _load(args)
    config.cluster.address = None  # inside the job, Ray is the cluster the job runs on
    root = Path(__file__).resolve().parents[1]
    grace = {
        "autoencoder": config.autoencoder.preempt_grace_s,
        "train": config.train.preempt_grace_s,
    }
    workers = {"autoencoder": config.autoencoder.num_workers, "train": config.train.num_workers}
    nodes = cluster_nodes(args.address)
    # The job's nodes, not this machine, will read the config's paths.
    if (problem := unshared_paths_problem(config, args.stage, nodes)) is not None:
        raise LdmError(problem)
    if args.stage in workers and not config.cluster.resource_wait_s:
        # Refused before submitting: the job would otherwise start only to fail the same way.
        check_resources(
            config.cluster,
            workers[args.stage],
            f"{args.stage}.num_workers",
            nodes=lambda: nodes,
        )
    job_id = submit(
        args.address,
        args.stage,
        config.to_yaml(),
        root,
        python=args.python,
        grace_s=grace.get(args.stage, 60.0),
    )
    print(job_id)


def cmd_jobs(args: argparse.Namespace) -> None:
    from orchestrator import jobs

    if args.action == "list":
        for job in jobs.list_jobs(args.address):
            print(f"{job['id']}\t{job['status']}\t{job['entrypoint']}")
        return
    if not args.job_id:
        raise LdmError(f"`ldm jobs {args.action}` needs a JOB_ID (see `ldm jobs list`)")
    if args.action == "status":
        print(jobs.status(args.address, args.job_id))
    elif args.action == "logs":
        for chunk in jobs.logs(args.address, args.job_id, follow=args.follow):
            print(chunk, end="", flush=True)
    elif args.action == "stop":
        stopped = jobs.stop(args.address, args.job_id)
        print("stopping" if stopped else "not running")


def cmd_drain(args: argparse.Namespace) -> None:
    from orchestrator.drain import drain

    signalled, alive = drain(args.grace, args.under)
    print(f"drain: sent SIGTERM to {signalled} ldm process(es); {alive} still running")


def cmd_demo(args: argparse.Namespace) -> None:
    from orchestrator.demo import run_demo

    overrides = _split_overrides(args.overrides)
    with _stage_output(load_config(args.config, overrides), "demo"):
        run_demo(Path(args.config), overrides)


def _tracking_target(args: argparse.Namespace):
    """The tracking store and experiment: from a config if given, else the defaults."""
    config = _load(args) if args.config else build_config({})
    return RunLayout.of(config).tracking_uri, config.tracking.experiment, Path(config.run.root)


def cmd_runs(args: argparse.Namespace) -> None:
    from orchestrator.runs import list_runs

    uri, experiment, _ = _tracking_target(args)
    print("\n".join(list_runs(uri, experiment, args.max_runs)))


def cmd_ui(args: argparse.Namespace) -> None:
    from orchestrator.runs import run_ui

    uri, _, root = _tracking_target(args)
    run_ui(uri, args.port, root / "mlartifacts")


def cmd_k8s(args: argparse.Namespace) -> None:
    from orchestrator import k8s

    config = _load(args)
    documents = k8s.ray_job(config, args.stage, args.name, image=args.image)
    print(k8s.dump(documents), end="")


def cmd_plan(args: argparse.Namespace) -> None:
    from orchestrator import plan

    if args.mosaic_check:
        print(f"{'GPUs':>5} {'px':>4} {'published':>10} {'predicted':>10} {'error':>7}")
        for row in plan.mosaic_check(args.overlap):
            mark = "  (calibration)" if row["calibration"] else ""
            print(
                f"{row['gpus']:>5} {row['resolution']:>4} {row['published']:>10,.0f} "
                f"{row['predicted']:>10,.0f} {row['error']:>+7.1%}{mark}"
            )
        print(f"utilisation calibrated on 8 x A100 at 256 px: {row['utilisation']:.3f}")
        return
    if args.preset:
        overrides = ([args.config] if args.config else []) + list(args.overrides)
        config = build_config({"preset": args.preset}, _split_overrides(overrides))
    elif args.config:
        config = _load(args)
    else:
        raise LdmError("`ldm plan` needs a CONFIG file or --preset NAME")
    if args.utilisation is not None:
        utilisation, source = args.utilisation, "--utilisation"
    else:
        calibration = plan.calibration_of(args.gpu_type)
        utilisation = plan.calibrated_utilisation(calibration, args.overlap)
        source = calibration.source
    p = plan.plan(config, args.gpus, args.gpu_type, utilisation, args.overlap)
    print("\n".join(plan.report(config, p, args.gpus, args.gpu_type, utilisation, source)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def staged(name: str, help_text: str, func, address: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="experiment YAML, e.g. configs/demo.yaml")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides")
        if address:
            p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
        p.set_defaults(func=func)
        return p

    p = sub.add_parser("shards", help="folder of captioned images -> webdataset shards")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.set_defaults(func=cmd_shards)

    staged("autoencoder", "stage 1: train the KL autoencoder", cmd_autoencoder)
    staged(
        "precompute", "encode shards into the latent cache (Ray Data)", cmd_precompute, address=True
    )
    staged("train", "train the UNet (Ray Train + DeepSpeed)", cmd_train, address=True)

    p = sub.add_parser("config", help="print the resolved config")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--preset", help="print a preset instead")
    p.add_argument(
        "--show-defaults", action="store_true", help="every key with its default and meaning"
    )
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("cache", help="inspect (info) or check (verify) a latent cache")
    p.add_argument("action", choices=["info", "verify"])
    p.add_argument("path", help="a latent cache folder, e.g. runs/cache/<spec digest>")
    p.add_argument("--num-decode", type=int, default=8, help="samples verify decodes")
    p.add_argument("--autoencoder", help="autoencoder folder (default: the one the cache names)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("sample", help="generate images from a checkpoint (guided sampling)")
    p.add_argument(
        "checkpoint", help="a checkpoint tag folder, e.g. runs/demo/checkpoints/step_00001500"
    )
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--out", default="samples")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--negative-prompt", default=None, help="default: the run's sample config")
    p.add_argument(
        "--sampler",
        choices=["ddim", "pndm", "dpm_solver++"],
        default=None,
        help="default: the run's sample.sampler",
    )
    p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
    p.add_argument(
        "--height",
        type=int,
        default=None,
        help="image height in px (e.g. a bucket's); default: "
        "the run's sample.height, else data.resolution",
    )
    p.add_argument("--width", type=int, default=None, help="image width in px; likewise")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="a checkpoint as a diffusers StableDiffusionPipeline folder")
    p.add_argument("checkpoint", help="a committed checkpoint tag folder")
    p.add_argument("out", help="folder to write (must not exist or be empty)")
    p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("submit", help="submit a stage as a Ray job; prints the job id")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument(
        "--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265"
    )
    p.add_argument("--stage", choices=STAGES, default="train")
    p.add_argument(
        "--python",
        default="python",
        help="the Python the job runs on the head node (default: `python` on its PATH)",
    )
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list, inspect and stop Ray jobs")
    p.add_argument("action", choices=("list", "status", "logs", "stop"))
    p.add_argument("job_id", nargs="?")
    p.add_argument(
        "--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265"
    )
    p.add_argument("--follow", action="store_true", help="with logs: stream until the job ends")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser(
        "drain",
        help="SIGTERM the ldm drivers and Ray Train workers on this machine (they save a "
        "checkpoint and stop) and wait for them: a node's preStop hook",
    )
    p.add_argument("--grace", type=float, default=60.0, help="seconds to wait, at most")
    p.add_argument("--under", type=int, help="only descendants of this process id")
    p.set_defaults(func=cmd_drain)

    p = sub.add_parser("k8s", help="print a KubeRay RayJob (and its config) for an experiment")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--stage", choices=STAGES, default="train")
    p.add_argument("--name", help="RayJob name (default ldm-<run.name>-<stage>)")
    p.add_argument("--image", help="container image (default: the one k8s/ uses)")
    p.set_defaults(func=cmd_k8s)

    p = sub.add_parser("plan", help="memory per GPU and throughput on N GPUs, without a GPU")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--preset", help="plan a preset instead of a config file")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-type", default="h100", help="a100, h100, h200 or l40s")
    p.add_argument(
        "--utilisation",
        type=float,
        help="fraction of the bf16 peak the UNet reaches (default: solved per GPU family from "
        "a measured throughput on that family, which the report names)",
    )
    p.add_argument("--overlap", type=float, default=0.5, help="communication hidden by compute")
    p.add_argument(
        "--mosaic-check",
        action="store_true",
        help="calibrate on MosaicML's 8 x A100 SD2 throughput and predict their other figures",
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("runs", help="list MLflow runs: stage, status, step, loss, samples/s")
    p.add_argument("config", nargs="?", help="experiment YAML (default: runs/mlflow.db)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--max-runs", type=int, default=50)
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("ui", help="the MLflow UI for the local store, on 127.0.0.1")
    p.add_argument("config", nargs="?", help="experiment YAML (default: runs/mlflow.db)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("demo", help="the whole pipeline on the real emoji demo data")
    p.add_argument("config", nargs="?", default="configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=cmd_demo)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, with a command's overrides and options in any order: argparse's
    intermixed parsing, applied to the command's own parser (it does not take subparsers)."""
    parser = _parser()
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv and argv[0] in commands:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)  # --help, or no or an unknown command: argparse says so


def main(argv: list[str] | None = None) -> int:
    global _filter_console
    # LDM_CONSOLE=full: everything on the console, as it comes (and no run log).
    _filter_console = argv is None and os.environ.get("LDM_CONSOLE", "") != "full"
    args = parse(sys.argv[1:] if argv is None else list(argv))
    set_default_env()
    try:
        if args.command == "config" and not (args.config or args.preset or args.show_defaults):
            raise LdmError("`ldm config` needs a CONFIG file, --preset NAME or --show-defaults")
        args.func(args)
    except LdmError as err:
        print(f"ldm {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"ldm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
