"""Benchmarks of bag sums on quantized tables (``fastemb.quantize``) against torch's quantized
ops on the same prepacked bytes and against torch's float32 bag sum, on the reference workload
("large": 1,000,000 x 64, 4,096 bags of 32 indices, uniform and Zipf).

One pytest-benchmark group per operation, workload and thread count, as in
``test_operations.py`` (e.g. ``bag_sum_int8-large-uniform-2t``): fastemb's int8 bag sum next to
torch's ``embedding_bag_byte_rowwise_offsets`` and torch's float32 ``F.embedding_bag``; fastemb's
int4 bag sum next to torch's ``embedding_bag_4bit_rowwise_offsets``. Each result is first
checked against fastemb's (to float32 rounding: torch fuses multiply-adds)::

    pytest benchmarks/test_quantized_operations.py --benchmark-only \
        --benchmark-columns=min,median,rounds
"""

import numpy as np
import pytest

import fastemb
from fastemb import bench

LARGE_WORKLOADS = [workload for workload in bench.WORKLOADS if workload.name == "large"]
OPERATIONS = {"bag_sum_int8": 8, "bag_sum_int4": 4}
IMPLEMENTATIONS = {
    "bag_sum_int8": ("fastemb", "torch", "torch_float32"),
    "bag_sum_int4": ("fastemb", "torch"),
}
CASES = [(operation, implementation) for operation, names in IMPLEMENTATIONS.items()
         for implementation in names]


@pytest.fixture(scope="session", params=LARGE_WORKLOADS, ids=lambda workload: workload.label)
def large_data(request):
    return bench.make_data(request.param)


@pytest.fixture(scope="session")
def quantized_tables():
    """``quantized_tables(data, bits)``: the workload's table quantized, built once."""
    tables = {}

    def table_for(data, bits):
        key = (data.workload.num_embeddings, data.workload.dim, bits)
        if key not in tables:
            tables[key] = fastemb.quantize(data.table, bits)
        return tables[key]

    return table_for


def bag_sum_callable(implementation, data, table):
    """The zero-argument callable that sums the workload's bags of ``table`` (quantized) with
    ``implementation``; "torch_float32" sums the float32 table instead."""
    if implementation == "fastemb":
        return lambda: fastemb.embedding_bag(data.indices, table, data.offsets, mode="sum")
    torch = pytest.importorskip("torch")
    indices, offsets = torch.from_numpy(data.indices), torch.from_numpy(data.offsets)
    if implementation == "torch_float32":
        weight = torch.from_numpy(data.table)
        return lambda: torch.nn.functional.embedding_bag(indices, weight, offsets,
                                                         mode="sum").numpy()
    op = (torch.ops.quantized.embedding_bag_byte_rowwise_offsets if table.bits == 8
          else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets)
    packed = torch.from_numpy(table.data)
    return lambda: op(packed, indices, offsets, mode=0).numpy()


@pytest.mark.parametrize("threads", bench.default_thread_counts(),
                         ids=lambda threads: f"{threads}t")
@pytest.mark.parametrize(("operation", "implementation"), CASES)
def test_quantized_bag_sum(benchmark, large_data, quantized_tables, operation, implementation,
                           threads):
    table = quantized_tables(large_data, OPERATIONS[operation])
    function = bag_sum_callable(implementation, large_data, table)
    benchmark.group = f"{operation}-{large_data.workload.label}-{threads}t"
    benchmark.extra_info.update(implementation=implementation, threads=threads,
                                bits=table.bits)
    with bench.thread_count(threads):
        expected = fastemb.embedding_bag(large_data.indices, table, large_data.offsets,
                                         mode="sum")
        if implementation == "torch_float32":
            expected = fastemb.embedding_bag(large_data.indices, large_data.table,
                                             large_data.offsets, mode="sum")
        np.testing.assert_allclose(function(), expected, rtol=1e-5, atol=1e-4)
        benchmark(function)
