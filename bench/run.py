"""`make bench`: every benchmark in order, each printing its ratios and writing JSON."""

from __future__ import annotations

import time

from bench import buckets, cache_speedup, data_path, overhead, precompute, startup, zero_memory

# What the stack costs, what the cache buys, precompute (whose cache the data-path benchmark
# then reads), the data path, ZeRO memory, start-up. (bench/gpu_check.py needs a GPU;
# bench/quality.py is `make bench-quality`: it trains the demo.)
BENCHMARKS = [
    ("orchestration overhead: ldm train vs a bare PyTorch loop", overhead, overhead.main),
    ("cache speed-up: latent cache vs encoding online", cache_speedup, cache_speedup.main),
    (
        "precompute: Ray Data vs a bare encode loop",
        precompute,
        lambda: precompute.main(8, _CPU_ENCODERS),
    ),
    ("data path: cache stream and shard decode", data_path, data_path.main),
    ("ZeRO memory: measured per rank vs the ZeRO formulas", zero_memory, zero_memory.main),
    ("start-up: ldm train vs bare DeepSpeed, to the first step", startup, startup.main),
    ("aspect-ratio buckets vs square crops: training samples/s", buckets, buckets.main),
]
# This machine has no GPU: give the cores to encoders, as the demo does (see README).
_CPU_ENCODERS = [
    "precompute.num_encoders=2",
    "precompute.num_cpus_per_encoder=0.75",
    "precompute.num_cpus_per_decoder=0.5",
]


def check_order(benchmarks=BENCHMARKS) -> None:
    """Each benchmark's inputs (`NEEDS`) come from one that runs before it (`PRODUCES`): a
    fresh checkout has nothing left over from an earlier run."""
    produced: set = set()
    for title, module, _ in benchmarks:
        missing = [p for p in getattr(module, "NEEDS", ()) if p not in produced]
        if missing:
            raise SystemExit(f"bench: {title!r} needs {missing}, which no earlier benchmark makes")
        produced |= set(getattr(module, "PRODUCES", ()))


def main() -> None:
    check_order()
    started = time.perf_counter()
    for title, _, run in BENCHMARKS:
        print(f"\n=== {title} ===", flush=True)
        run()
    print(f"\nbench: done in {time.perf_counter() - started:.0f} s; JSON in bench/results/")


if __name__ == "__main__":
    main()
