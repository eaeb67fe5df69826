"""``Embedding`` and ``EmbeddingBag`` as ``torch.nn.Module``s, around fastemb's NumPy modules.

Each module holds a fastemb NumPy module (``module.table``) and an ``nn.Parameter``
``module.weight`` on the same memory: writing through one is seen by the other. The parameter
is what torch sees (state dicts, ``.to()``, optimizers); if it is replaced (``.double()``,
``load_state_dict(assign=True)``), ``module.table`` follows it.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import modules as numpy_modules
from ..functional import embedding, embedding_bag
from ._arrays import numpy_dtype, to_numpy, to_tensor
from .autograd import (EmbeddingBagFunction, EmbeddingFunction, bag_options, lookup_options,
                       optional_numpy)


def fastemb_optimizer(optimizer_class, tables, hyperparameters):
    """``optimizer_class(tables, **hyperparameters)``, a ``fastemb.optim`` optimizer to fuse
    into a backward; TypeError for a torch optimizer class, which steps after the backward.

    >>> import fastemb
    >>> fastemb_optimizer(fastemb.optim.SGD, fastemb.Embedding(3, 2), {"lr": 0.1})
    ... # doctest: +ELLIPSIS
    SGD(1 modules, lr=0.1, ...)
    """
    if isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer):
        raise TypeError(f"fuse a fastemb.optim optimizer (e.g. fastemb.optim.RowWiseAdagrad), "
                        f"not {optimizer_class.__name__}; a torch optimizer steps the weights "
                        f"after the backward")
    return optimizer_class(tables, **hyperparameters)


class _TableModule(torch.nn.Module):
    """What Embedding and EmbeddingBag share: the NumPy module, the shared weight and the
    fused optimizer."""

    numpy_class = None  # the fastemb NumPy module class wrapped

    def __init__(self, table):
        super().__init__()
        if not isinstance(table, self.numpy_class):
            raise TypeError(f"{type(self).__name__} wraps a fastemb.{self.numpy_class.__name__}, "
                            f"got {type(table).__name__}")
        if table.split:
            raise ValueError("a split table has no single weight array for torch to share; "
                             "wrap a float32 table (split=False)")
        self._numpy_module = table
        self.weight = torch.nn.Parameter(to_tensor(table.weight), requires_grad=not table.frozen)
        self.fused_optimizer = None

    @classmethod
    def from_numpy(cls, table):
        """Wrap an existing fastemb NumPy module; the weight shares its memory (no copy) and
        requires grad unless the module is frozen.

        >>> import fastemb, fastemb.torch
        >>> table = fastemb.EmbeddingBag(10, 4, mode="sum", seed=0)
        >>> bags = fastemb.torch.EmbeddingBag.from_numpy(table)
        >>> bags.weight.data[3] = 7.0
        >>> table.weight[3].tolist()
        [7.0, 7.0, 7.0, 7.0]
        """
        module = cls.__new__(cls)
        _TableModule.__init__(module, table)
        return module

    @property
    def table(self):
        """The fastemb NumPy module; its weight is ``self.weight``'s memory (re-pointed there
        on every access, should the parameter have been replaced)."""
        self._numpy_module.weight = to_numpy(self.weight, "weight")
        return self._numpy_module

    def fuse_optimizer(self, optimizer_class, **hyperparameters):
        """Step the table with ``optimizer_class(self.table, **hyperparameters)`` (a
        ``fastemb.optim`` class) inside every backward, instead of giving ``self.weight`` a
        gradient (TorchRec's "optimizer in backward"); returns that optimizer. Each backward
        through the module is one step. ``module.fused_optimizer = None`` undoes it.

        >>> import torch, fastemb, fastemb.torch
        >>> bags = fastemb.torch.EmbeddingBag(10, 4, mode="sum", seed=0)
        >>> opt = bags.fuse_optimizer(fastemb.optim.RowWiseAdagrad, lr=0.1)
        >>> before = bags.weight.detach().clone()
        >>> bags(torch.tensor([[3, 5]])).sum().backward()
        >>> bags.weight.grad is None, (bags.weight != before).any(dim=1).nonzero().tolist()
        (True, [[3], [5]])
        """
        self.fused_optimizer = fastemb_optimizer(optimizer_class, self.table, hyperparameters)
        return self.fused_optimizer

    def _gradient_needed(self, *inputs):
        """True when autograd records this call: grad mode is on and the weight or one of
        ``inputs`` requires grad."""
        return torch.is_grad_enabled() and (self.weight.requires_grad or any(
            getattr(tensor, "requires_grad", False) for tensor in inputs))

    def extra_repr(self):
        fused = ("" if self.fused_optimizer is None
                 else f", fused_optimizer={type(self.fused_optimizer).__name__}")
        return f"table={self.table!r}{fused}"


class Embedding(_TableModule):
    """``nn.Embedding`` on fastemb's kernels: ``module(input)`` returns the rows of the weight
    at ``input`` (an int32/int64 tensor of any shape), shape ``input.shape + (D,)``.

    Takes ``fastemb.Embedding``'s arguments (``dtype`` may also be a torch dtype); the weight
    is an ``nn.Parameter`` sharing memory with ``module.table``. Its gradient is a coalesced
    sparse COO tensor, unless an optimizer is fused (``fuse_optimizer``).

    >>> import torch, fastemb.torch
    >>> words = fastemb.torch.Embedding(100, 8, padding_idx=0, seed=0)
    >>> words(torch.tensor([[0, 5], [7, 7]])).shape
    torch.Size([2, 2, 8])
    """

    numpy_class = numpy_modules.Embedding

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, dtype=np.float32, seed=None) -> None:
        super().__init__(numpy_modules.Embedding(
            num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
            numpy_dtype(dtype), seed))

    @classmethod
    def from_pretrained(cls, embeddings, freeze: bool = True, padding_idx: int | None = None,
                        max_norm: float | None = None, norm_type: float = 2.0,
                        scale_grad_by_freq: bool = False) -> Embedding:
        """An Embedding whose weight is ``embeddings`` (a 2-D CPU tensor or NumPy array),
        without copying it; frozen (``weight.requires_grad`` False) unless ``freeze=False``.

        >>> import torch, fastemb.torch
        >>> vectors = torch.eye(3)
        >>> fastemb.torch.Embedding.from_pretrained(vectors)(torch.tensor([2])).tolist()
        [[0.0, 0.0, 1.0]]
        """
        if isinstance(embeddings, torch.Tensor):
            embeddings = to_numpy(embeddings, "embeddings")
        return cls.from_numpy(numpy_modules.Embedding.from_pretrained(
            embeddings, freeze, padding_idx, max_norm, norm_type, scale_grad_by_freq))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """The rows at ``input``, ``input.shape + (D,)``, in the weight's dtype."""
        table = self.table
        if self._gradient_needed():
            return EmbeddingFunction.apply(self.weight, table, self.fused_optimizer, input)
        return to_tensor(embedding(to_numpy(input, "input"), table.weight,
                                   **lookup_options(table)))


class EmbeddingBag(_TableModule):
    """``nn.EmbeddingBag`` on fastemb's kernels: ``module(input, offsets=None,
    per_sample_weights=None)`` reduces bags of rows by sum, mean or max.

    Takes ``fastemb.EmbeddingBag``'s arguments (``dtype`` may also be a torch dtype) and
    torch's input forms (1-D ``input`` with ``offsets``, or 2-D ``input``, int32 or int64).
    The weight is an ``nn.Parameter`` sharing memory with ``module.table``; its gradient is a
    coalesced sparse COO tensor (for torch's SparseAdam, SGD or Adagrad), unless an optimizer
    is fused (``fuse_optimizer``). ``per_sample_weights`` that require grad get a gradient.

    >>> import torch, fastemb.torch
    >>> bags = fastemb.torch.EmbeddingBag(100, 8, mode="sum", seed=0)
    >>> bags(torch.tensor([4, 7, 7, 1, 0]), offsets=torch.tensor([0, 3])).shape
    torch.Size([2, 8])
    """

    numpy_class = numpy_modules.EmbeddingBag

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str = "mean",
                 padding_idx: int | None = None, max_norm: float | None = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 include_last_offset: bool = False, dtype=np.float32, seed=None) -> None:
        super().__init__(numpy_modules.EmbeddingBag(
            num_embeddings, embedding_dim, mode, padding_idx, max_norm, norm_type,
            scale_grad_by_freq, include_last_offset, numpy_dtype(dtype), seed))

    @classmethod
    def from_pretrained(cls, embeddings, freeze: bool = True, mode: str = "mean",
                        padding_idx: int | None = None, max_norm: float | None = None,
                        norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                        include_last_offset: bool = False) -> EmbeddingBag:
        """An EmbeddingBag whose weight is ``embeddings`` (a 2-D CPU tensor or NumPy array),
        without copying it; frozen unless ``freeze=False``.

        >>> import torch, fastemb.torch
        >>> vectors = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> bags = fastemb.torch.EmbeddingBag.from_pretrained(vectors, mode="sum")
        >>> bags(torch.tensor([[0, 1]])).tolist()
        [[4.0, 6.0]]
        """
        if isinstance(embeddings, torch.Tensor):
            embeddings = to_numpy(embeddings, "embeddings")
        return cls.from_numpy(numpy_modules.EmbeddingBag.from_pretrained(
            embeddings, freeze, mode, padding_idx, max_norm, norm_type, scale_grad_by_freq,
            include_last_offset))

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(B, D)`` bags of ``input`` (float32 for a 16-bit table)."""
        table = self.table
        if self._gradient_needed(per_sample_weights):
            return EmbeddingBagFunction.apply(self.weight, table, self.fused_optimizer, input,
                                              offsets, per_sample_weights)
        return to_tensor(embedding_bag(
            to_numpy(input, "input"), table.weight, optional_numpy(offsets, "offsets"),
            per_sample_weights=optional_numpy(per_sample_weights, "per_sample_weights"),
            **bag_options(table)))
