"""The cost of sharding on one machine: a LazyAdam training step (mean bags forward, backward,
update) of the reference workload (``large-uniform``: a 1,000,000 x 64 float32 table, 4,096
bags of 32 indices) with one ``fastemb.EmbeddingBag`` in this process, and with a
``fastemb.distributed.ShardedEmbeddingBag`` of 1 and 2 in-process shards and of 2 Ray actors
(one CPU each; skipped without Ray), side by side in one pytest-benchmark group; the sharded
tables choose their way by themselves (here: partial sums, 2 x 4,096 bags against about 123,000
distinct rows). Every implementation's table after one step is checked against the single
module's first; the sharded ones' ``extra_info`` has the array bytes a step passed to and from
the shards (``bytes_sent``, ``bytes_received``: the README's network model, as counted)."""

import numpy as np
import pytest

import fastemb
from fastemb.bench import workloads
from fastemb.distributed import RayEngine, ShardedEmbeddingBag

WORKLOAD = next(w for w in workloads.WORKLOADS if w.label == "large-uniform")
HYPERPARAMETERS = workloads.STEP_HYPERPARAMETERS["lazyadam"]
IMPLEMENTATIONS = ("one-process", "local-1-shard", "local-2-shards", "ray-2-shards")


@pytest.fixture(scope="module")
def data():
    return workloads.make_data(WORKLOAD)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of 2 CPUs (None without Ray)."""
    try:
        import ray
    except ModuleNotFoundError:
        yield None
        return
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def make_step(implementation, data, ray_cluster):
    """A zero-argument step of ``implementation``, a way to read its table, and its engine
    (None for the single module)."""
    if implementation == "one-process":
        module = fastemb.EmbeddingBag.from_pretrained(workloads.aligned_copy(data.table),
                                                      freeze=False, mode="mean")
        optimizer = fastemb.optim.LazyAdam(module, **HYPERPARAMETERS)

        def step():
            module(data.indices, data.offsets)
            module.backward(data.grad_output)
            optimizer.step()
            module.zero_grad()

        return step, lambda: module.weight, None
    if implementation == "ray-2-shards" and ray_cluster is None:
        pytest.skip("Ray is not installed")
    num_shards = 1 if implementation == "local-1-shard" else 2
    engine = RayEngine() if implementation.startswith("ray") else None
    table = ShardedEmbeddingBag.from_pretrained(data.table, num_shards, mode="mean",
                                                engine=engine, optimizer="lazyadam",
                                                **HYPERPARAMETERS)

    def step():
        table(data.indices, data.offsets)
        table.backward(data.grad_output)

    return step, lambda: table.weight, table.engine


@pytest.fixture(scope="module")
def expected_table(data):
    """The single module's table after one step."""
    step, weight, _ = make_step("one-process", data, None)
    step()
    return weight().copy()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sharded_step(benchmark, data, ray_cluster, expected_table, implementation):
    step, weight, engine = make_step(implementation, data, ray_cluster)
    step()
    if engine is not None:  # (the first step's: the engine has counted nothing else)
        benchmark.extra_info.update(bytes_sent=engine.bytes_sent,
                                    bytes_received=engine.bytes_received)
    if implementation in ("one-process", "local-1-shard"):
        np.testing.assert_array_equal(weight(), expected_table)  # (bit for bit)
    else:  # (two shards' partial sums add a bag in another order)
        np.testing.assert_allclose(weight(), expected_table, rtol=1e-6, atol=1e-7)
    benchmark.group = "sharded_step-large-uniform"
    benchmark.extra_info.update(implementation=implementation)
    benchmark(step)
