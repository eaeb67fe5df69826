"""Sharded collections: ``ShardedEmbeddingBagCollection`` and ``ShardedEmbeddingCollection``,
``fastemb.EmbeddingBagCollection``'s and ``fastemb.EmbeddingCollection``'s tables, each a
``ShardedEmbeddingBag`` or ``ShardedEmbedding`` on an engine of its own."""

from __future__ import annotations

import numpy as np

from ..backward import check_grad_output
from ..collection import EmbeddingBagConfig, EmbeddingConfig, _check_tables, check_features
from ..jagged import JaggedArray, KeyedArray
from .engine import LocalEngine
from .table import ShardedEmbedding, ShardedEmbeddingBag


class _ShardedCollection:
    """What both sharded collections share: one sharded table per config (``make_table(config,
    seed)``), the features in config order, and each feature's width."""

    def __init__(self, tables, config_type, seed, make_table):
        self.configs = _check_tables(tables, config_type)
        rng = np.random.default_rng(seed)
        self.tables = {config.name: make_table(config, rng.integers(2**63))
                       for config in self.configs}
        self.feature_names = [feature for config in self.configs
                              for feature in config.feature_names]
        self._dims = [config.embedding_dim for config in self.configs
                      for _ in config.feature_names]

    def _look_up_consistently(self, look_up):
        """``look_up()`` (every table's lookups), and once more if a table recovered from a
        lost shard meanwhile: a recovery puts every table saved with it back at the
        checkpoint, so the tables looked up before it read rows that are no longer there."""
        recoveries = self._recoveries()
        result = look_up()
        if self._recoveries() != recoveries:
            result = look_up()
        return result

    def _push_consistently(self, gradients):
        """Hand each table of ``gradients`` (``{table name: gradient}``) its gradient, in
        order, until a table recovers from a lost shard: the recovery put every table back at
        the checkpoint and dropped this step, so the tables after it must not step either."""
        recoveries = self._recoveries()
        for name, gradient in gradients.items():
            self.tables[name].backward(gradient)
            if self._recoveries() != recoveries:
                return

    def _recoveries(self):
        return sum(table.recoveries for table in self.tables.values())

    def __repr__(self):
        tables = ", ".join(f"{config.name}: {config.num_embeddings}x{config.embedding_dim}"
                           for config in self.configs)
        shards = next(iter(self.tables.values())).num_shards if self.tables else 0
        return f"{type(self).__name__}({tables}; {shards} shards each)"


class ShardedEmbeddingBagCollection(_ShardedCollection):
    """Several sharded tables looked up together: ``collection(features)`` pools every feature
    of ``features`` (a ``KeyedJaggedArray``) with its table's pooling and returns a
    ``KeyedArray`` ``(B, sum of dims)``, the features side by side in config order, as
    ``fastemb.EmbeddingBagCollection`` does; ``backward(grad_output)`` hands every table its
    gradient, which its shards apply. ``tables`` are ``EmbeddingBagConfig``s; every table has
    ``num_shards`` shards on an engine ``make_engine()`` gives (default: a ``LocalEngine``
    each) and the shards' ``optimizer`` (with ``hyperparameters``). Each table's features are
    looked up in one call of that table.

    >>> import numpy as np, fastemb, fastemb.distributed
    >>> collection = fastemb.distributed.ShardedEmbeddingBagCollection([
    ...     fastemb.EmbeddingBagConfig("users", 100, 4),
    ...     fastemb.EmbeddingBagConfig("genres", 20, 2, pooling="mean")], num_shards=2, seed=0)
    >>> features = fastemb.KeyedJaggedArray(["users", "genres"], values=[7, 3, 1, 4, 9],
    ...                                     lengths=[1, 1, 2, 1])
    >>> out = collection(features)
    >>> out.values.shape, out.offset_per_key
    ((2, 6), [0, 4, 6])
    >>> collection.backward(np.ones_like(out.values))
    """

    def __init__(self, tables, num_shards=2, make_engine=LocalEngine, optimizer="lazyadam",
                 strategy="auto", seed=None, **hyperparameters):
        super().__init__(tables, EmbeddingBagConfig, seed, lambda config, table_seed: (
            ShardedEmbeddingBag(
                config.num_embeddings, config.embedding_dim, mode=config.pooling,
                padding_idx=config.padding_idx, num_shards=num_shards, engine=make_engine(),
                optimizer=optimizer, strategy=strategy, dtype=config.dtype, seed=table_seed,
                **hyperparameters)))
        self._batch_size = None

    def __call__(self, features) -> KeyedArray:
        """Pool every feature of ``features`` (holding every feature of the collection; other
        keys are ignored); returns a KeyedArray ``(B, sum of dims)``."""
        check_features(features, self.feature_names)
        batch = features.batch_size
        self._batch_size = None
        blocks = self._look_up_consistently(lambda: self._pooled_blocks(features))
        self._batch_size = batch
        return KeyedArray(self.feature_names, np.concatenate(blocks, axis=1) if blocks else
                          np.zeros((batch, 0), np.float32), self._dims)

    def _pooled_blocks(self, features):
        """Each feature's ``(B, D)`` bags, in order: a table's features in one call."""
        batch = features.batch_size
        blocks = []
        for config in self.configs:
            # the table's features as one call: feature k's bags are bags k * B .. k * B + B - 1
            values, offsets, weights, base = [], [], [], 0
            for name in config.feature_names:
                feature_values, feature_offsets, feature_weights = features[name]
                values.append(feature_values)
                offsets.append(feature_offsets[:-1] + base)
                base += feature_values.size
                if feature_weights is not None:
                    weights.append(feature_weights)
            out = self.tables[config.name](
                np.concatenate(values), np.concatenate(offsets),
                np.concatenate(weights) if weights else None)
            blocks += [out[k * batch:(k + 1) * batch] for k in range(len(config.feature_names))]
        return blocks

    def backward(self, grad_output):
        """Hand every table the gradient of the last forward's bags, given ``grad_output``
        (``(B, sum of dims)``); its shards apply it."""
        if self._batch_size is None:
            raise RuntimeError("backward needs a forward first: call the collection, then "
                               "backward once per call")
        dtype = next(iter(self.tables.values())).dtype
        grad = check_grad_output(grad_output, (self._batch_size, sum(self._dims)), dtype)
        gradients, column = {}, 0
        for config in self.configs:
            width = config.embedding_dim
            count = len(config.feature_names)
            # the table's features' columns, one under the other (its bags' order)
            gradients[config.name] = np.concatenate(
                [grad[:, column + k * width:column + (k + 1) * width] for k in range(count)])
            column += count * width
        self._batch_size = None
        self._push_consistently(gradients)


class ShardedEmbeddingCollection(_ShardedCollection):
    """Several sharded tables looked up together without pooling: ``collection(features)``
    returns ``{feature: JaggedArray}``, each feature's ``(n, D)`` rows with its samples'
    offsets, as ``fastemb.EmbeddingCollection`` does; ``backward(grad_output)`` takes
    ``{feature: (n, D) gradient}`` and hands every table its gradient, which its shards apply.
    ``tables`` are ``EmbeddingConfig``s; every table has ``num_shards`` shards on an engine
    ``make_engine()`` gives (default: a ``LocalEngine`` each) and the shards' ``optimizer``
    (with ``hyperparameters``). Each table's features are looked up in one call of that table.

    >>> import numpy as np, fastemb, fastemb.distributed
    >>> collection = fastemb.distributed.ShardedEmbeddingCollection(
    ...     [fastemb.EmbeddingConfig("words", 50, 3)], num_shards=2, seed=0)
    >>> features = fastemb.KeyedJaggedArray(["words"], values=[4, 8, 4], lengths=[2, 1])
    >>> rows = collection(features)["words"]
    >>> rows.values.shape, rows.offsets.tolist()
    ((3, 3), [0, 2, 3])
    >>> collection.backward({"words": np.ones((3, 3), np.float32)})
    """

    def __init__(self, tables, num_shards=2, make_engine=LocalEngine, optimizer="lazyadam",
                 seed=None, **hyperparameters):
        super().__init__(tables, EmbeddingConfig, seed, lambda config, table_seed: (
            ShardedEmbedding(
                config.num_embeddings, config.embedding_dim, padding_idx=config.padding_idx,
                num_shards=num_shards, engine=make_engine(), optimizer=optimizer,
                dtype=config.dtype, seed=table_seed, **hyperparameters)))
        self._sizes = None  # each feature's value count in the last forward

    def __call__(self, features) -> dict:
        """Look up every feature of ``features`` (holding every feature of the collection;
        other keys are ignored); returns ``{feature: JaggedArray}``."""
        check_features(features, self.feature_names)
        self._sizes = None
        result = self._look_up_consistently(lambda: self._rows_of_features(features))
        self._sizes = {name: result[name].values.shape[0] for name in self.feature_names}
        return result

    def _rows_of_features(self, features):
        """``{feature: JaggedArray}``: a table's features in one call."""
        result = {}
        for config in self.configs:
            parts = [features[name] for name in config.feature_names]
            rows = self.tables[config.name](np.concatenate([values for values, _, _ in parts]))
            start = 0
            for name, (values, offsets, _) in zip(config.feature_names, parts):
                result[name] = JaggedArray(rows[start:start + values.size], offsets)
                start += values.size
        return result

    def backward(self, grad_output):
        """Hand every table the gradient of the last forward's rows, given ``{feature: (n, D)
        gradient of its rows}`` (every one checked before any table changes); its shards
        apply it."""
        if self._sizes is None:
            raise RuntimeError("backward needs a forward first: call the collection, then "
                               "backward once per call")
        if not isinstance(grad_output, dict) or set(grad_output) != set(self.feature_names):
            raise ValueError(f"grad_output must be a dict with the keys {self.feature_names}")
        grads = {}
        for config in self.configs:
            for name in config.feature_names:
                grads[name] = check_grad_output(
                    grad_output[name], (self._sizes[name], config.embedding_dim),
                    self.tables[config.name].dtype, f"grad_output[{name!r}]")
        self._sizes = None
        self._push_consistently({config.name: np.concatenate(
            [grads[name] for name in config.feature_names]) for config in self.configs})
