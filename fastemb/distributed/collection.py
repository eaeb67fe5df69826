"""``ShardedEmbeddingBagCollection``: ``fastemb.EmbeddingBagCollection``'s tables, each a
``ShardedEmbeddingBag`` on an engine of its own."""

from __future__ import annotations

import numpy as np

from ..backward import check_grad_output
from ..collection import EmbeddingBagConfig, _check_tables, check_features
from ..jagged import KeyedArray
from .engine import LocalEngine
from .table import ShardedEmbeddingBag


class ShardedEmbeddingBagCollection:
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
        self.configs = _check_tables(tables, EmbeddingBagConfig)
        rng = np.random.default_rng(seed)
        self.tables = {
            config.name: ShardedEmbeddingBag(
                config.num_embeddings, config.embedding_dim, mode=config.pooling,
                padding_idx=config.padding_idx, num_shards=num_shards, engine=make_engine(),
                optimizer=optimizer, strategy=strategy, dtype=config.dtype,
                seed=rng.integers(2**63), **hyperparameters)
            for config in self.configs}
        self.feature_names = [feature for config in self.configs
                              for feature in config.feature_names]
        self._dims = [config.embedding_dim for config in self.configs
                      for _ in config.feature_names]
        self._batch_size = None

    def __call__(self, features) -> KeyedArray:
        """Pool every feature of ``features`` (holding every feature of the collection; other
        keys are ignored); returns a KeyedArray ``(B, sum of dims)``."""
        check_features(features, self.feature_names)
        batch = features.batch_size
        self._batch_size = None
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
        self._batch_size = batch
        return KeyedArray(self.feature_names, np.concatenate(blocks, axis=1) if blocks else
                          np.zeros((batch, 0), np.float32), self._dims)

    def backward(self, grad_output):
        """Hand every table the gradient of the last forward's bags, given ``grad_output``
        (``(B, sum of dims)``); its shards apply it."""
        if self._batch_size is None:
            raise RuntimeError("backward needs a forward first: call the collection, then "
                               "backward once per call")
        dtype = next(iter(self.tables.values())).dtype
        grad = check_grad_output(grad_output, (self._batch_size, sum(self._dims)), dtype)
        column = 0
        for config in self.configs:
            width = config.embedding_dim
            count = len(config.feature_names)
            # the table's features' columns, one under the other (its bags' order)
            self.tables[config.name].backward(np.concatenate(
                [grad[:, column + k * width:column + (k + 1) * width] for k in range(count)]))
            column += count * width
        self._batch_size = None
