"""The report of ``python -m fastemb bench``: a table per workload and thread count, the
machine's description, JSON and a bar chart of the speedups over torch."""

import datetime
import json
import os
import pathlib
import platform
import sys

import numpy as np

from .._config import __version__
from .._kernels import kernels as _core
from .._kernels import variant as _kernel_variant
from .harness import measure
from .implementations import (benchmark_callable, speed_of_light_is_available, thread_count,
                              torch_is_available)
from .workloads import (REDUCED_PRECISION_OPERATIONS, REDUCED_PRECISION_STEP_OPERATIONS,
                        SPEED_OF_LIGHT, float32_step, make_data)

def format_seconds(seconds):
    """``"480 us"``, ``"12.34 ms"`` or ``"1.20 s"``; ``"-"`` for None."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_ratio(value, percent=False):
    """``"2.50x"`` or ``"85%"``, or ``"-"`` for None."""
    if value is None:
        return "-"
    return f"{value:.0%}" if percent else f"{value:.2f}x"


TABLE_COLUMNS = (
    # (heading, width, cell of a Measurement)
    ("operation", 17, lambda m: m.operation),
    ("fastemb", 10, lambda m: format_seconds(m.seconds("fastemb"))),
    ("torch", 10, lambda m: format_seconds(m.seconds("torch"))),
    ("numpy", 10, lambda m: format_seconds(m.seconds("numpy"))),
    ("light", 10, lambda m: format_seconds(m.seconds(SPEED_OF_LIGHT))),
    ("vs torch", 9, lambda m: format_ratio(m.speedup("torch"))),
    ("vs numpy", 9, lambda m: format_ratio(m.speedup("numpy"))),
    ("fastemb/light", 14, lambda m: format_ratio(m.fraction_of_speed_of_light("fastemb"), True)),
    ("torch/light", 12, lambda m: format_ratio(m.fraction_of_speed_of_light("torch"), True)),
)


def format_table(measurements, repeat):
    """The table of one workload and thread count: a row per operation with the median time of
    each implementation, fastemb's speedups and the fractions of the speed of light."""
    first = measurements[0]
    lines = [
        f"{first.workload.label} ({first.workload.describe()}), {first.threads} "
        f"thread{'s' if first.threads > 1 else ''}, median of {repeat} runs",
        "".join(f"{heading:>{width}}" if i else f"{heading:<{width}}"
                for i, (heading, width, _) in enumerate(TABLE_COLUMNS)),
    ]
    for measurement in measurements:
        lines.append("".join(f"{cell(measurement):>{width}}" if i
                             else f"{cell(measurement):<{width}}"
                             for i, (_, width, cell) in enumerate(TABLE_COLUMNS)))
    by_operation = {measurement.operation: measurement for measurement in measurements}
    for measurement in measurements:
        # a reduced-precision operation beside its float32 one: torch's bag sum, fastemb's step
        if measurement.operation in REDUCED_PRECISION_OPERATIONS:
            implementation, float32 = "torch", by_operation.get("bag_sum")
        elif measurement.operation in REDUCED_PRECISION_STEP_OPERATIONS:
            implementation, float32 = "fastemb", by_operation.get(
                float32_step(measurement.operation))
        else:
            continue
        float32_seconds = float32.seconds(implementation) if float32 is not None else None
        fastemb_seconds = measurement.seconds("fastemb")
        if float32_seconds is None or fastemb_seconds is None:
            continue
        line = (f"{measurement.operation}: {float32_seconds / fastemb_seconds:.2f}x "
                f"{implementation}'s float32 {float32.operation}")
        # the most the format can gain: the float32 operation's speed of light over its own
        float32_light, light = float32.seconds(SPEED_OF_LIGHT), measurement.seconds(SPEED_OF_LIGHT)
        if float32_light is not None and light is not None:
            line += f" (speed of light: {float32_light / light:.2f}x the float32 one's)"
        lines.append(line)
    return "\n".join(lines)


TABLE_LEGEND = (
    "vs torch / vs numpy: how many times faster fastemb is. light: plain C loops that move only "
    "the table bytes\nthe operation needs; fastemb/light, torch/light: the fraction of that "
    "speed of light reached. NumPy runs on 1 thread."
)


def machine_info():
    """Where the numbers come from: CPU, platform, date and versions."""
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch_version,
        "fastemb": __version__,
        "fastemb_kernels": _kernel_variant,
        "compile_flags": _core.compile_flags(),
    }


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo on Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def plot_speedups(measurements, path, machine):
    """Draw fastemb's speedup over torch as bars (one panel per workload, a bar per operation
    and thread count, log scale, bars from 1x up or down) into the PNG ``path``; returns the
    matplotlib Figure. Needs matplotlib."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    workloads = list(dict.fromkeys(m.workload for m in measurements))
    operations = list(dict.fromkeys(m.operation for m in measurements))
    thread_counts = sorted({m.threads for m in measurements})
    figure = Figure(figsize=(max(6.0, 1.2 * len(operations) + 2), 3.2 * len(workloads)),
                    layout="constrained")
    axes = figure.subplots(len(workloads), 1, squeeze=False)[:, 0]
    width = 0.8 / len(thread_counts)
    for ax, workload in zip(axes, workloads):
        for position, threads in enumerate(thread_counts):
            speedups = {m.operation: m.speedup("torch") for m in measurements
                        if m.workload == workload and m.threads == threads}
            xs = [i + (position - (len(thread_counts) - 1) / 2) * width
                  for i, operation in enumerate(operations) if speedups.get(operation)]
            heights = [speedups[operation] for operation in operations if speedups.get(operation)]
            # each bar starts at 1x: up for a speedup, hanging down for a slowdown
            bars = ax.bar(xs, [height - 1 for height in heights], width, bottom=1,
                          label=f"{threads} thread{'s' if threads > 1 else ''}")
            ax.bar_label(bars, labels=[f"{height:.1f}" for height in heights], fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(operations)), operations, rotation=20, fontsize=8)
        ax.set_ylabel("speedup over torch")
        ax.set_title(f"{workload.label}: {workload.describe()}", fontsize=9)
        ax.legend(fontsize=8)
    figure.suptitle(f"fastemb {machine['fastemb']} vs torch {machine['torch']}: "
                    f"{machine['cpu']}, {machine['cpu_count']} cores, {machine['date']}",
                    fontsize=9)
    figure.savefig(path, dpi=120)
    return figure


def report(workloads, operations, thread_counts, repeat, json_path=None, plot_path=None,
           progress=True):
    """Benchmark ``operations`` on ``workloads`` at each of ``thread_counts``, print a table per
    workload and thread count, and optionally write the numbers with the machine's
    description to ``json_path`` and a bar chart of the speedups over torch to ``plot_path``
    (which needs matplotlib). A progress bar (tqdm, on stderr) counts the operations measured
    unless ``progress`` is false. Returns the :class:`Measurement` list."""
    from tqdm import tqdm

    machine = machine_info()
    print(f"fastemb {machine['fastemb']} ({machine['fastemb_kernels']} kernels), torch "
          f"{machine['torch'] or 'not installed'}, numpy {machine['numpy']}; {machine['cpu']}, "
          f"{machine['cpu_count']} cores")
    if not torch_is_available():
        print("torch is not installed: no torch column (pip install torch==2.13.0)")
    if not speed_of_light_is_available():
        print("gcc is not installed: no speed-of-light column")
    print(TABLE_LEGEND)
    measurements = []
    bar = tqdm(total=len(workloads) * len(operations), unit=" ops", leave=False,
               disable=not progress)
    for workload in workloads:
        bar.set_description(f"{workload.label}: preparing the data")
        data = make_data(workload)
        by_threads = {threads: [] for threads in thread_counts}
        for operation in operations:
            bar.set_description(f"{workload.label}: {operation}")
            with thread_count(1):
                expected = benchmark_callable("fastemb", operation, data)()
            for measurement in measure(operation, data, thread_counts, repeat, expected):
                by_threads[measurement.threads].append(measurement)
            del expected
            bar.update()
        for threads in thread_counts:
            bar.write("\n" + format_table(by_threads[threads], repeat), file=sys.stdout)
            measurements += by_threads[threads]
    bar.close()
    if json_path is not None:
        settings = {"repeat": repeat, "thread_counts": list(thread_counts),
                    "operations": list(operations),
                    "workloads": [workload.label for workload in workloads]}
        document = {"machine": machine, "settings": settings,
                    "results": [measurement.as_dict() for measurement in measurements]}
        pathlib.Path(json_path).write_text(json.dumps(document, indent=1) + "\n")
        print(f"\nwrote {json_path}")
    if plot_path is not None:
        plot_speedups(measurements, plot_path, machine)
        print(f"wrote {plot_path}")
    return measurements
