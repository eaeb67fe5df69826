"""``EmbeddingBagCollection`` and ``EmbeddingCollection`` as ``torch.nn.Module``s: many tables
in one kernel call.

Each holds a fastemb NumPy collection (``module.collection``) and, per table, a
``fastemb.torch.EmbeddingBag`` (``module.embedding_bags[name]``) or ``fastemb.torch.Embedding``
(``module.embeddings[name]``) on the same memory, whose ``.weight`` is the table's
``nn.Parameter`` (state-dict keys ``embedding_bags.<name>.weight``, as TorchRec names them).
The forward looks up every feature in one call; the backward groups every table's rows in one
call and gives each weight a sparse COO gradient, or, with a fused optimizer, steps every table
in one call right there.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

import numpy as np

from .. import collection as numpy_collections
from ..jagged import JaggedArray, KeyedArray, KeyedJaggedArray
from ._arrays import to_numpy, to_tensor
from .autograd import weight_gradient
from .modules import Embedding, EmbeddingBag, fastemb_optimizer


def as_keyed_jagged(features):
    """``features`` as a ``fastemb.KeyedJaggedArray``: one already, or a TorchRec
    ``KeyedJaggedTensor`` (anything with the methods ``keys()``, ``values()``, ``offsets()``
    and ``weights_or_none()``), whose CPU tensors are read without copying.

    >>> import fastemb
    >>> features = as_keyed_jagged(fastemb.KeyedJaggedArray(["a"], [4, 2], lengths=[2]))
    >>> features.batch_size
    1
    """
    if isinstance(features, KeyedJaggedArray):
        return features
    if all(callable(getattr(features, name, None))
           for name in ("keys", "values", "offsets", "weights_or_none")):
        weights = features.weights_or_none()
        return KeyedJaggedArray(
            list(features.keys()), to_numpy(features.values(), "features.values()"),
            offsets=to_numpy(features.offsets(), "features.offsets()"),
            weights=None if weights is None else to_numpy(weights, "features.weights()"))
    raise TypeError(f"features must be a fastemb.KeyedJaggedArray or a TorchRec "
                    f"KeyedJaggedTensor, got {type(features).__name__}")


class TableModules(torch.nn.Module):
    """The tables' modules by name: a ``torch.nn.ModuleDict`` that takes any table name, even
    one that is an attribute of a Module ("items", "type"); the state-dict keys are
    ``<name>.weight``.

    >>> tables = TableModules({"items": torch.nn.Linear(1, 1)})
    >>> list(tables.keys()), sorted(tables.state_dict())
    (['items'], ['items.bias', 'items.weight'])
    """

    def __init__(self, modules):
        super().__init__()
        for name, module in modules.items():
            if "." in name:
                raise ValueError(f"a table's name must not contain '.' (torch's state dicts "
                                 f"join names with it), got {name!r}")
            self._modules[name] = module  # (not add_module: it refuses attribute names)

    def __getitem__(self, name):
        return self._modules[name]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def keys(self):
        return self._modules.keys()

    def values(self):
        return self._modules.values()

    def items(self):
        return self._modules.items()


def weight_gradients(ctx, grads):
    """What a collection Function's backward returns for its weights, given the tables'
    ``grads`` (``{table name: SparseGrad}``): sparse COO tensors where torch asked for them,
    None where it did not, for a table without gradient, or when a fused optimizer stepped."""
    weight_grads = [None] * len(ctx.weight_dtypes)
    if ctx.fused_optimizer is None:
        needs = ctx.needs_input_grad[3:]
        for t, config in enumerate(ctx.collection.configs):
            if needs[t] and config.name in grads:
                weight_grads[t] = weight_gradient(grads[config.name], ctx.weight_dtypes[t],
                                                  None, None)
    return weight_grads


def keep_for_backward(ctx, collection, fused_optimizer, weights):
    """Move what the collection's forward saved for its backward into ``ctx`` (several forwards
    may precede their backwards), with what the backward needs besides."""
    ctx.saved, collection._saved = collection._saved, None
    ctx.collection, ctx.fused_optimizer = collection, fused_optimizer
    ctx.weight_dtypes = [weight.dtype for weight in weights]


class EmbeddingBagCollectionFunction(torch.autograd.Function):
    """``EmbeddingBagCollectionFunction.apply(collection, fused_optimizer, features,
    *weights)``: the ``(B, sum of dims)`` pooled output of a fastemb NumPy
    ``EmbeddingBagCollection`` whose tables are the ``weights``' memory (in config order),
    differentiable in those weights. ``fastemb.torch.EmbeddingBagCollection`` calls it. The
    features' weights, if any, are constants (no gradient)."""

    @staticmethod
    def forward(ctx, collection, fused_optimizer, features, *weights):
        output = collection(features).values
        keep_for_backward(ctx, collection, fused_optimizer, weights)
        return to_tensor(output)

    @staticmethod
    @once_differentiable  # (the gradients are not differentiable themselves)
    def backward(ctx, grad_output):
        grads = ctx.collection._gradients_of(
            ctx.saved, to_numpy(grad_output, "grad_output"), ctx.fused_optimizer)
        return (None, None, None, *weight_gradients(ctx, grads))


class EmbeddingCollectionFunction(torch.autograd.Function):
    """``EmbeddingCollectionFunction.apply(collection, fused_optimizer, features, *weights)``:
    each feature's ``(n, D)`` rows (a tuple, in the collection's feature order) from a fastemb
    NumPy ``EmbeddingCollection`` whose tables are the ``weights``' memory, differentiable in
    those weights. ``fastemb.torch.EmbeddingCollection`` calls it."""

    @staticmethod
    def forward(ctx, collection, fused_optimizer, features, *weights):
        rows = collection(features)
        keep_for_backward(ctx, collection, fused_optimizer, weights)
        arrays = [rows[name].values for name in collection.feature_names]
        ctx.output_layouts = [(array.shape, array.dtype) for array in arrays]
        return tuple(to_tensor(array) for array in arrays)

    @staticmethod
    @once_differentiable  # (the gradients are not differentiable themselves)
    def backward(ctx, *grad_outputs):
        collection = ctx.collection
        grad_output = {}
        for name, grad, (shape, dtype) in zip(collection.feature_names, grad_outputs,
                                              ctx.output_layouts):
            # (an output the loss did not use has no gradient: zeros)
            grad_output[name] = (np.zeros(shape, dtype) if grad is None
                                 else to_numpy(grad, f"the gradient of {name!r}"))
        grads = collection._gradients_of(ctx.saved, grad_output, ctx.fused_optimizer)
        return (None, None, None, *weight_gradients(ctx, grads))


class _Collection(torch.nn.Module):
    """What both torch collections share: the NumPy collection, its tables' torch modules
    (``self.<tables_attribute>[name]``) and the fused optimizer."""

    numpy_class = None       # the fastemb NumPy collection wrapped
    table_class = None       # the torch module of one table
    tables_attribute = None  # where the tables' modules are, as TorchRec names it

    def __init__(self, tables, seed=None) -> None:
        super().__init__()
        self._set_collection(self.numpy_class(tables, seed))

    def _set_collection(self, collection):
        self._collection = collection
        setattr(self, self.tables_attribute, TableModules({
            config.name: self.table_class.from_numpy(table)
            for config, table in zip(collection.configs, collection.tables)}))
        self.fused_optimizer = None

    @classmethod
    def from_numpy(cls, collection):
        """Wrap an existing fastemb NumPy collection of this kind; every table's weight shares
        its memory (no copy).

        >>> import fastemb, fastemb.torch
        >>> numpy_tables = fastemb.EmbeddingBagCollection([fastemb.EmbeddingBagConfig("a", 5, 2)])
        >>> tables = fastemb.torch.EmbeddingBagCollection.from_numpy(numpy_tables)
        >>> tables.embedding_bags["a"].weight.data[1] = 3.0
        >>> numpy_tables.embedding_bags["a"].weight[1].tolist()
        [3.0, 3.0]
        """
        if not isinstance(collection, cls.numpy_class):
            raise TypeError(f"from_numpy wraps a fastemb.{cls.numpy_class.__name__}, got "
                            f"{type(collection).__name__}")
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module._set_collection(collection)
        return module

    @property
    def collection(self):
        """The fastemb NumPy collection; its tables are the parameters' memory (re-pointed
        there on every access, should a parameter have been replaced)."""
        for table in getattr(self, self.tables_attribute).values():
            table.table  # (re-points the NumPy table at the parameter)
        return self._collection

    @property
    def feature_names(self):
        """The features the collection reads, in the order of its outputs."""
        return self._collection.feature_names

    def fuse_optimizer(self, optimizer_class, **hyperparameters):
        """Step every table with ``optimizer_class(self.collection, **hyperparameters)`` (a
        ``fastemb.optim`` class) inside every backward, in one call, instead of giving the
        weights gradients (TorchRec's fused modules); returns that optimizer.
        ``module.fused_optimizer = None`` undoes it.

        >>> import torch, fastemb, fastemb.torch
        >>> tables = fastemb.torch.EmbeddingBagCollection(
        ...     [fastemb.EmbeddingBagConfig("a", 10, 2)], seed=0)
        >>> opt = tables.fuse_optimizer(fastemb.optim.RowWiseAdagrad, lr=0.1)
        >>> tables(fastemb.KeyedJaggedArray(["a"], [3], lengths=[1])).values.sum().backward()
        >>> tables.embedding_bags["a"].weight.grad is None
        True
        """
        self.fused_optimizer = fastemb_optimizer(optimizer_class, self.collection,
                                                 hyperparameters)
        return self.fused_optimizer

    def _looked_up(self, function, features):
        """``function.apply(...)``'s output when autograd records this call, else the NumPy
        collection's; with the collection and the checked features."""
        collection = self.collection
        features = as_keyed_jagged(features)
        weights = [table.weight for table in getattr(self, self.tables_attribute).values()]
        if torch.is_grad_enabled() and any(weight.requires_grad for weight in weights):
            return function.apply(collection, self.fused_optimizer, features, *weights), (
                collection, features)
        output = collection(features)
        collection._saved = None  # (no backward will come)
        return output, (collection, features)

    def extra_repr(self):
        fused = ("" if self.fused_optimizer is None
                 else f", fused_optimizer={type(self.fused_optimizer).__name__}")
        return f"collection={self._collection!r}{fused}"


class EmbeddingBagCollection(_Collection):
    """TorchRec's ``EmbeddingBagCollection`` on fastemb's kernels: ``module(features)`` pools
    every feature of ``features`` (a ``fastemb.KeyedJaggedArray``, or a TorchRec
    ``KeyedJaggedTensor``) with its table's pooling (sum, mean or max) and returns a
    ``fastemb.KeyedArray`` whose ``.values`` is a ``(B, sum of dims)`` tensor
    (``out["feature"]`` is a feature's ``(B, D)`` columns).

    Takes ``fastemb.EmbeddingBagCollection``'s arguments (a list of ``EmbeddingBagConfig``,
    ``seed``). Each table's weight is an ``nn.Parameter`` sharing memory with the NumPy table;
    its gradient is a coalesced sparse COO tensor (for torch's SparseAdam, SGD or Adagrad),
    unless an optimizer is fused (``fuse_optimizer``): then every table is stepped in the
    backward, in one call.

    >>> import torch, fastemb, fastemb.torch
    >>> tables = fastemb.torch.EmbeddingBagCollection([
    ...     fastemb.EmbeddingBagConfig("users", 100, 4),
    ...     fastemb.EmbeddingBagConfig("genres", 20, 2, pooling="max")], seed=0)
    >>> features = fastemb.KeyedJaggedArray(["users", "genres"], values=[7, 3, 1, 4, 9],
    ...                                     lengths=[1, 1, 2, 1])
    >>> out = tables(features)
    >>> out.values.shape, out["genres"].shape
    (torch.Size([2, 6]), torch.Size([2, 2]))
    >>> out.values.sum().backward()
    >>> tables.embedding_bags["genres"].weight.grad.coalesce().indices().tolist()
    [[1, 4, 9]]
    """

    numpy_class = numpy_collections.EmbeddingBagCollection
    table_class = EmbeddingBag
    tables_attribute = "embedding_bags"

    def forward(self, features) -> KeyedArray:
        """Every feature's pooled bags: a KeyedArray of a ``(B, sum of dims)`` tensor."""
        output, (collection, _) = self._looked_up(EmbeddingBagCollectionFunction, features)
        values = output if isinstance(output, torch.Tensor) else to_tensor(output.values)
        return KeyedArray(collection.feature_names, values, collection._dims)


class EmbeddingCollection(_Collection):
    """TorchRec's ``EmbeddingCollection`` on fastemb's kernels: ``module(features)`` looks up
    every value of every feature, without pooling, and returns ``{feature: JaggedArray}``
    whose ``.values`` is the feature's ``(n, D)`` tensor of rows (in its table's dtype) and
    ``.offsets`` its samples' offsets.

    Takes ``fastemb.EmbeddingCollection``'s arguments (a list of ``EmbeddingConfig``,
    ``seed``); weights, gradients and ``fuse_optimizer`` as ``EmbeddingBagCollection``'s.

    >>> import torch, fastemb, fastemb.torch
    >>> tables = fastemb.torch.EmbeddingCollection([fastemb.EmbeddingConfig("words", 50, 3)],
    ...                                            seed=0)
    >>> rows = tables(fastemb.KeyedJaggedArray(["words"], values=[4, 8, 4], lengths=[2, 1]))
    >>> rows["words"].values.shape, rows["words"].offsets.tolist()
    (torch.Size([3, 3]), [0, 2, 3])
    >>> rows["words"].values.sum().backward()
    >>> tables.embeddings["words"].weight.grad.coalesce().values()[:, 0].tolist()
    [2.0, 1.0]
    """

    numpy_class = numpy_collections.EmbeddingCollection
    table_class = Embedding
    tables_attribute = "embeddings"

    def forward(self, features) -> dict:
        """Every feature's rows: ``{feature: JaggedArray}`` of ``(n, D)`` tensors."""
        output, (collection, features) = self._looked_up(EmbeddingCollectionFunction, features)
        if isinstance(output, dict):
            output = [to_tensor(output[name].values) for name in collection.feature_names]
        return {name: JaggedArray(values, features[name][1])
                for name, values in zip(collection.feature_names, output)}
