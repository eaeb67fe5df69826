"""Benchmarks of every operation in ``fastemb.bench``: fastemb against torch, plain NumPy, the
speed of light and (for the bag sum) a plain C reference.

One pytest-benchmark group per operation, workload and thread count (1 and all cores), e.g.
``step_lazyadam-large-zipf-2t``; compare the rows of a group. The ``speed_of_light`` row is
plain C loops that move only the table bytes the operation needs (see
``fastemb.bench.speed_of_light_callable``). Timings are shown, never asserted on, but every
implementation's result is first checked against fastemb's, so a fast wrong kernel fails instead
of winning. Training steps keep stepping their own copy of the table while they are timed; the
work of a step does not depend on the values. ``pytest benchmarks --benchmark-disable`` runs
each body once, as a correctness smoke test::

    pytest benchmarks --benchmark-only --benchmark-columns=min,median,rounds --benchmark-sort=name

``python -m fastemb bench`` times the same workloads without pytest.
"""

import dataclasses

import pytest

from fastemb import bench

THREAD_COUNTS = bench.default_thread_counts()
threads_parameter = pytest.mark.parametrize("threads", THREAD_COUNTS,
                                            ids=lambda threads: f"{threads}t")


def benchmark_in_group(benchmark, function, operation, implementation, data, threads,
                       expected=None):
    """Check ``function()`` against ``expected`` (unless None), then time it in its group,
    both with ``threads`` threads for fastemb, torch and the speed-of-light reference."""
    benchmark.group = f"{operation}-{data.workload.label}-{threads}t"
    benchmark.extra_info.update(
        dataclasses.asdict(data.workload), implementation=implementation, threads=threads,
        row_bytes=data.workload.row_bytes,
    )
    with bench.thread_count(threads):
        result = function()
        if expected is not None:
            bench.assert_agrees(operation, result, expected)
        del result
        benchmark(function)


@threads_parameter
@pytest.mark.parametrize("implementation", bench.IMPLEMENTATIONS)
@pytest.mark.parametrize("operation", bench.OPERATIONS)
def test_operation(benchmark, bench_data, operation, implementation, threads, expected_result):
    """One operation of one implementation on one workload."""
    if implementation not in bench.available_implementations():
        pytest.skip(f"{implementation} is not installed")
    function = bench.benchmark_callable(implementation, operation, bench_data)
    benchmark_in_group(benchmark, function, operation, implementation, bench_data, threads,
                       expected_result(bench_data, operation))


@threads_parameter
@pytest.mark.parametrize("operation", bench.OPERATIONS)
def test_speed_of_light(benchmark, bench_data, operation, threads):
    """The speed-of-light row of each group (its result is not comparable, so not checked)."""
    if not bench.speed_of_light_is_available():
        pytest.skip("gcc is not installed: no speed-of-light reference")
    function = bench.benchmark_callable(bench.SPEED_OF_LIGHT, operation, bench_data)
    benchmark_in_group(benchmark, function, operation, bench.SPEED_OF_LIGHT, bench_data, threads)


@threads_parameter
def test_bag_sum_c_reference(benchmark, bench_data, threads, expected_result, reference_bag_sum):
    """The plain C reference loop, in the bag_sum groups; it must equal fastemb bit for bit."""
    function = reference_bag_sum(bench_data, threads)
    benchmark_in_group(benchmark, function, "bag_sum", "c_reference", bench_data, threads,
                       expected_result(bench_data, "bag_sum"))
