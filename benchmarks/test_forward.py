"""Forward-kernel benchmarks: fastemb against torch, plain NumPy and a plain C reference.

One pytest-benchmark group per operation, workload and thread count, e.g.
``bag_sum-mission-zipf-2t``; compare the rows of a group. Timings are shown, never asserted on,
but every implementation's result is first checked against fastemb's, so a fast wrong kernel
fails instead of winning. ``pytest benchmarks --benchmark-disable`` runs each body once, as a
correctness smoke test::

    pytest benchmarks --benchmark-only --benchmark-columns=min,median,rounds --benchmark-sort=name
"""

import dataclasses
import os

import pytest

from fastemb import bench

THREAD_COUNTS = sorted({1, os.cpu_count() or 1})


def check_and_benchmark(benchmark, function, operation, implementation, data, threads, expected):
    """Check ``function()`` against ``expected``, then time it in its group, both with
    ``threads`` threads for fastemb and torch."""
    benchmark.group = f"{operation}-{data.workload.label}-{threads}t"
    benchmark.extra_info.update(
        dataclasses.asdict(data.workload), implementation=implementation, threads=threads,
        row_bytes=data.workload.row_bytes,
    )
    with bench.thread_count(threads):
        bench.assert_agrees(operation, function(), expected)
        benchmark(function)


@pytest.mark.parametrize("threads", THREAD_COUNTS, ids=lambda threads: f"{threads}t")
@pytest.mark.parametrize("implementation", bench.IMPLEMENTATIONS)
@pytest.mark.parametrize("operation", bench.OPERATIONS)
def test_forward(benchmark, bench_data, operation, implementation, threads, expected_result):
    """One operation of one implementation on one workload."""
    if implementation not in bench.available_implementations():
        pytest.skip(f"{implementation} is not installed")
    function = bench.benchmark_callable(implementation, operation, bench_data)
    check_and_benchmark(benchmark, function, operation, implementation, bench_data, threads,
                        expected_result(bench_data, operation))


@pytest.mark.parametrize("threads", THREAD_COUNTS, ids=lambda threads: f"{threads}t")
def test_bag_sum_c_reference(benchmark, bench_data, threads, expected_result, reference_bag_sum):
    """The plain C reference loop, in the bag_sum groups; it must equal fastemb bit for bit."""
    function = reference_bag_sum(bench_data, threads)
    check_and_benchmark(benchmark, function, "bag_sum", "c_reference", bench_data, threads,
                        expected_result(bench_data, "bag_sum"))
