"""``fastemb.distributed`` on a local Ray (``ray.init(num_cpus=2)``): shards as actors, with
the arrays Ray hands them read-only, equal the single-machine module bit for bit; Ray is never
started for the user. Skipped when Ray is not installed."""

import gc
import time

import numpy as np
import pytest
from reference import assert_same_bits
from sharded_steps import recovers_then_steps_alike, step, steps_alike

import fastemb
from fastemb import _core
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


@pytest.fixture(autouse=True)
def fresh_cpus(request):
    """Before each test on Ray: the earlier tests' tables dropped and their actors' CPUs free
    again (an actor ends when its last handle goes)."""
    if "local_ray" in request.fixturenames:
        wait_for_free_cpus(2)


@pytest.mark.parametrize("optimizer, strategy", [("lazyadam", "pull"),
                                                 ("rowwise-adagrad", "pull"),
                                                 ("lazyadam", "partial")])
def test_ray_shards_equal_the_single_machine_module(local_ray, optimizer, strategy, rng):
    """Bit for bit when the rows are pulled; to float rounding with partial sums."""
    weight = rng.standard_normal((V, D)).astype(np.float32)
    sharded = ShardedEmbeddingBag.from_pretrained(weight, num_shards=2, mode="mean",
                                                  engine=RayEngine(), optimizer=optimizer,
                                                  strategy=strategy, lr=0.05)
    check = assert_same_bits if strategy == "pull" else (
        lambda ours, theirs: np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6))
    single = fastemb.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode="mean")
    single_optimizer = fastemb.optim.OPTIMIZERS[optimizer].cls(single, lr=0.05)
    for _ in range(3):
        indices = rng.integers(0, V, size=(8, 3))
        grad_output = rng.standard_normal((8, D)).astype(np.float32)
        check(sharded(indices), single(indices))
        sharded.backward(grad_output)
        single.backward(grad_output)
        single_optimizer.step()
        single.zero_grad()
    check(sharded.weight, single.weight)


@pytest.mark.skipif(not _core.has_openmp(), reason="a serial build always runs one thread")
def test_each_shard_runs_on_the_cpus_it_reserved(local_ray):
    table = ShardedEmbeddingBag(V, D, num_shards=1, engine=RayEngine(num_cpus_per_shard=2))
    try:
        threads = ray.get(table.engine.actors[0].__ray_call__.remote(
            lambda actor: fastemb.get_num_threads()))
    finally:  # (its CPUs free for the next tests, whatever happens here)
        ray.kill(table.engine.actors[0])
    assert threads == 2


def kill_shard(table, shard):
    """Kill a shard's actor and wait until Ray knows it is dead."""
    actor = table.engine.actors[shard]
    ray.kill(actor, no_restart=True)
    for attempt in range(100):
        try:
            ray.get(actor.__ray_call__.remote(lambda self: None), timeout=1)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
    raise AssertionError("the killed actor still answers")


def test_a_killed_shard_is_restored_from_the_last_checkpoint_and_training_goes_on(
        local_ray, tmp_path, rng):
    weight = rng.standard_normal((V, D)).astype(np.float32)
    table = ShardedEmbeddingBag.from_pretrained(weight, num_shards=2, mode="sum",
                                                engine=RayEngine(), optimizer="lazyadam",
                                                strategy="pull")
    twin = ShardedEmbeddingBag.from_pretrained(weight, num_shards=2, mode="sum",
                                               optimizer="lazyadam", strategy="pull")
    batches = [(rng.integers(0, V, size=(5, 2)), rng.standard_normal((5, D)).astype(np.float32))
               for _ in range(6)]
    steps_alike(table, twin, batches[:2])
    path = tmp_path / "last.npz"
    table.save(path)
    twin.save(tmp_path / "twin.npz")
    for batch in batches[2:4]:  # (lost with the shard)
        step(table, batch)
    kill_shard(table, 1)
    recovers_then_steps_alike(table, twin, batches[4:], r"shard\(s\) \[1\] .* restored from "
                              r".*saved after step 2\): the 2 step\(s\) since are lost")


def test_a_killed_shard_restores_every_table_of_a_collection(local_ray, tmp_path, rng):
    """Two tables of two actors each (half a CPU each): one actor of the second table killed;
    the next step warns and puts both tables back at the checkpoint, and training goes on
    exactly as an in-process twin's from that checkpoint."""
    configs = [fastemb.EmbeddingConfig("words", V, D, feature_names=["title", "body"]),
               fastemb.EmbeddingConfig("tags", 12, 2)]
    collection = fastemb.distributed.ShardedEmbeddingCollection(
        configs, num_shards=2, make_engine=lambda: RayEngine(num_cpus_per_shard=0.5), seed=0)
    twin = fastemb.distributed.ShardedEmbeddingCollection(configs, num_shards=2, seed=0)
    batches = []
    for _ in range(5):
        lengths = rng.integers(0, 3, size=3 * 4)
        features = fastemb.KeyedJaggedArray(["title", "body", "tags"],
                                            rng.integers(0, 12, size=int(lengths.sum())),
                                            lengths=lengths)
        batches.append((features, {name: rng.standard_normal((count, dim)).astype(np.float32)
                                   for name, count, dim in zip(
                                       ["title", "body", "tags"],
                                       lengths.reshape(3, 4).sum(axis=1), [D, D, 2])}))

    steps_alike(collection, twin, batches[:1])
    fastemb.distributed.save(tmp_path / "model.npz", collection)
    step(collection, batches[1])  # (lost with the shard)
    kill_shard(collection.tables["tags"], 0)  # (the words table is looked up before it)
    with pytest.warns(RuntimeWarning, match=r"with the 1 other table\(s\) saved with it .*the 1 "
                                            r"step\(s\) since are lost"):
        rows = step(collection, batches[2])
    for k in range(2, len(batches)):  # (every lookup reads the restored rows, the first too)
        if k > 2:
            rows = step(collection, batches[k])
        expected = step(twin, batches[k])
        for name in expected:
            assert_same_bits(rows[name].values, expected[name].values)
    for name in collection.tables:
        assert_same_bits(collection.tables[name].weight, twin.tables[name].weight)


def test_a_killed_shard_without_a_checkpoint_is_a_clear_error(local_ray):
    table = ShardedEmbeddingBag(V, D, num_shards=2, engine=RayEngine())
    table(np.array([[1, 2]]))
    kill_shard(table, 0)
    with pytest.raises(RuntimeError, match=r"shard\(s\) \[0\] .* died.* no checkpoint"):
        table(np.array([[1, 2]]))


def wait_for_free_cpus(count, seconds=30):
    """Drop the earlier tests' tables (their actors end with them) and wait until Ray has
    ``count`` CPUs free again."""
    gc.collect()
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < count:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.1)


def test_train_with_ray_shards_equals_the_local_run(local_ray, capsys):
    from fastemb.__main__ import main
    base = ["train", "--users", "300", "--items", "200", "--ratings", "8000", "--dim", "8",
            "--epochs", "1", "--quiet", "--shards", "2"]
    outputs = []
    for engine in ("ray", "local"):
        assert main(base + ["--engine", engine]) == 0
        outputs.append(capsys.readouterr().out)
    assert "every table on 2 ray shards" in outputs[0]
    rmse_lines = [[line.split("),")[0] for line in out.splitlines()
                   if line.startswith("epoch")] for out in outputs]
    assert rmse_lines[0] == rmse_lines[1] and rmse_lines[0]


def test_shards_that_cannot_all_be_placed_are_refused_not_left_waiting(local_ray):
    with pytest.raises(ValueError, match=r"2 shards of 1.5 CPU\(s\) need 3 CPUs, but the Ray "
                                         r"cluster has 2"):
        ShardedEmbeddingBag(V, D, num_shards=2, engine=RayEngine(num_cpus_per_shard=1.5))
    table = ShardedEmbeddingBag(V, D, num_shards=4, engine=RayEngine(num_cpus_per_shard=0.5))
    assert table(np.array([[1, 2]])).shape == (1, D)
