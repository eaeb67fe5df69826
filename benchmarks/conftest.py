"""Fixtures for the forward-kernel benchmarks: the workload data (``fastemb.bench``), fastemb's
result that every implementation is checked against, and the plain C bag-sum reference."""

import ctypes
import pathlib
import shlex
import shutil
import subprocess

import numpy as np
import pytest

from fastemb import bench
from fastemb._kernels import kernels as _core

REFERENCE_SOURCE = pathlib.Path(__file__).with_name("reference_bag_sum.c")


@pytest.fixture(scope="session", params=bench.WORKLOADS, ids=lambda workload: workload.label)
def bench_data(request):
    """The arrays of each workload in ``fastemb.bench.WORKLOADS``, built once per session."""
    return bench.make_data(request.param)


@pytest.fixture(scope="session")
def expected_result():
    """``expected_result(data, operation)``: fastemb's single-thread result, computed once per
    session; every implementation (fastemb at any thread count included) must agree with it."""
    results = {}

    def expected(data, operation):
        key = (data.workload, operation)
        if key not in results:
            with bench.thread_count(1):
                results[key] = bench.benchmark_callable("fastemb", operation, data)()
        return results[key]

    return expected


@pytest.fixture(scope="session")
def reference_bag_sum(tmp_path_factory):
    """``reference_bag_sum(data, num_threads)``: a zero-argument callable running the plain C
    reference (reference_bag_sum.c) on ``data``.

    The C file is compiled once per session with the flags fastemb itself was built with (as
    ``fastemb.show_config()`` reports them; by default the portable ``-O3 -ffp-contract=off
    -fopenmp``), so the comparison is between kernels, not compiler settings. Skips the
    reference when gcc is missing.
    """
    compiler = shutil.which("gcc")
    if compiler is None:
        pytest.skip("gcc is not installed: no C reference")
    library_path = tmp_path_factory.mktemp("reference") / "reference_bag_sum.so"
    flags = shlex.split(_core.compile_flags()) + ["-shared", "-fPIC"]
    subprocess.run(
        [compiler, *flags, "-o", str(library_path), str(REFERENCE_SOURCE)],
        check=True, capture_output=True,
    )
    kernel = ctypes.CDLL(str(library_path)).reference_bag_sum
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
