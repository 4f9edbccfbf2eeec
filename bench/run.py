"""`make bench`: every benchmark in order, each printing its ratios and writing JSON."""

from __future__ import annotations

import time

from bench import cache_speedup, data_path, overhead, precompute, startup, zero_memory

# In the order: what the stack costs, what the cache buys, the data path, precompute,
# ZeRO memory, start-up. (bench/gpu_sd1.py needs a GPU; bench/quality.py is `make
# bench-quality`: it trains the demo.)
BENCHMARKS = [
    ("orchestration overhead: ldm train vs a bare PyTorch loop", overhead.main),
    ("cache speed-up: latent cache vs encoding online", cache_speedup.main),
    ("data path: cache stream and shard decode", data_path.main),
    ("precompute: Ray Data vs a bare encode loop", lambda: precompute.main(8, _CPU_ENCODERS)),
    ("ZeRO memory: measured per rank vs the ZeRO formulas", zero_memory.main),
    ("start-up: ldm train vs bare DeepSpeed, to the first step", startup.main),
]
# This machine has no GPU: give the cores to encoders, as the demo does (see README).
_CPU_ENCODERS = [
    "precompute.num_encoders=2",
    "precompute.num_cpus_per_encoder=0.75",
    "precompute.num_cpus_per_decoder=0.5",
]


def main() -> None:
    started = time.perf_counter()
    for title, run in BENCHMARKS:
        print(f"\n=== {title} ===", flush=True)
        run()
    print(f"\nbench: done in {time.perf_counter() - started:.0f} s; JSON in bench/results/")


if __name__ == "__main__":
    main()
