"""Sharded tables: ``ShardedEmbedding`` and ``ShardedEmbeddingBag``, a ``fastemb.Embedding``
and ``fastemb.EmbeddingBag`` whose rows are split over shards, each shard updating its own
rows with its own optimizer.

A lookup pulls the distinct rows it reads from their shards (row r from shard r % S) into a
small table of those rows, and looks up there; the backward computes those rows' gradient and
pushes each shard its rows' part (U rows each way, U the distinct rows). The rows are read, and
their gradients summed, in the same order as on one machine, so a pulled lookup, its gradient
and the update equal the single-machine module's bit for bit, whatever the number of shards.

Bags may instead take partial sums, when that moves fewer bytes (``strategy="auto"``): each
shard sums its part of every bag and the partial sums are added in shard order (then divided,
for "mean"); the backward sends every shard the bags' gradient (S x B rows each way). Bit for
bit with one shard; with more, a bag's sum is added in another order (float rounding, as any
change of summation order). Max bags always pull.

Each shard's lazy optimizer applies its rows' gradient at once (optimizer in backward).
"""

from __future__ import annotations

import warnings
from collections import namedtuple

import numpy as np

from ..backward import check_grad_output
from .._config import threads_for
from .._kernels import kernels as _core
from .._validation import (as_count, as_index_array, as_weight, bag_arguments,
                           check_index_range, check_mode, normalize_padding_idx)
from ..functional import NO_PADDING
from ..modules import Embedding, EmbeddingBag
from ..optim import OPTIMIZERS
from .checkpoint import load as load_tables
from .checkpoint import save as save_tables
from .engine import LocalEngine, ShardLost
from .shard import owned_rows


# What a shard's rows look like, for checking a checkpoint against them.
_Layout = namedtuple("_Layout", "shape dtype")
# What a forward of partial sums keeps for its backward: the input's shape, each shard's
# positions, each position's bag, the bag count, the "mean" divisors (or None), the output (for
# a weighted mean's per-sample weights' gradient, else None), whether it had weights.
_PartialForward = namedtuple("_PartialForward", "input_shape positions bag_of num_bags "
                                                "divisor out weighted")


STRATEGIES = ("auto", "pull", "partial")


def _random_shards(num_embeddings, embedding_dim, num_shards, padding, dtype, seed):
    """Each shard's rows of a new table: standard normal draws (the padding row zero)."""
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((owned_rows(shard, num_shards, num_embeddings),
                                    embedding_dim)).astype(dtype)
               for shard in range(num_shards)]
    if padding is not None:
        weights[padding % num_shards][padding // num_shards] = 0
    return weights


def _check_shard_count(num_shards):
    num_shards = as_count(num_shards, "num_shards")
    if num_shards < 1:
        raise ValueError("num_shards must be at least 1")
    return num_shards


class _ShardedTable:
    """What both kinds of sharded table do: start the shards on an engine, pull rows from
    them, push the rows' gradients, checkpoint, and recover a lost shard."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, num_shards=2,
                 engine=None, optimizer="lazyadam", dtype=np.float32, seed=None,
                 **options_and_hyperparameters):
        num_embeddings = as_count(num_embeddings, "num_embeddings")
        embedding_dim = as_count(embedding_dim, "embedding_dim")
        num_shards = _check_shard_count(num_shards)
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"a sharded table is float32 or float64, got {dtype}")
        padding = normalize_padding_idx(padding_idx, num_embeddings)
        self._start(_random_shards(num_embeddings, embedding_dim, num_shards, padding, dtype,
                                   seed),
                    num_embeddings, embedding_dim, padding, engine, optimizer,
                    **options_and_hyperparameters)

    @classmethod
    def from_pretrained(cls, embeddings, num_shards=2, padding_idx=None, engine=None,
                        optimizer="lazyadam", **options_and_hyperparameters):
        """A sharded table whose rows start as ``embeddings`` (a 2-D float32/float64 array;
        each shard gets a copy of its rows); the other arguments as the constructor's.

        >>> import numpy as np, fastemb.distributed
        >>> table = fastemb.distributed.ShardedEmbeddingBag.from_pretrained(
        ...     np.eye(3, dtype=np.float32), num_shards=2, mode="sum")
        >>> table(np.array([[0, 1]])).tolist()
        [[1.0, 1.0, 0.0]]
        """
        weight = as_weight(embeddings, "embeddings")
        num_shards = _check_shard_count(num_shards)
        module = cls.__new__(cls)
        module._start([np.array(weight[shard::num_shards]) for shard in range(num_shards)],
                      weight.shape[0], weight.shape[1],
                      normalize_padding_idx(padding_idx, weight.shape[0]), engine, optimizer,
                      **options_and_hyperparameters)
        return module

    def _start(self, weights, num_embeddings, embedding_dim, padding, engine, optimizer,
               **hyperparameters):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        OPTIMIZERS[optimizer].cls(EmbeddingBag(1, 1), **hyperparameters)  # (checks them here)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding
        self.dtype = weights[0].dtype
        self.num_shards = len(weights)
        self.engine = LocalEngine() if engine is None else engine
        self.optimizer = optimizer
        self.engine.start([(weight, optimizer, dict(hyperparameters)) for weight in weights])
        self.last_checkpoint = None  # (path, the step it holds, the tables saved there)
        self.recoveries = 0  # how many times a lost shard of this table was recovered
        self._steps = 0
        self._saved = None

    def _by_shard(self, rows):
        """Per shard: which entries of ``rows`` (global, int64) it owns, and their local rows."""
        owners = rows % self.num_shards
        chosen = [np.flatnonzero(owners == shard) for shard in range(self.num_shards)]
        return chosen, [rows[picked] // self.num_shards for picked in chosen]

    def _pull(self, rows):
        """The table's ``rows`` (global, in range), fetched from their shards."""
        chosen, local = self._by_shard(rows)
        pulled = self._call_shards("rows", [(local_rows,) for local_rows in local],
                                   "this lookup reads the restored rows")
        distinct = np.empty((rows.size, self.embedding_dim), dtype=self.dtype)
        for picked, values in zip(chosen, pulled):
            distinct[picked] = values
        return distinct

    def _call_shards(self, method, arguments, lost_consequence):
        """``engine.call``; when a shard died, recover (see ``_recover``) and call again."""
        try:
            return self.engine.call(method, arguments)
        except ShardLost as lost:
            self._recover(lost, lost_consequence)
            return self.engine.call(method, arguments)

    def _grouped(self, flat):
        """The in-range indices ``flat`` grouped by row (fastemb's radix sort, not
        ``np.unique``'s comparison sort): (the distinct rows, sorted; where each one's
        positions start in ``order``; the positions, row by row)."""
        return _core.group_by_row(np.ascontiguousarray(flat), self.num_embeddings, NO_PADDING,
                                  threads_for(flat.size))

    def _pulled(self, flat, grouped=None):
        """For the in-range indices ``flat`` (and their ``_grouped``, if it was taken): (the
        distinct rows, each index's position among them, those rows' values pulled from the
        shards (one zero row when there are none), the padding row's position among them or
        None)."""
        rows, starts, order = self._grouped(flat) if grouped is None else grouped
        inverse = np.empty(flat.size, dtype=np.int64)
        inverse[order] = np.repeat(np.arange(rows.size, dtype=np.int64), np.diff(starts))
        values = self._pull(rows) if rows.size else np.zeros((1, self.embedding_dim),
                                                              self.dtype)
        padding = self.padding_idx
        at = np.searchsorted(rows, padding) if padding is not None else rows.size
        local_padding = int(at) if at < rows.size and rows[at] == padding else None
        return rows, inverse, values, local_padding

    def backward(self, grad_output):
        """Push the gradient of the last lookup's rows, given ``grad_output``, to their
        shards, whose optimizers apply it there."""
        if self._saved is None:
            raise RuntimeError("backward needs a forward first: call the table, then backward "
                               "once per call")
        saved, self._saved = self._saved, None
        try:
            self._push_gradients(grad_output, saved)
            self._steps += 1
        except ShardLost as lost:
            self._recover(lost, "this step's update is dropped with them")

    def _push_row_gradients(self, grad_output, module, rows):
        """After a lookup that pulled ``rows`` into ``module``: their gradient, split by
        shard."""
        try:
            local_grad = module.backward(grad_output)  # (checks grad_output first)
        except ValueError:
            self._saved = (module, rows)  # (a refused gradient changes nothing)
            raise
        chosen, local = self._by_shard(rows[local_grad.rows])
        # every shard steps, with no rows at all if none of its rows was looked up
        self.engine.call("apply_gradient", [(local_rows, local_grad.values[picked])
                                            for picked, local_rows in zip(chosen, local)])

    def save(self, path, metadata=None):
        """Write every shard's rows and optimizer state, all after the same step, to one
        checkpoint file ``path``, atomically (see ``fastemb.distributed.save``).

        >>> import os, tempfile, numpy as np, fastemb.distributed
        >>> table = fastemb.distributed.ShardedEmbeddingBag(10, 4, num_shards=3, seed=0)
        >>> path = os.path.join(tempfile.mkdtemp(), "table.npz")
        >>> table.save(path)
        >>> other = fastemb.distributed.ShardedEmbeddingBag(10, 4, num_shards=3, seed=1)
        >>> other.load(path); bool((other.weight == table.weight).all())
        True
        """
        save_tables(path, [self], metadata)

    def load(self, path):
        """Restore every shard from a checkpoint ``save`` wrote for a table like this one
        (see ``fastemb.distributed.load``)."""
        load_tables(path, [self])

    def _recover(self, lost, consequence):
        """After ``lost``: restart the lost shards and restore every table of the last
        checkpoint (this one and those saved with it) from it, warning what was lost;
        RuntimeError without a checkpoint."""
        if self.last_checkpoint is None:
            raise RuntimeError(f"shard(s) {lost.shards} of the table died, with their rows and "
                               f"optimizer state, and no checkpoint was saved to restore them "
                               f"from (save one with table.save(path))") from lost
        path, step, tables = self.last_checkpoint
        steps_lost = self._steps - step
        self.engine.restart(lost.shards, self._shard_layouts())
        load_tables(path, tables)
        self.recoveries += 1
        restored = ("" if len(tables) == 1
                    else f" with the {len(tables) - 1} other table(s) saved with it")
        warnings.warn(f"shard(s) {lost.shards} of the table died; every shard was restored from "
                      f"{path}{restored} (saved after step {step}): the {steps_lost} step(s) "
                      f"since are lost and {consequence}; training goes on from there",
                      RuntimeWarning, stacklevel=3)

    def _shard_layouts(self):
        """Each shard's rows as (shape, dtype)."""
        return [_Layout((owned_rows(shard, self.num_shards, self.num_embeddings),
                         self.embedding_dim), self.dtype) for shard in range(self.num_shards)]

    def _layout(self):
        """What a checkpoint of this table must match."""
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "num_shards": self.num_shards, "optimizer": self.optimizer}

    @property
    def weight(self):
        """A copy of the whole table, gathered from the shards."""
        return self._pull(np.arange(self.num_embeddings, dtype=np.int64))


class ShardedEmbedding(_ShardedTable):
    """``fastemb.Embedding`` with its rows on ``num_shards`` shards (row r on shard r % S) of
    ``engine`` (default: a ``LocalEngine``, every shard in this process), trained by the
    shards' ``optimizer`` (an ``fastemb.optim.OPTIMIZERS`` name; ``hyperparameters`` as that
    optimizer takes them) in every ``backward``.

    ``module(input)`` gives the rows of ``input`` (any shape of int indices), as
    ``fastemb.Embedding`` does, bit for bit; ``module.backward(grad_output)`` hands their
    gradient to the shards, whose optimizers apply it. float32 and float64 tables; no
    ``max_norm``.

    >>> import numpy as np, fastemb.distributed
    >>> table = fastemb.distributed.ShardedEmbedding(10, 4, num_shards=3, optimizer="sgd",
    ...                                               lr=0.1, seed=0)
    >>> before = table.weight
    >>> rows = table(np.array([[1, 2], [2, 9]]))
    >>> rows.shape
    (2, 2, 4)
    >>> table.backward(np.ones_like(rows))
    >>> np.flatnonzero((table.weight != before).any(axis=1)).tolist()
    [1, 2, 9]
    """

    def __call__(self, input):
        """The ``(*input.shape, D)`` rows of ``input``."""
        indices = as_index_array(input)
        flat = indices.reshape(-1)
        check_index_range(flat, indices.shape, self.num_embeddings)
        self._saved = None
        rows, inverse, values, local_padding = self._pulled(flat)
        module = Embedding.from_pretrained(values, freeze=False, padding_idx=local_padding)
        out = module(inverse.reshape(indices.shape))
        self._saved = (module, rows)
        return out

    def _push_gradients(self, grad_output, saved):
        self._push_row_gradients(grad_output, *saved)

    def __repr__(self):
        return (f"ShardedEmbedding({self.num_embeddings}, {self.embedding_dim}, "
                f"num_shards={self.num_shards})")


class ShardedEmbeddingBag(_ShardedTable):
    """``fastemb.EmbeddingBag`` with its rows on ``num_shards`` shards (row r on shard r % S)
    of ``engine`` (default: a ``LocalEngine``, every shard in this process), trained by the
    shards' ``optimizer`` (an ``fastemb.optim.OPTIMIZERS`` name; ``hyperparameters`` as that
    optimizer takes them) in every ``backward``.

    ``module(input, offsets=None, per_sample_weights=None)`` and ``module.backward(grad_output)``
    take what ``fastemb.EmbeddingBag``'s do; ``backward`` hands the gradient to the shards,
    whose optimizers apply it (nothing comes back but ``per_sample_weights_grad``, when the
    forward had per-sample weights). ``strategy`` is "auto", "pull" or "partial" (see the
    module's docstring). float32 and float64 tables; no ``max_norm``.

    >>> import numpy as np, fastemb.distributed
    >>> table = fastemb.distributed.ShardedEmbeddingBag(10, 4, mode="sum", num_shards=3,
    ...                                                  optimizer="sgd", lr=0.1, seed=0)
    >>> before = table.weight
    >>> out = table(np.array([[1, 2], [2, 9]]))
    >>> table.backward(np.ones_like(out))
    >>> np.flatnonzero((table.weight != before).any(axis=1)).tolist()
    [1, 2, 9]
    """

    def __init__(self, num_embeddings, embedding_dim, mode="mean", padding_idx=None,
                 include_last_offset=False, num_shards=2, engine=None, optimizer="lazyadam",
                 strategy="auto", dtype=np.float32, seed=None, **hyperparameters):
        super().__init__(num_embeddings, embedding_dim, padding_idx, num_shards, engine,
                         optimizer, dtype, seed, mode=mode,
                         include_last_offset=include_last_offset, strategy=strategy,
                         **hyperparameters)

    def _start(self, weights, num_embeddings, embedding_dim, padding, engine, optimizer,
               mode="mean", include_last_offset=False, strategy="auto", **hyperparameters):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.strategy = strategy
        self.mode = check_mode(mode)
        self.include_last_offset = bool(include_last_offset)
        self.per_sample_weights_grad = None
        super()._start(weights, num_embeddings, embedding_dim, padding, engine, optimizer,
                       **hyperparameters)

    def __call__(self, input, offsets=None, per_sample_weights=None):
        """The ``(B, D)`` bags of ``input``, as ``fastemb.EmbeddingBag`` gives them."""
        mode, indices, bounds, weights, padding = bag_arguments(
            input, offsets, self.mode, per_sample_weights, self.include_last_offset,
            self.padding_idx, self.num_embeddings, self.dtype)
        flat = indices.reshape(-1)
        check_index_range(flat, indices.shape, self.num_embeddings)
        self._saved = None
        grouped = None  # (the indices grouped by row, once "auto" counted the distinct rows)
        if self._may_sum_partially(mode, flat.size, bounds.size - 1):
            if self.strategy == "auto":
                grouped = self._grouped(flat)
            if grouped is None or self.num_shards * (bounds.size - 1) < grouped[0].size:
                return self._reduce_partial_sums(mode, indices, bounds, weights, padding)
        rows, inverse, values, local_padding = self._pulled(flat, grouped)
        # the bags over a table of just these rows
        module = EmbeddingBag.from_pretrained(values, freeze=False, mode=mode,
                                              padding_idx=local_padding,
                                              include_last_offset=self.include_last_offset)
        out = module(inverse.reshape(indices.shape), offsets, per_sample_weights)
        self._saved = (module, rows)
        return out

    def _may_sum_partially(self, mode, num_indices, num_bags):
        """Whether a forward may have each shard reduce its part of every bag (moving S x B
        rows each way) rather than pull the distinct rows (U rows each way): with "partial";
        with "auto", when S x B is below the index count (U can be no more), and then
        ``__call__`` compares it with U. Max bags always pull (their winners stay exact)."""
        if mode == "max" or self.strategy == "pull":
            return False
        return self.strategy == "partial" or self.num_shards * num_bags < num_indices

    def _reduce_partial_sums(self, mode, indices, bounds, weights, padding):
        """The bags from every shard's sums of its part of each bag: their sum (in shard
        order), divided for "mean" by the bag's count or weight total."""
        flat, num_bags = indices.reshape(-1), bounds.size - 1
        bag_of = np.repeat(np.arange(num_bags), np.diff(bounds))
        kept = np.ones(flat.size, bool) if padding is None else flat != padding
        owners = flat % self.num_shards
        positions = [np.flatnonzero(kept & (owners == shard)) for shard in range(self.num_shards)]
        arguments = [(flat[picked] // self.num_shards,
                      np.concatenate([[0], np.cumsum(np.bincount(bag_of[picked],
                                                                 minlength=num_bags))]),
                      None if weights is None else weights[picked]) for picked in positions]
        partials = self._call_shards("partial_bags", arguments,
                                     "this lookup reads the restored rows")
        out = partials[0].copy()
        for partial in partials[1:]:
            out += partial
        divisor = None
        if mode == "mean":
            divisor = np.bincount(bag_of[kept], minlength=num_bags,
                                  weights=None if weights is None else weights[kept])
            divisor = divisor.astype(self.dtype)
            np.divide(out, divisor[:, None], out=out, where=divisor[:, None] != 0)
            out[divisor == 0] = 0
        self._saved = _PartialForward(indices.shape, positions, bag_of, num_bags, divisor,
                                      out.copy() if weights is not None and divisor is not None
                                      else None, weights is not None)
        return out

    def _push_gradients(self, grad_output, saved):
        self.per_sample_weights_grad = None
        if isinstance(saved, _PartialForward):
            self._push_bag_gradients(grad_output, saved)
        else:
            self._push_row_gradients(grad_output, *saved)
            self.per_sample_weights_grad = saved[0].per_sample_weights_grad

    def _push_bag_gradients(self, grad_output, forward):
        """After a forward of partial sums (``forward``, a ``_PartialForward``): every shard
        gets the gradient of its sums (for "mean", divided by the bags' divisors) and returns
        its positions' part of the per-sample weights' gradient."""
        try:
            grad = check_grad_output(grad_output, (forward.num_bags, self.embedding_dim),
                                     self.dtype)
        except ValueError:
            self._saved = forward  # (a refused gradient changes nothing)
            raise
        if forward.divisor is not None:
            grad = np.divide(grad, forward.divisor[:, None], where=forward.divisor[:, None] != 0,
                             out=np.zeros_like(grad))
        parts = self.engine.call("apply_bag_gradient", [(grad,)] * self.num_shards)
        if not forward.weighted:
            return
        sample_grad = np.zeros(forward.bag_of.size, self.dtype)
        for picked, part in zip(forward.positions, parts):
            sample_grad[picked] = part
        if forward.out is not None:  # weighted mean: d out_b / d w_i = (x_i - out_b) / W_b
            kept = np.concatenate(forward.positions)
            bag_term = np.einsum("bd,bd->b", forward.out, grad)
            sample_grad[kept] -= bag_term[forward.bag_of[kept]]
        self.per_sample_weights_grad = sample_grad.reshape(forward.input_shape)

    def __repr__(self):
        return (f"ShardedEmbeddingBag({self.num_embeddings}, {self.embedding_dim}, "
                f"mode={self.mode!r}, num_shards={self.num_shards})")
