"""``EmbeddingBagCollection`` as a ``torch.nn.Module``: many tables in one kernel call.

It holds a fastemb NumPy ``EmbeddingBagCollection`` (``module.collection``) and, per table, a
``fastemb.torch.EmbeddingBag`` on the same memory (``module.embedding_bags[name]``, whose
``.weight`` is the table's ``nn.Parameter``; state-dict keys ``embedding_bags.<name>.weight``,
as TorchRec names them). The forward pools every feature in one call; the backward groups
every table's rows in one call and gives each weight a sparse COO gradient, or, with a fused
optimizer, steps every table in one call right there.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..collection import EmbeddingBagCollection as NumpyEmbeddingBagCollection
from ..jagged import KeyedArray, KeyedJaggedArray
from ._arrays import to_numpy, to_tensor
from .autograd import weight_gradient
from .modules import EmbeddingBag, fastemb_optimizer


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


class EmbeddingBagCollectionFunction(torch.autograd.Function):
    """``EmbeddingBagCollectionFunction.apply(collection, fused_optimizer, features,
    *weights)``: the ``(B, sum of dims)`` pooled output of a fastemb NumPy
    ``EmbeddingBagCollection`` whose tables are the ``weights``' memory (in config order),
    differentiable in those weights. ``fastemb.torch.EmbeddingBagCollection`` calls it. The
    features' weights, if any, are constants (no gradient)."""

    @staticmethod
    def forward(ctx, collection, fused_optimizer, features, *weights):
        output = collection(features).values
        # this call's saved forward, kept here (several forwards may precede their backwards)
        ctx.saved, collection._saved = collection._saved, None
        ctx.collection, ctx.fused_optimizer = collection, fused_optimizer
        ctx.weight_dtypes = [weight.dtype for weight in weights]
        return to_tensor(output)

    @staticmethod
    @once_differentiable  # (the gradients are not differentiable themselves)
    def backward(ctx, grad_output):
        collection = ctx.collection
        grads = collection._gradients(ctx.saved, to_numpy(grad_output, "grad_output"),
                                      ctx.fused_optimizer)
        weight_grads = [None] * len(ctx.weight_dtypes)
        if ctx.fused_optimizer is None:
            needs = ctx.needs_input_grad[3:]
            for t, config in enumerate(collection.configs):
                if needs[t] and config.name in grads:
                    weight_grads[t] = weight_gradient(grads[config.name], ctx.weight_dtypes[t],
                                                      None, None)
        return (None, None, None, *weight_grads)


class EmbeddingBagCollection(torch.nn.Module):
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

    def __init__(self, tables, seed=None) -> None:
        super().__init__()
        self._set_collection(NumpyEmbeddingBagCollection(tables, seed))

    def _set_collection(self, collection):
        self._collection = collection
        self.embedding_bags = TableModules({
            name: EmbeddingBag.from_numpy(table)
            for name, table in collection.embedding_bags.items()})
        self.fused_optimizer = None

    @classmethod
    def from_numpy(cls, collection) -> EmbeddingBagCollection:
        """Wrap an existing fastemb NumPy ``EmbeddingBagCollection``; every table's weight
        shares its memory (no copy).

        >>> import fastemb, fastemb.torch
        >>> numpy_tables = fastemb.EmbeddingBagCollection([fastemb.EmbeddingBagConfig("a", 5, 2)])
        >>> tables = fastemb.torch.EmbeddingBagCollection.from_numpy(numpy_tables)
        >>> tables.embedding_bags["a"].weight.data[1] = 3.0
        >>> numpy_tables.embedding_bags["a"].weight[1].tolist()
        [3.0, 3.0]
        """
        if not isinstance(collection, NumpyEmbeddingBagCollection):
            raise TypeError(f"from_numpy wraps a fastemb.EmbeddingBagCollection, got "
                            f"{type(collection).__name__}")
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module._set_collection(collection)
        return module

    @property
    def collection(self):
        """The fastemb NumPy collection; its tables are the parameters' memory (re-pointed
        there on every access, should a parameter have been replaced)."""
        for bags in self.embedding_bags.values():
            bags.table  # (re-points the NumPy table at the parameter)
        return self._collection

    @property
    def feature_names(self):
        """The features the collection reads, in the order of its output's columns."""
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

    def forward(self, features) -> KeyedArray:
        """Every feature's pooled bags: a KeyedArray of a ``(B, sum of dims)`` tensor."""
        collection = self.collection
        features = as_keyed_jagged(features)
        weights = [bags.weight for bags in self.embedding_bags.values()]
        if torch.is_grad_enabled() and any(weight.requires_grad for weight in weights):
            values = EmbeddingBagCollectionFunction.apply(
                collection, self.fused_optimizer, features, *weights)
        else:
            values = to_tensor(collection(features).values)
            collection._saved = None  # (no backward will come)
        return KeyedArray(collection.feature_names, values, collection._dims)

    def extra_repr(self):
        fused = ("" if self.fused_optimizer is None
                 else f", fused_optimizer={type(self.fused_optimizer).__name__}")
        return f"collection={self._collection!r}{fused}"
