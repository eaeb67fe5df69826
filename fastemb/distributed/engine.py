"""Where a sharded table's shards live: ``LocalEngine`` keeps them in this process (for tests,
and for one machine without Ray). An engine starts one ``TableShard`` per shard and calls the
same method on every shard, each with its own arguments, returning their results in shard
order."""

from __future__ import annotations

from .shard import TableShard


class LocalEngine:
    """Every shard in this process, called one after the other.

    >>> import numpy as np
    >>> engine = LocalEngine()
    >>> engine.start([(np.zeros((2, 3), np.float32), "sgd", {"lr": 0.1})] * 2)
    >>> engine.call("rows", [(np.array([1]),), (np.array([0, 1]),)])[1].shape
    (2, 3)
    """

    def __init__(self):
        self.shards = None

    @property
    def num_shards(self):
        return 0 if self.shards is None else len(self.shards)

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
        return [getattr(shard, method)(*arguments)
                for shard, arguments in zip(self.shards, per_shard_arguments, strict=True)]
