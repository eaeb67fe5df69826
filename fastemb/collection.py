"""Many tables in one call: ``EmbeddingBagCollection`` (pooled) and ``EmbeddingCollection``
(unpooled), TorchRec's modules on NumPy arrays.

Tables are described by configs (name, size, dim, dtype, pooling, padding, and the features
that read them; a table may serve several features). Input is a ``KeyedJaggedArray``. The
forward of every feature runs in one kernel call (``_core.collection_bag_reduce``); the
backward groups the looked-up rows of every table in one radix sort over a key space where
table t's row r is ``first_row[t] + r``, and hands each table a deferred ``SparseGrad``, so an
optimizer's step fuses the gradient sums with the update as for a single module.

Each table is a ``fastemb.EmbeddingBag`` / ``fastemb.Embedding`` (``collection.embedding_bags``
/ ``collection.embeddings``): its ``.weight`` and ``.grad`` are the table's, optimizers take the
collection (or its tables), and ``fastemb.save`` / ``load`` take it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._config import threads_for
from ._dtypes import TABLE_DTYPES
from ._kernels import kernels as _core
from ._memory import with_reused_memory
from ._validation import BAG_MODES, NO_PADDING, as_count, check_mode
from .backward import check_grad_output
from .jagged import JaggedArray, KeyedArray, KeyedJaggedArray
from .modules import Embedding, EmbeddingBag
from .sparse import GradientPlan, SparseGrad


@dataclass(frozen=True)
class _TableConfig:
    """What both configs give: the table's name, size, the features that read it (default: one
    feature named as the table), padding_idx and dtype."""

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: tuple = field(default=())
    padding_idx: int | None = None
    dtype: object = np.float32

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"a table's name must be a non-empty str, got {self.name!r}")
        as_count(self.num_embeddings, "num_embeddings")
        as_count(self.embedding_dim, "embedding_dim")
        if isinstance(self.feature_names, str):
            raise TypeError(f"feature_names must be a list of str, got {self.feature_names!r}")
        object.__setattr__(self, "feature_names", tuple(self.feature_names) or (self.name,))


@dataclass(frozen=True)
class EmbeddingBagConfig(_TableConfig):
    """One table of an ``EmbeddingBagCollection`` (TorchRec's ``EmbeddingBagConfig``): its
    name, size, the features that read it (default: one feature named as the table),
    padding_idx, dtype, and how its features pool their bags: "sum", "mean" or "max".

    >>> import fastemb
    >>> fastemb.EmbeddingBagConfig("movies", 1682, 32, feature_names=["watched", "rated"])
    ... # doctest: +ELLIPSIS
    EmbeddingBagConfig(name='movies', num_embeddings=1682, embedding_dim=32, ...)
    """

    pooling: str = "sum"

    def __post_init__(self):
        super().__post_init__()
        check_mode(self.pooling)


@dataclass(frozen=True)
class EmbeddingConfig(_TableConfig):
    """One table of an ``EmbeddingCollection`` (TorchRec's ``EmbeddingConfig``): as
    ``EmbeddingBagConfig``, without pooling (each value gets its own row).

    >>> import fastemb
    >>> fastemb.EmbeddingConfig("words", 30000, 64).feature_names
    ('words',)
    """


def check_features(features, feature_names):
    """TypeError unless ``features`` is a KeyedJaggedArray, ValueError unless it holds every
    one of ``feature_names`` (a collection's features)."""
    if not isinstance(features, KeyedJaggedArray):
        raise TypeError(f"features must be a fastemb.KeyedJaggedArray, got "
                        f"{type(features).__name__}")
    missing = [name for name in feature_names if name not in features.keys]
    if missing:
        raise ValueError(f"features has no key {missing[0]!r}; the collection reads "
                         f"{feature_names}")


def table_modules(modules):
    """``modules`` (a module, a collection, or a list of them) as a flat list of table modules:
    each collection stands for its tables, in config order.

    >>> import fastemb
    >>> collection = fastemb.EmbeddingBagCollection([fastemb.EmbeddingBagConfig("a", 5, 2),
    ...                                              fastemb.EmbeddingBagConfig("b", 7, 2)])
    >>> [module.num_embeddings for module in table_modules([collection, fastemb.Embedding(3, 2)])]
    [5, 7, 3]
    """
    modules = list(modules) if isinstance(modules, (list, tuple)) else [modules]
    return [table for module in modules
            for table in (module.tables if isinstance(module, _Collection) else [module])]


def _check_tables(tables, config_type):
    """The configs as a list, with distinct table names and features read by one table each."""
    tables = list(tables)
    for position, table in enumerate(tables):
        if not isinstance(table, config_type):
            raise TypeError(f"tables[{position}] must be a {config_type.__name__}, got "
                            f"{type(table).__name__}")
    names = [table.name for table in tables]
    features = [feature for table in tables for feature in table.feature_names]
    for kind, values in (("table name", names), ("feature", features)):
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise ValueError(f"each {kind} may appear once, but {repeated[0]!r} appears twice")
    float64 = {np.dtype(table.dtype) == np.float64 for table in tables}
    if len(float64) > 1:
        raise ValueError("a collection's tables are all float64 or none is (its output has one "
                         "dtype: float64, or float32 for float32, float16 and bfloat16 tables)")
    return tables


@dataclass
class _SavedForward:
    """What a collection's forward keeps for its backward: the features it read, in the
    collection's feature order (feature f's bags are bags f * B .. f * B + B - 1), so that a
    table's gradient sums its features' contributions in that order, whatever the order of
    the input's keys."""

    values: np.ndarray        # the values of the collection's features, one after the other
    bounds: np.ndarray        # their K * B + 1 bag bounds
    batch_size: int
    weights: np.ndarray       # per value, or None
    winners: np.ndarray       # (B, C) winning rows of the max features, or None
    output: np.ndarray        # kept for the weighted-mean features only, else None

    @classmethod
    def of(cls, features, first_bags, winners=None, output=None):
        """The features that ``first_bags`` (per feature of the collection: where its bags
        start among the input's) name, copied in the collection's order."""
        batch = features.batch_size
        if len(features.keys) == first_bags.size and np.array_equal(
                first_bags, np.arange(first_bags.size) * batch):  # (already in that order)
            weights = None if features.weights is None else features.weights.copy()
            return cls(features.values.copy(), features.offsets.copy(), batch, weights, winners,
                       output)
        starts, ends = features.offsets[first_bags], features.offsets[first_bags + batch]
        at = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        bounds = np.empty(first_bags.size * batch + 1, dtype=np.int64)
        bounds[-1] = at[-1]
        for f, first_bag in enumerate(first_bags):
            bounds[f * batch:(f + 1) * batch] = (features.offsets[first_bag:first_bag + batch]
                                                 - starts[f] + at[f])

        def gathered(array):
            if array is None:
                return None
            return np.concatenate([array[start:end] for start, end in zip(starts, ends)]
                                  or [array[:0]])

        return cls(gathered(features.values), bounds, batch, gathered(features.weights),
                   winners, output)

    def extent(self, feature):
        """Feature ``feature``'s values: [start, end)."""
        return (int(self.bounds[feature * self.batch_size]),
                int(self.bounds[(feature + 1) * self.batch_size]))

    def feature_bounds(self, feature):
        """Feature ``feature``'s B + 1 bag bounds."""
        return self.bounds[feature * self.batch_size:(feature + 1) * self.batch_size + 1]


class _Collection:
    """What both collections share: their tables, their features and the backward."""

    module_type = None

    def __init__(self, tables, config_type, seed):
        self.configs = _check_tables(tables, config_type)
        rng = np.random.default_rng(seed)
        self._modules = {}
        for config in self.configs:
            options = dict(padding_idx=config.padding_idx, dtype=config.dtype,
                           seed=rng.integers(2**63))
            if self.module_type is EmbeddingBag:
                options["mode"] = config.pooling
            self._modules[config.name] = self.module_type(config.num_embeddings,
                                                          config.embedding_dim, **options)
        self.feature_names = [feature for config in self.configs
                              for feature in config.feature_names]
        # per feature: its table's position, and the feature's place among its table's features
        self._feature_tables = np.array([t for t, config in enumerate(self.configs)
                                         for _ in config.feature_names], dtype=np.int64)
        self._feature_slots = np.array([slot for config in self.configs
                                        for slot in range(len(config.feature_names))],
                                       dtype=np.int64)
        # table t reads features _table_features[t] to _table_features[t + 1]
        self._table_features = np.concatenate(
            [[0], np.cumsum([len(config.feature_names) for config in self.configs])]).astype(
            np.int64)
        self._padding = np.array(
            [NO_PADDING if self._modules[config.name].padding_idx is None
             else self._modules[config.name].padding_idx
             for config in self.configs for _ in config.feature_names], dtype=np.int64)
        self._dims = [config.embedding_dim for config in self.configs
                      for _ in config.feature_names]
        self._saved = None

    @property
    def tables(self):
        """The tables' modules, in config order (what optimizers and checkpoints step and
        save)."""
        return list(self._modules.values())

    def _feature_positions(self, features):
        """Check ``features`` (a KeyedJaggedArray with every feature of the collection) and
        return, per feature of the collection, where its B bags start among its bounds."""
        check_features(features, self.feature_names)
        return np.array([features.keys.index(name) * features.batch_size
                         for name in self.feature_names], dtype=np.int64)

    def _raise_out_of_range(self, features, first_bags):
        """Raise IndexError naming the first value outside its table (after a forward counted
        some)."""
        for name, table, first_bag in zip(self.feature_names, self._feature_tables, first_bags):
            module = self.tables[table]
            start = features.offsets[first_bag]
            end = features.offsets[first_bag + features.batch_size]
            values = features.values[start:end]
            bad = np.flatnonzero((values < 0) | (values >= module.num_embeddings))
            if bad.size:
                raise IndexError(
                    f"features[{name!r}] value {bad[0]} (values[{start + bad[0]}]) = "
                    f"{values[bad[0]]} is out of range for table "
                    f"{self.configs[table].name!r} (num_embeddings={module.num_embeddings})")

    def _backward(self, grad_output, optimizer):
        """``backward``: the last forward's gradients, kept in ``.grad`` and returned, or
        applied by ``optimizer``."""
        grads = self._gradients_of(self._last_forward(), grad_output, optimizer)
        self._saved = None
        if optimizer is not None:
            return None
        for name, table_grad in grads.items():
            self._modules[name]._accumulate(table_grad)
        return grads

    def _gradients_of(self, saved, grad_output, optimizer=None):
        """``{table name: SparseGrad}`` of the forward that ``saved`` (what a forward left in
        ``self._saved``) describes, given ``grad_output``; with ``optimizer`` (a
        ``fastemb.optim`` optimizer of these tables), applied by it right away. What
        ``backward`` and ``fastemb.torch``'s autograd functions call."""
        if optimizer is not None and not callable(getattr(optimizer, "apply_gradients", None)):
            raise TypeError(f"optimizer must be a fastemb.optim optimizer, got "
                            f"{type(optimizer).__name__}")
        grads = self._gradients(saved, grad_output, in_place=optimizer is not None)
        if optimizer is not None:  # (it checks everything first: a refusal changes nothing)
            optimizer.apply_gradients({self._modules[name]: table_grad
                                       for name, table_grad in grads.items()})
        return grads

    def _last_forward(self):
        """What the last forward saved for its backward (RuntimeError when there is none)."""
        if self._saved is None:
            raise RuntimeError("backward needs a forward first: call the collection, then "
                               "backward once per call")
        return self._saved

    def _trained_features(self):
        """Per table: the positions of the features that read it, or None when it gets no
        gradient (it is frozen, or no feature reads it)."""
        positions = [np.flatnonzero(self._feature_tables == t) for t in range(len(self.configs))]
        return [None if module.frozen or not features.size else features
                for module, features in zip(self.tables, positions)]

    def zero_grad(self):
        """Drop every table's gradient."""
        for module in self.tables:
            module.zero_grad()

    @with_reused_memory
    def _table_gradients(self, saved, grad_rows, per_position, coefficients):
        """Each table's SparseGrad, from one call that groups every table's looked-up rows
        (``_core.collection_group_by_row``): ``grad_rows`` gives, per table, the (rows, D)
        gradient rows its positions read and its max winners (None: no gradient);
        ``per_position`` whether positions read them through a source array (with
        ``coefficients``)."""
        modules = self.tables
        num_rows = np.array([0 if grad_rows[t] is None else module.num_embeddings
                             for t, module in enumerate(modules)], dtype=np.int64)
        source, order, rows, starts, counts = _core.collection_group_by_row(
            saved.values, saved.bounds, saved.batch_size, self._table_features, num_rows,
            self._padding, self._grad_row_bases(saved), self.module_type is Embedding,
            per_position, threads_for(saved.values.size))
        segment_starts = saved.bounds[self._table_features[:-1] * saved.batch_size]
        grads = {}
        for t, module in enumerate(modules):
            if grad_rows[t] is None:
                continue
            first, count = segment_starts[t], counts[t]
            plan = GradientPlan(grad_rows[t][0], starts[first + t:first + t + count + 1], order,
                                source=source if per_position else None,
                                coefficients=coefficients, winners=grad_rows[t][1])
            grads[self.configs[t].name] = SparseGrad._planned(rows[first:first + count],
                                                              module.num_embeddings, plan)
        return grads

    def _grad_row_bases(self, saved):
        """Per feature: where its rows start among its table's gradient rows."""
        raise NotImplementedError


class EmbeddingBagCollection(_Collection):
    """Several ``EmbeddingBag`` tables looked up in one call (TorchRec's
    ``EmbeddingBagCollection``): ``collection(features)`` pools every feature's bags with its
    table's pooling and returns a ``KeyedArray`` of ``(B, sum of dims)``, the features side by
    side in config order. ``backward(grad_output)`` adds each table's gradient into its
    ``.grad``. The KJT's weights, if any, weight every feature's sum or mean.

    >>> import numpy as np, fastemb
    >>> collection = fastemb.EmbeddingBagCollection([
    ...     fastemb.EmbeddingBagConfig("users", 100, 4),
    ...     fastemb.EmbeddingBagConfig("genres", 20, 2, pooling="mean")], seed=0)
    >>> features = fastemb.KeyedJaggedArray(["users", "genres"], values=[7, 3, 1, 4, 9],
    ...                                     lengths=[1, 1, 2, 1])
    >>> out = collection(features)
    >>> out.values.shape, out.offset_per_key
    ((2, 6), [0, 4, 6])
    >>> grads = collection.backward(np.ones_like(out.values))
    >>> grads["genres"].rows.tolist()
    [1, 4, 9]
    """

    module_type = EmbeddingBag

    def __init__(self, tables, seed=None):
        super().__init__(tables, EmbeddingBagConfig, seed)
        self._modes = np.array([BAG_MODES[config.pooling] for config in self.configs
                                for _ in config.feature_names], dtype=np.int64)
        self._columns = np.concatenate([[0], np.cumsum(self._dims)]).astype(np.int64)
        self._pooling = [config.pooling for config in self.configs for _ in config.feature_names]

    @property
    def embedding_bags(self):
        """``{table name: fastemb.EmbeddingBag}``."""
        return dict(self._modules)

    def __call__(self, features) -> KeyedArray:
        """Pool every feature of ``features`` (a KeyedJaggedArray holding every feature of the
        collection; other keys are ignored); returns a KeyedArray ``(B, sum of dims)``."""
        first_bags = self._feature_positions(features)
        if features.weights is not None and "max" in self._pooling:
            raise ValueError("weights are supported with pooling 'sum' and 'mean', not 'max'")
        modules = self.tables
        dtype = TABLE_DTYPES[np.dtype(self.configs[0].dtype)].compute_dtype if modules else (
            np.dtype(np.float32))
        weights = features.weights
        if weights is not None and weights.dtype != dtype:
            raise TypeError(f"the features' weights must be {dtype} for these tables, got "
                            f"{weights.dtype}")
        out = _core.empty_reused((features.batch_size, int(self._columns[-1])), dtype)
        winners = None
        if "max" in self._pooling:
            winners = np.empty(out.shape, dtype=np.int64)
        tables = [module._table for module in modules]
        out_of_range = _core.collection_bag_reduce(
            tables, features.values, features.offsets, self._feature_tables, first_bags,
            self._modes, self._padding, self._columns[:-1], weights, out, winners,
            threads_for(features.values.size * max(self._dims, default=0)))
        if out_of_range:
            self._raise_out_of_range(features, first_bags)
        weighted_mean = weights is not None and "mean" in self._pooling
        self._saved = _SavedForward.of(features, first_bags, winners,
                                       out.copy() if weighted_mean else None)
        return KeyedArray(self.feature_names, out, self._dims)

    def backward(self, grad_output, optimizer=None):
        """Add each table's weight gradient of the last forward, given ``grad_output`` (the
        ``(B, sum of dims)`` gradient of its output values), into the table's ``.grad``;
        returns ``{table name: SparseGrad}`` of this call (frozen tables have none).

        With ``optimizer`` (a ``fastemb.optim`` optimizer of these tables), the gradients are
        not kept: the optimizer applies them right away (TorchRec's optimizer in backward),
        reading ``grad_output`` in place, and ``backward`` returns None. ``.grad`` is left as
        it is. This saves a copy of ``grad_output``, a third of a small-bag step's memory
        traffic.
        """
        return self._backward(grad_output, optimizer)

    def _gradients(self, saved, grad_output, in_place=False):
        """``{table name: SparseGrad}`` of the forward that ``saved`` describes, given
        ``grad_output`` (read in place when ``in_place``: for an optimizer in backward)."""
        batch = saved.batch_size
        dtype = TABLE_DTYPES[np.dtype(self.configs[0].dtype)].compute_dtype
        grad = check_grad_output(grad_output, (batch, int(self._columns[-1])), dtype)
        if in_place or grad.strides[1] != grad.itemsize or (
                grad.strides[0] % grad.itemsize):
            # (read in place, or split, the columns of each row must be contiguous)
            grad = np.ascontiguousarray(grad)
        per_position = saved.weights is not None or "mean" in self._pooling
        coefficients = self._coefficients(saved, dtype) if per_position else None
        if not in_place:
            # a private copy (the caller may reuse its array before an optimizer reads it),
            # table by table: each table's gradient rows together, its features' columns one
            # under the other (they are neighbours in the collection's order)
            blocks = _core.empty_reused((grad.size,), dtype)
            _core.split_columns(grad, self._columns, blocks, threads_for(grad.size))
        grad_rows = []
        for t, features in enumerate(self._trained_features()):
            if features is None:
                grad_rows.append(None)
                continue
            first, last = self._columns[features[0]], self._columns[features[-1] + 1]
            winners = None
            if saved.winners is not None and self.configs[t].pooling == "max":
                winners = np.concatenate([saved.winners[:, self._columns[f]:self._columns[f + 1]]
                                          for f in features])
            if not in_place:
                rows = blocks[batch * first:batch * last].reshape(-1, self._dims[features[0]])
            elif features.size == 1:
                rows = grad[:, first:last]  # (a view)
            else:
                rows = np.concatenate([grad[:, self._columns[f]:self._columns[f + 1]]
                                       for f in features])
            grad_rows.append((rows, winners))
        return self._table_gradients(saved, grad_rows, per_position, coefficients)

    def _grad_row_bases(self, saved):
        """A table's gradient rows are its features' columns of grad_output, one under the
        other: feature f's bag b reads row ``slot_f * B + b``."""
        return self._feature_slots * saved.batch_size

    def _coefficients(self, saved, dtype):
        """Each position's gradient factor (1, its weight, 1 / count or weight / total, as a
        single EmbeddingBag's backward computes them)."""
        coefficients = np.ones(saved.values.size, dtype=dtype)
        for f, pooling in enumerate(self._pooling):
            start, end = saved.extent(f)
            if pooling == "max" or start == end:
                continue
            weights = None if saved.weights is None else saved.weights[start:end]
            if pooling == "sum":
                if weights is not None:
                    coefficients[start:end] = weights
                continue
            _core.bag_gradient_factors(
                coefficients[start:end], np.empty(saved.batch_size, dtype=dtype),
                saved.values[start:end], saved.feature_bounds(f) - start, BAG_MODES["mean"],
                weights, int(self._padding[f]), threads_for(end - start))
        return coefficients

    def __repr__(self):
        tables = ", ".join(f"{c.name}: {c.num_embeddings}x{c.embedding_dim} {c.pooling}"
                           for c in self.configs)
        return f"EmbeddingBagCollection({tables})"


class EmbeddingCollection(_Collection):
    """Several ``Embedding`` tables looked up in one call, without pooling (TorchRec's
    ``EmbeddingCollection``): ``collection(features)`` returns ``{feature: JaggedArray}``, each
    feature's ``(n, D)`` rows (in its table's dtype) with its samples' offsets.
    ``backward(grad_output)`` takes ``{feature: (n, D) gradient}`` and adds each table's
    gradient into its ``.grad``.

    >>> import numpy as np, fastemb
    >>> collection = fastemb.EmbeddingCollection([fastemb.EmbeddingConfig("words", 50, 3)],
    ...                                          seed=0)
    >>> features = fastemb.KeyedJaggedArray(["words"], values=[4, 8, 4], lengths=[2, 1])
    >>> rows = collection(features)["words"]
    >>> rows.values.shape, rows.offsets.tolist()
    ((3, 3), [0, 2, 3])
    >>> grads = collection.backward({"words": np.ones((3, 3), np.float32)})
    >>> grads["words"].values[:, 0].tolist()
    [2.0, 1.0]
    """

    module_type = Embedding

    def __init__(self, tables, seed=None):
        super().__init__(tables, EmbeddingConfig, seed)

    @property
    def embeddings(self):
        """``{table name: fastemb.Embedding}``."""
        return dict(self._modules)

    def __call__(self, features) -> dict:
        """Look up every feature of ``features`` (a KeyedJaggedArray holding every feature of
        the collection; other keys are ignored); returns ``{feature: JaggedArray}``."""
        first_bags = self._feature_positions(features)
        batch = features.batch_size
        starts, ends = features.offsets[first_bags], features.offsets[first_bags + batch]
        modules = self.tables
        row_bytes = [modules[t]._table.dtype.itemsize * self._dims[f]
                     for f, t in enumerate(self._feature_tables)]
        # each feature's block starts on a cache line
        sizes = [-(-(end - start) * size // 64) * 64
                 for start, end, size in zip(starts, ends, row_bytes)]
        out_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        out = _core.empty_reused((int(out_offsets[-1]),), np.uint8)
        out_of_range = _core.collection_gather(
            [module._table for module in modules], features.values, self._feature_tables,
            starts, ends, out.view(np.int8), out_offsets[:-1],
            threads_for(features.values.size * max(self._dims, default=0)))
        if out_of_range:
            self._raise_out_of_range(features, first_bags)
        self._saved = _SavedForward.of(features, first_bags)
        result = {}
        for f, name in enumerate(self.feature_names):
            table = modules[self._feature_tables[f]]._table
            count = int(ends[f] - starts[f])
            block = out[out_offsets[f]:out_offsets[f] + count * row_bytes[f]]
            result[name] = JaggedArray(block.view(table.dtype).reshape(count, self._dims[f]),
                                       features[name][1])
        return result

    def backward(self, grad_output, optimizer=None):
        """Add each table's weight gradient of the last forward, given ``{feature: (n, D)
        gradient of its rows}``, into the table's ``.grad``; returns ``{table name:
        SparseGrad}`` of this call (frozen tables have none). With ``optimizer`` (a
        ``fastemb.optim`` optimizer of these tables) the optimizer applies them instead, and
        ``backward`` returns None (see ``EmbeddingBagCollection.backward``)."""
        return self._backward(grad_output, optimizer)

    def _gradients(self, saved, grad_output, in_place=False):
        """``{table name: SparseGrad}`` of the forward that ``saved`` describes, given
        ``grad_output`` (copied, whatever ``in_place`` says)."""
        if not isinstance(grad_output, dict) or set(grad_output) != set(self.feature_names):
            raise ValueError(f"grad_output must be a dict with the keys {self.feature_names}")
        grad_rows = []
        for module, features in zip(self.tables, self._trained_features()):
            if features is None:
                grad_rows.append(None)
                continue
            dtype = TABLE_DTYPES[module._table.dtype].compute_dtype
            parts = []
            for f in features:
                start, end = saved.extent(f)
                grad = grad_output[self.feature_names[f]]
                if getattr(grad, "dtype", None) == module._table.dtype != dtype:
                    grad = grad.astype(dtype)  # (a 16-bit table's: widened exactly)
                parts.append(check_grad_output(grad, (end - start, self._dims[f]), dtype,
                                               f"grad_output[{self.feature_names[f]!r}]"))
            grad_rows.append((np.concatenate(parts), None))  # (a copy)
        return self._table_gradients(saved, grad_rows, True, None)

    def _grad_row_bases(self, saved):
        """A table's gradient rows are its features' rows, one under the other (a table's
        features are neighbours in the collection's order, and so are their values)."""
        starts = saved.bounds[::saved.batch_size][:-1] if saved.batch_size else np.zeros(
            len(self.feature_names), dtype=np.int64)
        first_feature = np.searchsorted(self._feature_tables, self._feature_tables)
        return starts - starts[first_feature]

    def __repr__(self):
        tables = ", ".join(f"{c.name}: {c.num_embeddings}x{c.embedding_dim}"
                           for c in self.configs)
        return f"EmbeddingCollection({tables})"
