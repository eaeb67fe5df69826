"""``fastemb.distributed`` on a two-node Ray cluster simulated on this machine
(``ray.cluster_utils.Cluster``, one CPU a node): the two shards run on different nodes and the
table still equals the single-machine module bit for bit. Skipped when Ray is not installed."""

import numpy as np
import pytest
from reference import assert_same_bits

import fastemb
from fastemb.distributed import RayEngine, ShardedEmbeddingBag

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402  (after the skip)


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a second node, one CPU each, and Ray connected to them."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_shards_on_two_nodes_equal_the_single_machine_module(two_nodes, rng):
    weight = rng.standard_normal((50, 8)).astype(np.float32)
    table = ShardedEmbeddingBag.from_pretrained(weight, num_shards=2, mode="max",
                                                engine=RayEngine(), optimizer="adagrad",
                                                strategy="pull")
    nodes = {ray.get(actor.__ray_call__.remote(
        lambda self: ray.get_runtime_context().get_node_id())) for actor in table.engine.actors}
    assert len(nodes) == 2  # (one CPU a node: the shards cannot share one)
    single = fastemb.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode="max")
    optimizer = fastemb.optim.Adagrad(single)
    for step in range(3):
        indices = rng.integers(0, 50, size=(7, 4))
        grad_output = rng.standard_normal((7, 8)).astype(np.float32)
        assert_same_bits(table(indices), single(indices))
        table.backward(grad_output)
        single.backward(grad_output)
        optimizer.step()
        single.zero_grad()
    assert_same_bits(table.weight, single.weight)
