"""Benchmark workloads for fastemb, the baselines they are compared with, and the
``python -m fastemb bench`` report.

This package is the one definition of what is benchmarked; ``python -m fastemb bench``
(:func:`report`) and the pytest-benchmark suite in ``benchmarks/`` both build on it. Its rooms:
``workloads`` (operations, shapes, data), ``implementations`` (the callables of fastemb, torch
and NumPy, the thread count, the agreement check), ``speed_of_light`` (with its C source,
``speed_of_light.c``), ``harness`` (timing) and ``report`` (tables, JSON, chart). It needs
only NumPy: torch is used when it is importable and left out otherwise, and the speed-of-light
reference is compiled with gcc when gcc is installed.

A workload is a float32 table and a batch of ``num_bags`` bags of ``bag_size`` indices each,
drawn uniformly or Zipf-skewed (:class:`Workload`, :data:`WORKLOADS`, :func:`make_data`). For
each operation in :data:`OPERATIONS` every implementation in :data:`IMPLEMENTATIONS` gives a
zero-argument callable (:func:`benchmark_callable`) whose result is NumPy arrays:

- ``gather``: the rows of every index, shape ``(num_bags, bag_size, dim)``;
- ``bag_sum``, ``bag_mean``, ``bag_max``: each bag reduced to one row, shape ``(num_bags, dim)``;
- ``bag_weighted_sum``: the sum of each bag's rows times the per-sample weights;
- ``bag_sum_float16``, ``bag_sum_bfloat16``, ``bag_sum_int8``, ``bag_sum_int4`` (the
  reduced-precision operations, :data:`TABLE_FORMATS`): the bag sum of the table stored in 16
  bits, or quantized row-wise (``fastemb.quantize``; torch runs its quantized embedding_bag ops
  on the same prepacked bytes); the report also sets fastemb's time beside torch's float32
  ``bag_sum``;
- ``forward_backward``: the bag sums, then the coalesced weight gradient for the upstream
  gradient ``grad_output``: ``(output, rows, values)`` with ``rows`` sorted and unique;
- ``step_lazyadam``, ``step_sgd``, ``step_adagrad``: one training step of the bag sum (forward,
  backward with ``grad_output``, a lazy optimizer update of the looked-up rows, see
  :data:`STEP_HYPERPARAMETERS`) on the implementation's own copy of the table and optimizer state:
  ``(output, weight)``, where ``weight`` is that copy after the step. Each call takes one more
  step from where the last one left off; the work of a step does not depend on the values, so
  timing repeated calls is fair, and the first call's result is one step from the shared table;
- ``step_lazyadam_float16``, ``step_lazyadam_bfloat16``, ``step_lazyadam_split``
  (:data:`REDUCED_PRECISION_STEP_OPERATIONS`): fastemb's LazyAdam step on the table trained in
  16 bits or split (bfloat16 top halves for the forward, low halves beside); the others run
  their float32 step (the speed of light moves the table in the step's format); each gives the
  step's forward output, and the report also sets fastemb's time beside its own float32
  ``step_lazyadam``.

fastemb and torch take the indices flat, with bag-start ``offsets``; NumPy takes them as a
``(num_bags, bag_size)`` matrix, which is the fastest way NumPy has to reduce equal-sized bags.
Run the callables inside :func:`thread_count` so that fastemb, torch and the speed-of-light
reference use the same number of threads (NumPy always runs on one), and check each result
against fastemb's with :func:`assert_agrees` so that a fast but wrong implementation cannot win.

Next to them, :data:`SPEED_OF_LIGHT` names plain C loops that move only the table-sized bytes
an operation cannot avoid (:func:`speed_of_light_callable`); a kernel's time relative to it is
how close the kernel is to what memory allows. It is a plain loop, not a proof: where the rows
come from the caches (a small table, hot Zipf rows) a tighter kernel can beat it. The report
sets a reduced-precision operation's speed of light beside its float32 operation's: the most
that moving fewer bytes can gain on that machine.

>>> from fastemb import bench
>>> data = bench.make_data(bench.Workload("tiny", 100, 8, num_bags=4, bag_size=3))
>>> with bench.thread_count(1):
...     expected = bench.benchmark_callable("fastemb", "bag_sum", data)()
...     result = bench.benchmark_callable("numpy", "bag_sum", data)()
>>> bench.assert_agrees("bag_sum", result, expected)
>>> result.shape
(4, 8)
"""

from .harness import Measurement, call_for, measure, time_calls
from .implementations import (EXACT_OPERATIONS, assert_agrees, available_implementations,
                              benchmark_callable, default_thread_counts,
                              speed_of_light_is_available, thread_count, torch_is_available)
from .report import (format_ratio, format_seconds, format_table, machine_info, plot_speedups,
                     report)
from .speed_of_light import compile_c_library, speed_of_light_callable
from .workloads import (FORWARD_OPERATIONS, IMPLEMENTATIONS, OPERATIONS,
                        REDUCED_PRECISION_OPERATIONS, REDUCED_PRECISION_STEP_OPERATIONS, SKEWS,
                        SPEED_OF_LIGHT,
                        STEP_HYPERPARAMETERS, STEP_OPERATIONS, TABLE_FORMATS, WORKLOADS,
                        BenchData, TableFormat, Workload,
                        make_data, select_workloads, step_optimizer, workload_names)

__all__ = [
    "EXACT_OPERATIONS", "FORWARD_OPERATIONS", "IMPLEMENTATIONS", "OPERATIONS",
    "REDUCED_PRECISION_OPERATIONS", "REDUCED_PRECISION_STEP_OPERATIONS", "SKEWS", "SPEED_OF_LIGHT", "STEP_HYPERPARAMETERS", "STEP_OPERATIONS",
    "TABLE_FORMATS", "WORKLOADS", "BenchData", "Measurement", "TableFormat", "Workload",
    "assert_agrees",
    "available_implementations", "benchmark_callable", "call_for", "compile_c_library",
    "default_thread_counts", "format_ratio", "format_seconds", "format_table", "machine_info",
    "make_data", "measure", "plot_speedups", "report", "select_workloads",
    "speed_of_light_callable", "speed_of_light_is_available", "step_optimizer",
    "thread_count", "time_calls", "torch_is_available", "workload_names",
]
