"""``fastemb.distributed`` on a two-node Ray cluster simulated on this machine
(``ray.cluster_utils.Cluster``, one CPU a node): the two shards run on different nodes and the
table still equals the single-machine module bit for bit, refuses bad input before either shard
changes, and recovers from the loss of a node through its checkpoint. Skipped when Ray is not
installed."""

import numpy as np
import pytest
from reference import assert_same_bits
from sharded_steps import recovers_then_steps_alike, steps_alike

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
    for _ in range(3):
        indices = rng.integers(0, 50, size=(7, 4))
        grad_output = rng.standard_normal((7, 8)).astype(np.float32)
        assert_same_bits(table(indices), single(indices))
        table.backward(grad_output)
        single.backward(grad_output)
        optimizer.step()
        single.zero_grad()
    assert_same_bits(table.weight, single.weight)


def test_on_two_nodes_bad_input_changes_nothing_and_a_lost_node_is_recovered(two_nodes, tmp_path,
                                                                              rng):
    """Bad input is refused before either node's shard changes; the second node dies (its
    shard with it) and a new node joins: the next step restarts the shard there, restores both
    shards from the checkpoint, and training goes on as an in-process twin's."""
    weight = rng.standard_normal((50, 8)).astype(np.float32)
    table, twin = (ShardedEmbeddingBag.from_pretrained(weight, num_shards=2, mode="sum",
                                                       engine=engine, strategy="pull")
                   for engine in (RayEngine(), None))
    batches = [(rng.integers(0, 50, size=(6, 3)), rng.standard_normal((6, 8)).astype(np.float32))
               for _ in range(4)]
    steps_alike(table, twin, batches[:1])
    table.save(tmp_path / "two-nodes.npz")
    before = table.weight
    with pytest.raises(IndexError, match="out of range"):
        table(np.array([[3, 50]]))
    table(batches[1][0])
    with pytest.raises(ValueError, match="grad_output"):
        table.backward(np.ones((5, 8), np.float32))
    assert_same_bits(table.weight, before)
    table.backward(batches[1][1])  # (a step the checkpoint does not hold)
    second_node = next(node for node in two_nodes.list_all_nodes() if not node.head)
    two_nodes.remove_node(second_node)
    two_nodes.add_node(num_cpus=1)
    two_nodes.wait_for_nodes()
    recovers_then_steps_alike(table, twin, batches[2:], r"restored from .*saved after step 1\): "
                              r"the 1 step\(s\) since are lost")
