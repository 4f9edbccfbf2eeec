"""`make bench`: every benchmark in order, each printing its ratios and writing JSON."""

from __future__ import annotations

import time

from bench import data_path, precompute

BENCHMARKS = [
    ("precompute: Ray Data vs a bare encode loop", lambda: precompute.main(8, _CPU_ENCODERS)),
    ("data path: cache stream and shard decode", data_path.main),
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
