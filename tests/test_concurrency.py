"""Concurrency: the kernels release the GIL, and fastemb is safe to call from several Python
threads at once.

- While a long kernel runs in one thread, another Python thread keeps running (the GIL is
  released); a control case shows the measurement notices a call that holds the GIL.
- Forwards on one module from 4 threads, many calls each, equal the serial results bit for bit.
- Backwards on separate modules that share one weight array, from 4 threads, give exactly the
  serial gradients; so do optimizer steps on separate tables in separate threads.

Kernels run with every call parallel (the ``threads`` fixture lowers the grain to 0), so several
OpenMP teams run at once, one per Python thread.
"""

import ctypes
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from reference import assert_same_bits

import fastemb

PYTHON_THREADS = 4


# --------------------------------------------------------------------------------------------
# The GIL
# --------------------------------------------------------------------------------------------


def progress_during(call):
    """Run ``call`` in a second thread while this thread counts loop iterations.

    Returns (seconds the call took, iterations counted while it ran, longest pause between two
    iterations). A call that holds the GIL freezes this loop for about its whole duration.
    """
    go, finished = threading.Event(), threading.Event()
    timing = {}

    def worker():
        go.wait()
        begin = time.perf_counter()
        call()
        timing["seconds"] = time.perf_counter() - begin
        finished.set()

    thread = threading.Thread(target=worker)
    thread.start()
    count, longest = 0, 0.0
    last = time.perf_counter()
    go.set()  # the worker starts the call while this thread is already counting
    while not finished.is_set():
        count += 1
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
    thread.join()
    return timing["seconds"], count, longest


@pytest.fixture(scope="module")
def long_bag_call():
    """An embedding_bag call that takes about 0.3 s on one thread here (calibrated, so a slow
    debug build runs a smaller one)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((1000, 4096)).astype(np.float32)  # 16 MB
    fastemb.set_num_threads(1)
    try:
        probe = rng.integers(0, 1000, 20_000).astype(np.int32)
        fastemb.embedding_bag(probe, table, np.arange(0, probe.size, 1000), mode="sum")
        begin = time.perf_counter()
        fastemb.embedding_bag(probe, table, np.arange(0, probe.size, 1000), mode="sum")
        per_lookup = (time.perf_counter() - begin) / probe.size
    finally:
        fastemb.set_num_threads(None)
    size = int(min(max(0.3 / per_lookup, 20_000), 2_000_000)) // 1000 * 1000
    indices = rng.integers(0, 1000, size).astype(np.int32)
    offsets = np.arange(0, size, 1000)
    return lambda: fastemb.embedding_bag(indices, table, offsets, mode="sum")


def keeps_running(call, attempts=3):
    """True if this thread kept running during ``call`` (no pause of half the call or more),
    in one of ``attempts`` tries (a busy machine may stall a thread once; a call that holds
    the GIL stalls it every time). Returns (verdict, measurements of the last try)."""
    for _ in range(attempts):
        seconds, count, longest = progress_during(call)
        assert seconds > 0.05, "the call was too short to tell anything"
        if longest < 0.5 * seconds and count > 1000:
            return True, (seconds, count, longest)
    return False, (seconds, count, longest)


def test_a_long_kernel_lets_other_python_threads_run(long_bag_call):
    """The bag kernel runs with the GIL released: this thread keeps counting all along."""
    fastemb.set_num_threads(1)  # one core for the kernel, one for the counting thread
    verdict, (seconds, count, longest) = keeps_running(long_bag_call)
    assert verdict, (
        f"the counting thread stood still for {longest:.3f} s of a {seconds:.3f} s kernel "
        f"({count} iterations): the kernel holds the GIL")


def test_the_measurement_notices_a_call_that_holds_the_gil():
    """Control: ``usleep`` called through ctypes.PyDLL keeps the GIL, and the counting thread
    stands still for the whole call (so the test above can fail)."""
    libc = ctypes.PyDLL(None)
    verdict, measurements = keeps_running(lambda: libc.usleep(300_000))
    assert not verdict, measurements


def test_backward_and_optimizer_kernels_release_the_gil():
    """The gather, the radix sort, the gradient accumulation and the fused optimizer step also
    let another thread run."""
    rng = np.random.default_rng(1)
    fastemb.set_num_threads(1)
    module = fastemb.Embedding(200_000, 16, seed=0)
    optimizer = fastemb.optim.LazyAdam(module)
    indices = rng.integers(0, 200_000, 500_000)
    grad = rng.standard_normal((indices.size, 16)).astype(np.float32)

    def backward_and_step():
        out = module(indices)
        module.backward(grad)
        optimizer.step()
        optimizer.zero_grad()
        assert out.shape == (indices.size, 16)

    # (the Python parts, checks and a copy of grad_output, hold the GIL a little while)
    verdict, measurements = keeps_running(backward_and_step)
    assert verdict, measurements


# --------------------------------------------------------------------------------------------
# Many threads, one module
# --------------------------------------------------------------------------------------------


def run_in_threads(jobs, threads=PYTHON_THREADS):
    """Run the callables in ``jobs`` on a pool of threads; returns their results in order."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda job: job(), jobs))


@pytest.fixture(scope="module")
def batches():
    """60 lookup batches (bags of 0 to 9 entries, padding, per-sample weights)."""
    rng = np.random.default_rng(2)
    result = []
    for _ in range(60):
        lengths = rng.integers(0, 10, size=int(rng.integers(1, 300)))
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        indices = rng.integers(0, 3000, int(lengths.sum()))
        weights = rng.standard_normal(indices.size).astype(np.float32)
        result.append((indices, offsets, weights))
    return result


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_concurrent_forwards_on_one_module_equal_serial_ones(batches, threads, mode):
    module = fastemb.EmbeddingBag(3000, 40, mode=mode, padding_idx=7, seed=0)
    table = module.weight.copy()
    with threads(2):

        def forward(batch):
            indices, offsets, weights = batch
            return module(indices, offsets, None if mode == "max" else weights)

        serial = [forward(batch) for batch in batches]
        order = np.random.default_rng(3).permutation(len(batches) * PYTHON_THREADS)
        jobs = [lambda i=i: forward(batches[i % len(batches)]) for i in order]
        parallel = run_in_threads(jobs)
    for i, result in zip(order, parallel):
        assert_same_bits(result, serial[i % len(batches)], nan_payload=True)
    assert_same_bits(module.weight, table, nan_payload=True)


def test_concurrent_lookups_and_functional_calls_equal_serial_ones(batches, threads):
    """Embedding forwards and functional embedding_bag calls on one shared table, mixed."""
    module = fastemb.Embedding(3000, 24, seed=1)
    with threads(2):
        calls = []
        for indices, offsets, weights in batches:
            calls.append(lambda i=indices: module(i.reshape(-1, 1)))
            calls.append(lambda i=indices, o=offsets, w=weights: fastemb.embedding_bag(
                i, module.weight, o, mode="mean", per_sample_weights=w))
        serial = [call() for call in calls]
        parallel = run_in_threads([call for _ in range(PYTHON_THREADS) for call in calls])
    for number, result in enumerate(parallel):
        assert_same_bits(result, serial[number % len(calls)], nan_payload=True)


# --------------------------------------------------------------------------------------------
# Many threads, separate modules over one shared weight array
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["embedding", "bag sum", "bag mean weighted", "bag max"])
def test_concurrent_backwards_on_modules_sharing_a_weight(batches, threads, kind):
    batches = batches[:12]
    """4 modules from_pretrained over one weight array, each trained in its own thread on its
    own batches (forward, backward, repeatedly): every gradient equals the serial one."""
    shared = np.random.default_rng(4).standard_normal((3000, 16)).astype(np.float32)

    def make():
        if kind == "embedding":
            return fastemb.Embedding.from_pretrained(shared, freeze=False, padding_idx=7)
        mode = kind.split()[1]
        return fastemb.EmbeddingBag.from_pretrained(shared, freeze=False, mode=mode,
                                                    padding_idx=7)

    def work(module, batch):
        indices, offsets, weights = batch
        if kind == "embedding":
            out = module(indices)
        else:
            out = module(indices, offsets, weights if kind.endswith("weighted") else None)
        grad_output = np.cos(out + 1).astype(out.dtype)
        grad = module.backward(grad_output)
        extra = getattr(module, "per_sample_weights_grad", None)
        return grad.rows, grad.values, extra

    with threads(2):
        reference_module = make()
        serial = [work(reference_module, batch) for batch in batches]
        modules = [make() for _ in range(PYTHON_THREADS)]
        assert all(m.weight is shared for m in modules)

        def thread_job(number):
            module = modules[number]
            mine = range(number, len(batches), PYTHON_THREADS)
            results = {}
            for _ in range(2):
                for i in mine:
                    results[i] = work(module, batches[i])
            return results

        merged = {}
        for results in run_in_threads([lambda n=n: thread_job(n)
                                       for n in range(PYTHON_THREADS)]):
            merged.update(results)
    assert sorted(merged) == list(range(len(batches)))
    for i, (rows, values, extra) in merged.items():
        np.testing.assert_array_equal(rows, serial[i][0])
        assert_same_bits(values, serial[i][1])
        if extra is not None:
            assert_same_bits(extra, serial[i][2])


@pytest.mark.parametrize("optimizer", ["SGD", "LazyAdam", "Adagrad", "RowWiseAdagrad"])
def test_concurrent_optimizer_steps_on_separate_tables(batches, threads, optimizer):
    """Each thread trains its own table (forward, backward, step): the tables end exactly where
    serial training puts them."""
    make_optimizer = {
        "SGD": lambda m: fastemb.optim.SGD(m, lr=0.1),
        "LazyAdam": lambda m: fastemb.optim.LazyAdam(m, lr=0.01),
        "Adagrad": lambda m: fastemb.optim.Adagrad(m, lr=0.1),
        "RowWiseAdagrad": lambda m: fastemb.optim.RowWiseAdagrad(m, lr=0.1),
    }[optimizer]

    def train(seed):
        module = fastemb.EmbeddingBag(3000, 16, mode="sum", seed=seed)
        opt = make_optimizer(module)
        for indices, offsets, weights in batches[seed::PYTHON_THREADS]:
            out = module(indices, offsets, weights)
            module.backward(np.sin(out))
            opt.step()
            opt.zero_grad()
        return module.weight, opt.state[module]

    with threads(2):
        serial = [train(seed) for seed in range(PYTHON_THREADS)]
        parallel = run_in_threads([lambda s=s: train(s) for s in range(PYTHON_THREADS)])
    for (weight, state), (expected_weight, expected_state) in zip(parallel, serial):
        assert_same_bits(weight, expected_weight)
        for key, value in expected_state.items():
            if isinstance(value, np.ndarray):
                assert_same_bits(state[key], value)
            else:
                assert state[key] == value
