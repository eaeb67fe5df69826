"""Shared fixtures: hypothesis profiles, the table ``dtype`` (float32 and float64) and a seeded
``rng`` for every test, thread-count control, and an "arrays untouched" check.

Hypothesis profiles: "fastemb" (default; keeps the whole suite well under a minute on 2 cores),
"thorough" (10x the examples). Choose one with ``HYPOTHESIS_PROFILE=thorough``.
"""

import contextlib
import os
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import fastemb
from fastemb._kernels import kernels

settings.register_profile(
    "fastemb",
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("thorough", parent=settings.get_profile("fastemb"), max_examples=1200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastemb"))


@pytest.fixture(autouse=True)
def _default_thread_count():
    """Every test starts and ends with fastemb's default thread count."""
    fastemb.set_num_threads(None)
    yield
    fastemb.set_num_threads(None)


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    """Each table dtype the kernels take: a test that asks for ``dtype`` runs once per dtype."""
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.fixture
def every_call_threaded():
    """Every kernel call runs threaded, however little work it has, during the test."""
    previous = kernels.set_parallel_grain(0)
    yield
    kernels.set_parallel_grain(previous)


@pytest.fixture
def thread_count(every_call_threaded):
    """``fastemb.set_num_threads``, with every kernel call really using that many threads
    (the autouse fixture restores the default afterwards)."""
    return fastemb.set_num_threads


@pytest.fixture
def threads(every_call_threaded):
    """``with threads(n): ...`` runs the block with ``fastemb.set_num_threads(n)``, and with
    every kernel call really using n threads however little work it has."""

    @contextlib.contextmanager
    def use(n):
        fastemb.set_num_threads(n)
        try:
            yield
        finally:
            fastemb.set_num_threads(None)

    return use


@pytest.fixture
def untouched():
    """``with untouched(a, b, ...): ...`` asserts the block leaves every array bit-identical.

    Use it around a call that must raise (wrap it in ``pytest.raises`` inside the block) to
    check that nothing was modified before the error.
    """

    @contextlib.contextmanager
    def check(*arrays):
        before = [np.array(a, copy=True) for a in arrays]
        yield
        for number, (array, saved) in enumerate(zip(arrays, before)):
            array = np.asarray(array)
            assert array.dtype == saved.dtype and array.shape == saved.shape
            assert array.tobytes() == saved.tobytes(), f"argument {number} was modified"

    return check


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder for memory-mapped arrays and checkpoint files (module-scoped: hypothesis)."""
    folder = tmp_path_factory.mktemp("hostile")
    counter = iter(range(10**9))
    return lambda suffix=".bin": folder / f"{next(counter)}{suffix}"


