"""`make bench` on a fresh checkout: every benchmark's inputs are made by one that runs
before it (the data-path benchmark once ran before the precompute that builds its cache,
and passed only where an old cache was left over)."""

import pytest

from bench import data_path, precompute, run


def test_benchmarks_run_after_what_they_read():
    run.check_order()
    assert data_path.NEEDS and set(data_path.NEEDS) <= set(precompute.PRODUCES)


def test_the_order_check_catches_a_reader_before_its_writer():
    swapped = sorted(run.BENCHMARKS, key=lambda b: b[1] is not data_path)  # data path first
    with pytest.raises(SystemExit, match="needs"):
        run.check_order(swapped)
