"""Where a sharded table's shards live: ``LocalEngine`` keeps them in this process (for tests,
and for one machine without Ray); ``RayEngine`` makes each shard a Ray actor. An engine starts
one ``TableShard`` per shard and calls the same method on every shard, each with its own
arguments, returning their results in shard order."""

from __future__ import annotations

import numpy as np

from .._config import set_num_threads
from .._validation import as_real
from .shard import TableShard


class ShardLost(RuntimeError):
    """A shard's process died (its rows and optimizer state with it); ``shards`` are their
    numbers. A sharded table with a checkpoint recovers from it by itself."""

    def __init__(self, shards):
        self.shards = shards
        super().__init__(f"shard(s) {shards} of the table died")


def array_bytes(value):
    """The bytes of the NumPy arrays in ``value`` (an array, or tuples, lists and dicts of
    them; anything else counts 0): what passing it to or from a shard on another machine moves,
    give or take a few bytes of framing per array.

    >>> array_bytes((np.zeros(3, np.int64), [np.ones((2, 2), np.float32)], None, "sgd"))
    40
    """
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(array_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(array_bytes(item) for item in value.values())
    return 0


class _Traffic:
    """Counts the array bytes an engine's calls pass to the shards (``bytes_sent``) and get
    back (``bytes_received``): the network traffic of the shards on other machines."""

    bytes_sent = 0
    bytes_received = 0

    def _count(self, per_shard_arguments, results):
        self.bytes_sent += array_bytes(per_shard_arguments)
        self.bytes_received += array_bytes(results)
        return results


class LocalEngine(_Traffic):
    """Every shard in this process, called one after the other; it counts the array bytes a
    call would move to and from shards elsewhere (``bytes_sent``, ``bytes_received``).

    >>> import numpy as np
    >>> engine = LocalEngine()
    >>> engine.start([(np.zeros((2, 3), np.float32), "sgd", {"lr": 0.1})] * 2)
    >>> engine.call("rows", [(np.array([1]),), (np.array([0, 1]),)])[1].shape
    (2, 3)
    """

    def __init__(self):
        self.shards = None

    def start(self, shard_arguments):
        """Start one shard per entry of ``shard_arguments`` (``TableShard``'s arguments)."""
        if self.shards is not None:
            raise RuntimeError("this engine already holds a table's shards; use one engine "
                               "per table")
        self.shards = [TableShard(*arguments) for arguments in shard_arguments]

    def call(self, method, per_shard_arguments):
        """``shard.method(*arguments)`` on every shard, with its own arguments; the results in
        shard order."""
        if self.shards is None:
            raise RuntimeError("the engine has no shards yet: start it first")
        return self._count(per_shard_arguments, [
            getattr(shard, method)(*arguments)
            for shard, arguments in zip(self.shards, per_shard_arguments, strict=True)])

    def restart(self, shards, layouts):
        """Nothing to do: shards in this process cannot die apart from it."""


def import_ray():
    """The ``ray`` module; ImportError saying how to get it when it is not installed."""
    try:
        import ray
    except ModuleNotFoundError as error:
        if error.name != "ray":
            raise
        raise ImportError("RayEngine needs Ray: pip install 'fastemb[ray]'") from error
    return ray


class ShardActor:
    """A ``TableShard`` in a Ray worker, on ``threads`` OpenMP threads (Ray sets a worker's
    OpenMP threads to 1 unless its actor reserved CPUs: the engine passes what it reserved)."""

    def __init__(self, threads, weight, optimizer, hyperparameters):
        set_num_threads(threads)
        if isinstance(weight, tuple):  # (shape, dtype): a restarted shard, loaded next
            weight = np.zeros(*weight)
        self.shard = TableShard(weight, optimizer, hyperparameters)

    def call(self, method, *arguments):
        """``shard.method(*arguments)``."""
        return getattr(self.shard, method)(*arguments)


class RayEngine(_Traffic):
    """Each shard a Ray actor reserving ``num_cpus_per_shard`` CPUs (a fraction lets several
    shards share one) and running fastemb's kernels on as many threads (at least one); calls
    go to every shard at once, and count the array bytes they move (``bytes_sent``,
    ``bytes_received``). Ray must be initialised first (``ray.init(...)``: fastemb never
    calls it for you). A call is never retried, so no update is applied twice.

    >>> import ray, numpy as np                                     # doctest: +SKIP
    >>> ray.init(num_cpus=2)                                        # doctest: +SKIP
    >>> table = fastemb.distributed.ShardedEmbeddingBag(1000, 16, num_shards=2,
    ...                                                  engine=RayEngine())  # doctest: +SKIP
    """

    def __init__(self, num_cpus_per_shard=1):
        self._ray = import_ray()
        if not self._ray.is_initialized():
            raise RuntimeError("Ray is not initialised: call ray.init(...) first (fastemb never "
                               "starts Ray for you)")
        self.num_cpus_per_shard = as_real(num_cpus_per_shard, "num_cpus_per_shard")
        if not self.num_cpus_per_shard > 0:
            raise ValueError(f"num_cpus_per_shard must be positive, got {num_cpus_per_shard}")
        self.actors = None

    def start(self, shard_arguments):
        """Start one actor per entry of ``shard_arguments`` (``TableShard``'s arguments)."""
        if self.actors is not None:
            raise RuntimeError("this engine already holds a table's shards; use one engine "
                               "per table")
        needed = self.num_cpus_per_shard * len(shard_arguments)
        total = self._ray.cluster_resources().get("CPU", 0)
        if needed > total:  # (the actors would wait for CPUs forever)
            raise ValueError(f"{len(shard_arguments)} shards of {self.num_cpus_per_shard:g} "
                             f"CPU(s) need {needed:g} CPUs, but the Ray cluster has {total:g}; "
                             f"give each shard fewer (num_cpus_per_shard may be a fraction)")
        self._actor_class = self._ray.remote(num_cpus=self.num_cpus_per_shard, max_restarts=0,
                                             max_task_retries=0)(ShardActor)
        self._optimizer = [arguments[1:] for arguments in shard_arguments]
        self.actors = [self._actor_class.remote(self._threads(), *arguments)
                       for arguments in shard_arguments]

    def restart(self, shards, layouts):
        """Start new actors for the lost ``shards``, with zero rows of ``layouts[shard]``
        (``(shape, dtype)``) and a fresh optimizer, for a checkpoint to fill."""
        for shard in shards:
            self.actors[shard] = self._actor_class.remote(
                self._threads(), tuple(layouts[shard]), *self._optimizer[shard])

    def _threads(self):
        """A shard's fastemb threads: its whole reserved CPUs, at least one."""
        return max(1, int(self.num_cpus_per_shard))

    def call(self, method, per_shard_arguments):
        """``shard.method(*arguments)`` on every shard at once, with its own arguments; the
        results in shard order."""
        if self.actors is None:
            raise RuntimeError("the engine has no shards yet: start it first")
        pending = [actor.call.remote(method, *arguments)
                   for actor, arguments in zip(self.actors, per_shard_arguments, strict=True)]
        results, lost = [], []
        for shard, reference in enumerate(pending):  # (every call is waited for)
            try:
                results.append(self._ray.get(reference))
            except self._ray.exceptions.RayActorError:
                lost.append(shard)
        if lost:
            raise ShardLost(lost)
        return self._count(per_shard_arguments, results)
