"""``fastemb.distributed`` on a local Ray (``ray.init(num_cpus=2)``): shards as actors, with
the arrays Ray hands them read-only, equal the single-machine module bit for bit; Ray is never
started for the user. Skipped when Ray is not installed."""

import numpy as np
import pytest
from reference import assert_same_bits

import fastemb
from fastemb.distributed import RayEngine, ShardedEmbeddingBag

ray = pytest.importorskip("ray")

V, D = 40, 6


def test_the_engine_refuses_to_start_ray_itself():
    if ray.is_initialized():
        pytest.skip("Ray was started before this test")
    with pytest.raises(RuntimeError, match="ray.init"):
        RayEngine()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs, for this module's tests."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("optimizer", ["lazyadam", "rowwise-adagrad"])
def test_ray_shards_equal_the_single_machine_module(local_ray, optimizer, rng):
    weight = rng.standard_normal((V, D)).astype(np.float32)
    sharded = ShardedEmbeddingBag.from_pretrained(weight, num_shards=2, mode="mean",
                                                  engine=RayEngine(), optimizer=optimizer,
                                                  lr=0.05)
    single = fastemb.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode="mean")
    single_optimizer = fastemb.optim.OPTIMIZERS[optimizer].cls(single, lr=0.05)
    for step in range(3):
        indices = rng.integers(0, V, size=(8, 3))
        grad_output = rng.standard_normal((8, D)).astype(np.float32)
        assert_same_bits(sharded(indices), single(indices))
        sharded.backward(grad_output)
        single.backward(grad_output)
        single_optimizer.step()
        single.zero_grad()
    assert_same_bits(sharded.weight, single.weight)


def test_each_shard_runs_on_the_cpus_it_reserved(local_ray):
    table = ShardedEmbeddingBag(V, D, num_shards=1, engine=RayEngine(num_cpus_per_shard=2))
    threads = ray.get(table.engine.actors[0].__ray_call__.remote(
        lambda actor: fastemb.get_num_threads()))
    assert threads == 2
