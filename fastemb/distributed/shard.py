"""One shard of a row-sharded table: the rows it owns, their optimizer, and the calls an
engine makes on it (on a Ray actor or in this process).

Shard s of S owns the table's rows r with ``r % S == s``, stored in order: global row r is the
shard's local row ``r // S``.
"""

from __future__ import annotations

import numpy as np

from .. import optim
from ..modules import EmbeddingBag
from ..sparse import SparseGrad


def owned_rows(shard, num_shards, num_embeddings):
    """How many rows shard ``shard`` of ``num_shards`` owns in a table of ``num_embeddings``.

    >>> [owned_rows(s, 3, 10) for s in range(3)]
    [4, 3, 3]
    """
    return max(0, (num_embeddings - shard + num_shards - 1) // num_shards)


class TableShard:
    """The rows one shard owns (``weight``, C-contiguous) and a ``fastemb.optim`` optimizer
    (``optimizer``, an ``optim.OPTIMIZERS`` name, with ``hyperparameters``) that updates them.

    >>> shard = TableShard(np.arange(6, dtype=np.float32).reshape(3, 2), "sgd", {"lr": 1.0})
    >>> shard.rows(np.array([2, 0])).tolist()
    [[4.0, 5.0], [0.0, 1.0]]
    >>> shard.apply_gradient(np.array([1]), np.ones((1, 2), np.float32))
    >>> shard.weight[1].tolist()
    [1.0, 2.0]
    """

    def __init__(self, weight, optimizer, hyperparameters):
        # (the shard updates its rows in place: a read-only array, as Ray's object store hands
        # them to an actor, is copied)
        self.module = EmbeddingBag.from_pretrained(np.require(weight, requirements="CW"),
                                                   freeze=False, mode="sum")
        self.optimizer = optim.OPTIMIZERS[optimizer].cls(self.module, **hyperparameters)

    @property
    def weight(self):
        """The owned rows, ``(rows owned, D)``."""
        return self.module.weight

    def rows(self, local_rows):
        """A copy of the owned rows ``local_rows`` (int64, each in range)."""
        return np.take(self.module.weight, local_rows, axis=0)

    def apply_gradient(self, local_rows, values):
        """One optimizer step with the gradient ``values`` of the owned rows ``local_rows``
        (sorted, unique; none at all still counts as a step, as a module whose gradient has no
        rows does)."""
        grad = SparseGrad(local_rows, values, self.module.num_embeddings)
        self.optimizer.apply_gradients({self.module: grad})

    def partial_bags(self, local_indices, bounds, weights):
        """The sums of this shard's part of every bag: bag b is ``local_indices[bounds[b]:
        bounds[b + 1]]`` (owned rows, in range, no padding), weighted by ``weights`` (or None);
        ``(B, D)``. The forward is kept for ``apply_bag_gradient``."""
        return self.module(local_indices, bounds[:-1], weights)

    def apply_bag_gradient(self, grad_output):
        """One optimizer step with the gradient of the last ``partial_bags`` given
        ``grad_output`` (that of its sums, ``(B, D)``); returns the gradient of its per-sample
        weights (or None without)."""
        grad = self.module.backward(grad_output)
        self.module.zero_grad()
        self.optimizer.apply_gradients({self.module: grad})
        return self.module.per_sample_weights_grad

    def state(self):
        """A copy of the owned rows and the optimizer's state (for a checkpoint)."""
        return {"weight": self.module.weight.copy(), "optimizer": self.optimizer.state_dict()}

    def check_state(self, state):
        """ValueError unless ``state`` (as ``state()`` gives it) fits this shard; changes
        nothing (the optimizer state is tried on a scratch optimizer)."""
        weight = state["weight"]
        if weight.shape != self.module.weight.shape or weight.dtype != self.module.weight.dtype:
            raise ValueError(f"a shard's checkpoint holds {weight.dtype} {weight.shape} rows; "
                             f"this shard owns {self.module.weight.dtype} "
                             f"{self.module.weight.shape}")
        scratch = EmbeddingBag.from_pretrained(np.zeros_like(self.module.weight), freeze=False)
        type(self.optimizer)(scratch, **self.optimizer.hyperparameters).load_state_dict(
            state["optimizer"])

    def load_state(self, state):
        """Restore a ``state()`` after ``check_state``."""
        self.check_state(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.module.weight[...] = state["weight"]
