"""``fastemb.bench`` and ``python -m fastemb bench``: every implementation of every operation
agrees on a tiny workload, a wrong result is caught, and the command prints its tables, writes
JSON and a PNG, and says how to get matplotlib when --plot cannot draw."""

import doctest
import json
import sys
import time

import numpy as np
import pytest

import fastemb
from fastemb import bench
from fastemb.__main__ import main
from fastemb.bench.workloads import step_state_arrays, trained_table

TINY_WORKLOADS = (
    bench.Workload("tiny", 300, 16, num_bags=24, bag_size=5, skew="uniform"),
    bench.Workload("tiny", 300, 16, num_bags=24, bag_size=5, skew="zipf"),
)


@pytest.fixture
def tiny_sizes(monkeypatch):
    """Make the tiny workloads the only ones ``--sizes`` knows (``--sizes tiny`` runs both), and
    warm up and settle with one call instead of for 0.1 s and 0.02 s."""
    monkeypatch.setattr(bench.workloads, "WORKLOADS", TINY_WORKLOADS)
    monkeypatch.setattr(bench.harness, "WARMUP_SECONDS", 0.0)
    monkeypatch.setattr(bench.harness, "SETTLE_SECONDS", 0.0)


def run_bench(*arguments):
    """``python -m fastemb bench ARGUMENTS`` in this process; returns its exit status."""
    return main(["bench", *arguments])


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("workload", TINY_WORKLOADS, ids=lambda workload: workload.label)
@pytest.mark.parametrize("operation", bench.OPERATIONS)
def test_implementations_agree(operation, workload, threads, thread_count):
    """``thread_count`` (the fixture) makes fastemb use every thread even on tiny calls."""
    data = bench.make_data(workload)
    table = data.table.copy()
    with bench.thread_count(1):
        expected = bench.benchmark_callable("fastemb", operation, data)()
    with bench.thread_count(threads):
        for implementation in bench.available_implementations():
            result = bench.benchmark_callable(implementation, operation, data)()
            bench.assert_agrees(operation, result, expected)
        if bench.speed_of_light_is_available():
            bench.benchmark_callable(bench.SPEED_OF_LIGHT, operation, data)()
    np.testing.assert_array_equal(data.table, table)  # steps work on copies


@pytest.mark.parametrize("operation", bench.STEP_OPERATIONS)
def test_a_step_changes_only_the_looked_up_rows(operation):
    data = bench.make_data(TINY_WORKLOADS[1])
    _, weight = bench.benchmark_callable("fastemb", operation, data)()
    changed = np.flatnonzero((weight != data.table).any(axis=1))
    np.testing.assert_array_equal(changed, np.unique(data.indices))


@pytest.mark.skipif(not bench.speed_of_light_is_available(), reason="needs gcc")
@pytest.mark.parametrize("operation",
                         bench.STEP_OPERATIONS + bench.REDUCED_PRECISION_STEP_OPERATIONS)
def test_a_step_speed_of_light_moves_the_table_as_the_step_stores_it(operation):
    """The speed of light of a step reads and writes, once a call, the looked-up rows of the
    table in the step's own format (a split table: bfloat16 high halves, then the low halves)
    and of each optimizer state array, and no other row."""
    data = bench.make_data(TINY_WORKLOADS[1])
    step = bench.benchmark_callable(bench.SPEED_OF_LIGHT, operation, data)
    first = [array.copy() for array in step()]
    second = step()
    dtype, split = (trained_table(operation)
                    if operation in bench.REDUCED_PRECISION_STEP_OPERATIONS
                    else (np.dtype(np.float32), False))
    table_dtypes = ["bfloat16", "uint16"] if split else [dtype.name]
    assert [array.dtype.name for array in second] == (
        table_dtypes + ["float32"] * step_state_arrays(operation))
    looked_up = np.zeros(data.table.shape[0], dtype=bool)
    looked_up[data.indices] = True
    for before, after in zip(first, second):
        assert after.shape == data.table.shape
        added = after.view(np.uint32) - before.view(np.uint32)
        np.testing.assert_array_equal(added[looked_up], 1)
        np.testing.assert_array_equal(added[~looked_up], 0)


def test_each_call_takes_one_more_step():
    data = bench.make_data(TINY_WORKLOADS[0])
    step = bench.benchmark_callable("numpy", "step_sgd", data)
    first = step()[1].copy()
    second = step()[1]
    # SGD with the same gradient: the second step moves the rows as far again
    np.testing.assert_allclose(second - first, first - data.table, rtol=1e-3, atol=1e-6)
    assert not np.array_equal(second, first)


def test_a_wrong_result_is_caught():
    data = bench.make_data(TINY_WORKLOADS[0])
    output, rows, values = bench.benchmark_callable("fastemb", "forward_backward", data)()
    bench.assert_agrees("forward_backward", (output, rows, values), (output, rows, values))
    nudged = values.copy()
    nudged[3, 2] += 1e-3
    with pytest.raises(AssertionError, match="forward_backward part 2"):
        bench.assert_agrees("forward_backward", (output, rows, nudged), (output, rows, values))
    with pytest.raises(AssertionError, match="part 1"):
        bench.assert_agrees("forward_backward", (output, rows[::-1].copy(), values),
                            (output, rows, values))
    with pytest.raises(AssertionError, match="expected float32"):
        bench.assert_agrees("bag_sum", output.astype(np.float64), output)
    with pytest.raises(AssertionError, match="tuple of 3"):
        bench.assert_agrees("forward_backward", output, (output, rows, values))


def test_steps_are_compared_with_the_training_tolerance():
    expected = np.full((4, 3), 10.0, dtype=np.float32)
    close = expected + np.float32(5e-4)  # within rtol 1e-4, beyond the forward tolerance
    bench.assert_agrees("step_sgd", close, expected)
    with pytest.raises(AssertionError):
        bench.assert_agrees("bag_weighted_sum", close, expected)
    with pytest.raises(AssertionError):
        bench.assert_agrees("step_sgd", expected + np.float32(1e-2), expected)


QUANTIZED_OPERATIONS = [operation for operation, stored in bench.TABLE_FORMATS.items()
                        if stored.quantized]


def test_quantized_bag_sums_are_registered_with_their_bits():
    assert QUANTIZED_OPERATIONS == ["bag_sum_int8", "bag_sum_int4"]
    data = bench.make_data(TINY_WORKLOADS[0])
    for operation, bits in zip(QUANTIZED_OPERATIONS, (8, 4)):
        assert operation in bench.OPERATIONS and operation in bench.REDUCED_PRECISION_OPERATIONS
        table = data.table_for(operation)
        assert isinstance(table, fastemb.QuantizedTable) and table.bits == bits
        assert table is data.table_for(operation)  # (built once)
        np.testing.assert_array_equal(table.data, fastemb.quantize(data.table, bits).data)


@pytest.mark.parametrize("operation", QUANTIZED_OPERATIONS)
def test_numpy_dequantizes_the_prepacked_rows_as_fastemb_does(operation):
    """Within float32 rounding: NumPy rounds the product and the sum, fastemb's fused
    multiply-add once (4 bits: the same, the product of an 11-bit scale and a 4-bit code being
    exact)."""
    table = bench.make_data(TINY_WORKLOADS[0]).table_for(operation)
    rows = bench.implementations.numpy_dequantized_rows(table.data, table.bits)
    exact = table.dequantize()
    np.testing.assert_allclose(rows, exact, rtol=0, atol=2 * np.spacing(np.abs(exact).max()))
    assert rows.dtype == np.float32


@pytest.mark.parametrize("operation", QUANTIZED_OPERATIONS)
def test_quantized_sums_are_compared_to_float32_rounding(operation):
    """A quantized table's sums are float32 in every implementation: the forward tolerance, not
    the 16-bit tables' (whose torch sums are rounded to bfloat16)."""
    expected = np.full((4, 3), 10.0, dtype=np.float32)
    bench.assert_agrees(operation, expected + np.float32(1e-5), expected)
    with pytest.raises(AssertionError, match=operation):
        bench.assert_agrees(operation, expected + np.float32(1e-2), expected)
    bench.assert_agrees("bag_sum_float16", expected + np.float32(1e-2), expected)


@pytest.mark.parametrize("float32, operations, implementation", [
    ("bag_sum", bench.REDUCED_PRECISION_OPERATIONS, "torch"),
    ("step_lazyadam", bench.REDUCED_PRECISION_STEP_OPERATIONS, "fastemb")])
def test_reduced_precision_operations_are_set_beside_their_float32_one(float32, operations,
                                                                       implementation):
    """The bag sums beside torch's float32 bag sum, the steps beside fastemb's float32 step,
    and the speed of light of each beside the float32 one's."""
    workload = TINY_WORKLOADS[0]
    measurements = [bench.Measurement(float32, workload, 1, {"torch": [0.6], "fastemb": [0.6],
                                                             bench.SPEED_OF_LIGHT: [0.5]})]
    for operation in operations:
        measurements.append(bench.Measurement(operation, workload, 1,
                                              {"torch": [0.5], "fastemb": [0.2],
                                               bench.SPEED_OF_LIGHT: [0.125]}))
    lines = bench.format_table(measurements, 1).splitlines()
    for operation in operations:
        assert (f"{operation}: 3.00x {implementation}'s float32 {float32} "
                "(speed of light: 4.00x the float32 one's)") in lines
    del measurements[0].runs[bench.SPEED_OF_LIGHT]  # (no speed of light: no bracket)
    lines = bench.format_table(measurements, 1).splitlines()
    for operation in operations:
        assert f"{operation}: 3.00x {implementation}'s float32 {float32}" in lines
    assert ("bag_sum_int8" in operations) == (float32 == "bag_sum")


@pytest.mark.parametrize("operation", bench.REDUCED_PRECISION_STEP_OPERATIONS)
def test_reduced_precision_step_trains_its_own_table(operation):
    """fastemb's step trains the table in that format (its forward reads the rounded or
    truncated table); the first step's output is the bag sums of that table."""
    data = bench.make_data(TINY_WORKLOADS[0])
    dtype, split = bench.workloads.trained_table(operation)
    assert operation.endswith("split") == split
    table = data.table.astype(dtype)
    if split:
        table = (table.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    expected = fastemb.embedding_bag(data.indices, table, data.offsets, mode="sum")
    np.testing.assert_array_equal(bench.benchmark_callable("fastemb", operation, data)(),
                                  expected)


def test_sizes_select_every_skew_of_a_name():
    assert [w.label for w in bench.select_workloads(["large"])] == ["large-uniform",
                                                                     "large-zipf"]
    assert [w.label for w in bench.select_workloads(["large-zipf", "small"])] == [
        "small-uniform", "large-zipf"]
    with pytest.raises(ValueError, match="unknown sizes huge"):
        bench.select_workloads(["huge"])


def test_the_timed_call_is_past_the_wake_of_the_function_before_it(monkeypatch):
    """A function that slows the next few calls of any other (as a large NumPy reference does)
    must not decide the times: each turn's untimed calls absorb its wake, whatever the order."""
    monkeypatch.setattr(bench.harness, "SETTLE_SECONDS", 0.05)
    wake = {"slow_calls_left": 0}

    def polluter():
        wake["slow_calls_left"] = 3

    def victim():
        if wake["slow_calls_left"]:
            wake["slow_calls_left"] -= 1
            time.sleep(0.01)

    for order in (("victim", "polluter"), ("polluter", "victim")):
        functions = {"victim": victim, "polluter": polluter}
        times = bench.time_calls({name: functions[name] for name in order}, repeat=3)
        assert len(times["victim"]) == 3
        assert max(times["victim"]) < 0.005  # a slow call sleeps 10 ms


def test_doctests():
    results = doctest.testmod(bench)
    assert results.attempted > 0 and results.failed == 0


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------

def test_command_prints_a_table_per_size_and_thread_count_and_writes_json(
        tiny_sizes, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert run_bench("--sizes", "tiny", "--threads", "1", "2", "--repeat", "2",
                     "--json", str(path)) == 0
    out = capsys.readouterr().out
    for label in ("tiny-uniform", "tiny-zipf"):
        for threads in ("1 thread,", "2 threads,"):
            assert f"{label} (300 x 16 table, 24 bags of 5 " in out
            assert threads in out
    lines = out.splitlines()
    for operation in bench.OPERATIONS:
        assert sum(line.startswith(operation + " ") for line in lines) == 4
    assert "vs torch" in out and "fastemb/light" in out

    document = json.loads(path.read_text())
    machine = document["machine"]
    assert machine["cpu_count"] >= 1 and machine["fastemb"] and machine["numpy"] == np.__version__
    assert machine["platform"] and machine["date"]
    assert document["settings"]["repeat"] == 2
    results = document["results"]
    assert len(results) == 2 * len(bench.OPERATIONS) * 2
    for result in results:
        seconds = result["median_seconds"]
        assert set(bench.available_implementations()) <= set(seconds)
        assert all(value > 0 for value in seconds.values())
        assert all(len(runs) == 2 for runs in result["runs_seconds"].values())
        assert result["speedup_over_numpy"] == pytest.approx(seconds["numpy"]
                                                             / seconds["fastemb"])
        if "torch" in seconds:
            assert result["speedup_over_torch"] == pytest.approx(seconds["torch"]
                                                                 / seconds["fastemb"])
        if bench.SPEED_OF_LIGHT in seconds:
            assert result["fraction_of_speed_of_light"]["fastemb"] == pytest.approx(
                seconds[bench.SPEED_OF_LIGHT] / seconds["fastemb"])


def test_command_runs_only_the_chosen_operations_and_threads(tiny_sizes, capsys):
    assert run_bench("--sizes", "tiny-zipf", "--ops", "bag_max", "step_sgd", "--threads", "1",
                     "--repeat", "1") == 0
    out = capsys.readouterr().out
    assert "tiny-zipf" in out and "tiny-uniform" not in out and "2 threads" not in out
    rows = [line.split()[0] for line in out.splitlines()
            if line.split() and line.split()[0] in bench.OPERATIONS]
    assert rows == ["bag_max", "step_sgd"]


def test_command_rejects_an_unknown_size(tiny_sizes, capsys):
    with pytest.raises(SystemExit) as raised:
        run_bench("--sizes", "large")  # not among the (patched) workloads
    assert raised.value.code == 2
    assert "tiny" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_install_it(tiny_sizes, monkeypatch, tmp_path,
                                                         capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    with pytest.raises(SystemExit) as raised:
        run_bench("--sizes", "tiny", "--plot", str(tmp_path / "bench.png"))
    assert raised.value.code != 0
    assert "pip install matplotlib" in str(raised.value.code)
    assert capsys.readouterr().out == ""  # it says so before benchmarking anything
    assert not (tmp_path / "bench.png").exists()


def test_plot_writes_a_png(tiny_sizes, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("torch")  # the chart shows the speedups over torch
    path = tmp_path / "bench.png"
    assert run_bench("--sizes", "tiny", "--ops", "bag_sum", "step_lazyadam", "--repeat", "1",
                     "--plot", str(path)) == 0
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_without_torch_says_how_to_install_it(tiny_sizes, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(bench, "torch_is_available", lambda: False)
    with pytest.raises(SystemExit, match="pip install torch"):
        run_bench("--sizes", "tiny", "--plot", str(tmp_path / "bench.png"))


def test_plot_bars_start_at_1x(tmp_path):
    """A speedup rises from the 1x line, a slowdown hangs down from it."""
    pytest.importorskip("matplotlib")
    workload = bench.Workload("tiny", 100, 8, num_bags=4, bag_size=3)
    measurements = []
    for operation, torch_seconds in (("bag_sum", 3.0), ("bag_max", 0.5)):
        measurement = bench.Measurement(operation, workload, 1)
        measurement.runs = {"fastemb": [1.0], "torch": [torch_seconds]}
        measurements.append(measurement)
    machine = {"fastemb": "0", "torch": "0", "cpu": "cpu", "cpu_count": 1, "date": "today"}
    figure = bench.plot_speedups(measurements, tmp_path / "bars.png", machine)
    bars = [patch for patch in figure.axes[0].patches]
    extents = sorted((bar.get_y(), bar.get_y() + bar.get_height()) for bar in bars)
    assert extents == [(1.0, 0.5), (1.0, 3.0)]


def test_default_run_is_the_quick_one_and_full_runs_everything(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "report", lambda workloads, ops, threads, repeat, **kwargs:
                        calls.append(([w.label for w in workloads], repeat)))
    assert run_bench() == 0 and run_bench("--full") == 0 and run_bench("--full", "--repeat",
                                                                       "3") == 0
    assert calls[0] == (["large-uniform"], 5)
    assert calls[1] == ([w.label for w in bench.WORKLOADS], 10)
    assert calls[2][1] == 3
