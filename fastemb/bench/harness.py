"""Timing: implementations take turns call by call, after warm-up and settling calls, and each
operation, workload and thread count gives a :class:`Measurement`."""

import statistics
import time
from dataclasses import asdict, dataclass, field

from .implementations import (assert_agrees, available_implementations, benchmark_callable,
                              speed_of_light_is_available, thread_count)
from .workloads import IMPLEMENTATIONS, SPEED_OF_LIGHT, Workload

@dataclass
class Measurement:
    """The times of every implementation on one operation, workload and thread count."""

    operation: str
    workload: Workload
    threads: int
    runs: dict = field(default_factory=dict)  # implementation -> seconds of each timed call

    def seconds(self, implementation):
        """The median time of ``implementation``, or None if it did not run."""
        runs = self.runs.get(implementation)
        return statistics.median(runs) if runs else None

    def ratio(self, numerator, denominator):
        """``seconds(numerator) / seconds(denominator)``, or None if either did not run."""
        top, bottom = self.seconds(numerator), self.seconds(denominator)
        return None if top is None or bottom is None else top / bottom

    def speedup(self, baseline):
        """How many times faster fastemb is than ``baseline``."""
        return self.ratio(baseline, "fastemb")

    def fraction_of_speed_of_light(self, implementation):
        """The speed-of-light time over ``implementation``'s (1.0: as fast as memory allows)."""
        return self.ratio(SPEED_OF_LIGHT, implementation)

    def as_dict(self):
        """The measurement as JSON-ready data."""
        implementations = [name for name in (*IMPLEMENTATIONS, SPEED_OF_LIGHT)
                           if name in self.runs]
        return {
            "operation": self.operation,
            "workload": self.workload.label,
            **asdict(self.workload),
            "threads": self.threads,
            "median_seconds": {name: self.seconds(name) for name in implementations},
            "runs_seconds": {name: self.runs[name] for name in implementations},
            "speedup_over_torch": self.speedup("torch"),
            "speedup_over_numpy": self.speedup("numpy"),
            "fraction_of_speed_of_light": {name: self.fraction_of_speed_of_light(name)
                                           for name in IMPLEMENTATIONS if name in self.runs},
        }


WARMUP_SECONDS = 0.1
SETTLE_SECONDS = 0.02


def call_for(function, seconds):
    """Call ``function`` once, then again until ``seconds`` have passed since the first call."""
    end = time.perf_counter() + seconds
    function()
    while time.perf_counter() < end:
        function()


def time_calls(functions, repeat):
    """The seconds of each of ``repeat`` calls of each function in ``functions`` (a dict), after
    untimed warm-up calls (at least one each, for at least :data:`WARMUP_SECONDS`: the first
    calls that allocate large outputs can be ten times slower while the allocator and page
    tables settle). The functions take turns, a round at a time, so that a slow spell of a
    shared machine slows them all alike and their ratios stay fair. In its turn a function is
    first called untimed, for at least :data:`SETTLE_SECONDS`, so that the timed call runs as in
    a loop of back-to-back calls: with its data in the caches, and past the wake of the function
    before it. (A large NumPy reference slows the next 5 or so millisecond-long calls of any
    implementation, by up to 2x on the first: with a single untimed call, whichever
    implementation came first in a round looked 10-25% slower on the Zipf bag sum.)"""
    for function in functions.values():
        call_for(function, WARMUP_SECONDS)
    times = {name: [] for name in functions}
    for _ in range(repeat):
        for name, function in functions.items():
            call_for(function, SETTLE_SECONDS)
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def measure(operation, data, thread_counts, repeat, expected):
    """Check and time every available implementation, and the speed-of-light reference, on
    ``operation`` and ``data`` at each thread count; one :class:`Measurement` per count.

    Each implementation's first call is checked against ``expected`` (fastemb's result); then
    all of them are timed in turns (see :func:`time_calls`), so a training step has one copy of
    the table and its optimizer state per implementation alive at once (about 3 GB for the
    large workload with LazyAdam).
    """
    implementations = available_implementations()
    if speed_of_light_is_available():
        implementations += (SPEED_OF_LIGHT,)
    measurements = []
    for threads in thread_counts:
        measurement = Measurement(operation, data.workload, threads)
        with thread_count(threads):
            functions = {}
            for implementation in implementations:
                functions[implementation] = benchmark_callable(implementation, operation, data)
                result = functions[implementation]()
                if implementation != SPEED_OF_LIGHT:
                    assert_agrees(operation, result, expected)
                del result
            measurement.runs.update(time_calls(functions, repeat))
        del functions
        measurements.append(measurement)
    return measurements
