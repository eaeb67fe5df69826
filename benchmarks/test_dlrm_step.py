"""The DLRM-shaped step of 26 tables (``fastemb.bench.dlrm``): fastemb's collection (optimizer
in backward, and backward then step), fastemb's per-table modules, torch's
``nn.EmbeddingBag(sparse=True)``, plain NumPy and, where it is installed, FBGEMM's
table-batched kernels, side by side in one pytest-benchmark group
per optimizer and thread count (``dlrm_step-lazyadam-2t``). Every implementation's tables after
its first step are checked against the per-table modules' before it is timed.

``FASTEMB_DLRM_MAX_ROWS`` caps the tables' rows (default 100,000)::

    FASTEMB_DLRM_MAX_ROWS=1000000 pytest benchmarks/test_dlrm_step.py --benchmark-only \\
        --benchmark-columns=median,rounds
"""

import pytest

from fastemb import bench
from fastemb.bench import dlrm

THREAD_COUNTS = bench.default_thread_counts()


@pytest.fixture(scope="module")
def dlrm_data():
    """The step's tables, indices and upstream gradient, built once."""
    return dlrm.make_data()


@pytest.fixture(scope="module")
def expected_tables(dlrm_data):
    """``expected(optimizer)``: the per-table modules' tables after one step (1 thread)."""
    results = {}

    def expected(optimizer_name):
        if optimizer_name not in results:
            results.clear()  # (26 tables a result: keep one)
            with bench.thread_count(1):
                step = dlrm.step_callable("fastemb-per-table", optimizer_name, dlrm_data)
                results[optimizer_name] = [table.copy() for table in step()]
        return results[optimizer_name]

    return expected


@pytest.mark.parametrize("threads", THREAD_COUNTS, ids=lambda threads: f"{threads}t")
@pytest.mark.parametrize("implementation", dlrm.IMPLEMENTATIONS)
@pytest.mark.parametrize("optimizer_name", sorted(dlrm.OPTIMIZERS))
def test_dlrm_step(benchmark, dlrm_data, expected_tables, optimizer_name, implementation,
                   threads):
    """One implementation's step, checked, then timed in its group."""
    if implementation == "torch" and not bench.torch_is_available():
        pytest.skip("torch is not installed")
    if implementation == "fbgemm" and not dlrm.fbgemm_is_available():
        pytest.skip("FBGEMM is not installed (pip install torch==2.14.1 fbgemm-gpu-cpu==1.9.0)")
    with bench.thread_count(threads):
        step = dlrm.step_callable(implementation, optimizer_name, dlrm_data)
        if step is None:
            pytest.skip(f"{implementation} has no {optimizer_name}")
        dlrm.assert_tables_agree(step(), expected_tables(optimizer_name), implementation)
        benchmark.group = f"dlrm_step-{optimizer_name}-{threads}t"
        benchmark.extra_info.update(implementation=implementation, threads=threads,
                                    tables=len(dlrm_data.weights),
                                    batch_size=dlrm_data.batch_size)
        benchmark(step)
