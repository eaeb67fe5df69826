"""Fixtures for the benchmarks: the workload data (``fastemb.bench``), fastemb's result that
every implementation is checked against, and the plain C bag-sum reference."""

import ctypes
import pathlib

import numpy as np
import pytest

from fastemb import bench

REFERENCE_SOURCE = pathlib.Path(__file__).with_name("reference_bag_sum.c")


@pytest.fixture(scope="session", params=bench.WORKLOADS, ids=lambda workload: workload.label)
def bench_data(request):
    """The arrays of each workload in ``fastemb.bench.WORKLOADS``, built once per session."""
    return bench.make_data(request.param)


@pytest.fixture(scope="session")
def expected_result():
    """``expected_result(data, operation)``: fastemb's single-thread result, computed once;
    every implementation (fastemb at any thread count included) must agree with it.

    Forward results are kept for the session. A training result holds whole tables (256 MB on
    the large workload), so only the latest one is kept: the tests of one workload and operation
    run one after another.
    """
    results = {}

    def expected(data, operation):
        key = (data.workload, operation)
        if key not in results:
            if operation not in bench.FORWARD_OPERATIONS:
                for stale in [key for key in results if key[1] not in bench.FORWARD_OPERATIONS]:
                    del results[stale]
            with bench.thread_count(1):
                results[key] = bench.benchmark_callable("fastemb", operation, data)()
        return results[key]

    return expected


@pytest.fixture(scope="session")
def reference_bag_sum():
    """``reference_bag_sum(data, num_threads)``: a zero-argument callable running the plain C
    reference (reference_bag_sum.c, compiled by ``fastemb.bench.compile_c_library`` with the
    flags fastemb was built with) on ``data``. Skips the reference when gcc is missing."""
    library = bench.compile_c_library(REFERENCE_SOURCE.read_text())
    if library is None:
        pytest.skip("gcc is not installed: no C reference")
    kernel = library.reference_bag_sum
    kernel.restype = None
    kernel.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_int,
    ]

    def reference_for(data, num_threads):
        bounds = np.append(data.offsets, data.indices.size)  # the C side takes num_bags + 1
        num_bags, dim = data.offsets.size, data.table.shape[1]

        def run():
            out = np.empty((num_bags, dim), dtype=np.float32)
            kernel(data.table.ctypes.data, dim, data.indices.ctypes.data, bounds.ctypes.data,
                   num_bags, out.ctypes.data, num_threads)
            return out

        return run

    return reference_for
