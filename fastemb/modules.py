"""``Embedding`` and ``EmbeddingBag``: a weight table plus the options of torch's modules.

A module's forward remembers what its backward needs; ``module.weight`` is a plain NumPy
array that you may read, write or share.

With ``split=True`` the module holds a split float32 table (Kalamkar et al., SC'20,
"split-SGD-BF16"): the top 16 bits of each float32 weight, which are its bfloat16 truncation,
in one array that every forward reads, and the low 16 bits in another that only the optimizers
touch. The forward moves half the bytes of a float32 table (and computes on the truncated
weights, as a bfloat16 table's forward does); an optimizer step updates the float32 weights
that the two halves make, exactly as on a float32 table. ``module.weight`` then gives those
float32 weights (put together in a new array), and assigning to it sets both halves.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._memory import aligned_full, reused_memory
from ._dtypes import TABLE_DTYPE_NAMES, TABLE_DTYPES, bfloat16_dtype
from ._validation import as_real, as_weight, check_mode, normalize_padding_idx
from .backward import bag_grads, lookup_grad
from .functional import NO_PADDING, bag_forward, lookup_forward


def _split(table):
    """A float32 table's split halves: (bfloat16 array of each weight's top 16 bits, uint16
    array of its low 16 bits), both new and cache-line aligned."""
    bits = np.ascontiguousarray(table, dtype=np.float32).view(np.uint32)
    high = aligned_full(bits.shape, 0, bfloat16_dtype())
    low = aligned_full(bits.shape, 0, np.uint16)
    np.right_shift(bits, 16, out=high.view(np.uint16), casting="unsafe")
    np.bitwise_and(bits, 0xFFFF, out=low, casting="unsafe")
    return high, low


def _check_size(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


class _TableModule:
    """What Embedding and EmbeddingBag share: the table, padding, max_norm and gradient."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                 scale_grad_by_freq, dtype, seed, _weight=None, _freeze=False, split=False):
        if split and (np.dtype(dtype if _weight is None else _weight.dtype) != np.float32
                      or max_norm is not None):
            raise ValueError("a split table holds float32 weights (dtype float32) and takes "
                             "no max_norm")
        if _weight is None:
            num_embeddings = _check_size(num_embeddings, "num_embeddings")
            embedding_dim = _check_size(embedding_dim, "embedding_dim")
            dtype = np.dtype(dtype)
            if dtype not in TABLE_DTYPES:
                raise TypeError(f"dtype must be {TABLE_DTYPE_NAMES}, got {dtype}")
        else:
            num_embeddings, embedding_dim = _weight.shape
        self.padding_idx = normalize_padding_idx(padding_idx, num_embeddings)
        self.max_norm = None if max_norm is None else as_real(max_norm, "max_norm")
        self.norm_type = as_real(norm_type, "norm_type")
        self.scale_grad_by_freq = bool(scale_grad_by_freq)
        if _weight is None:
            _weight = aligned_full((num_embeddings, embedding_dim), 0, dtype)
            if TABLE_DTYPES[dtype].half_format is None:
                np.random.default_rng(seed).standard_normal(dtype=dtype, out=_weight)
            else:  # a 16-bit table: float32 draws, rounded to nearest
                _weight[...] = np.random.default_rng(seed).standard_normal(
                    _weight.shape, dtype=np.float32)
            if self.padding_idx is not None:
                _weight[self.padding_idx] = 0
        # what the lookups read (a split table's top halves), and a split table's low halves
        self._table, self._low_halves = _split(_weight) if split else (_weight, None)
        self.frozen = bool(_freeze)
        self.grad = None
        self._saved = None  # what the most recent forward left for its backward

    @property
    def weight(self):
        """The table ``(num_embeddings, embedding_dim)``. A split table's is a new float32
        array of the weights its two halves make."""
        if self._low_halves is None:
            return self._table
        bits = (self._table.view(np.uint16).astype(np.uint32) << 16) | self._low_halves
        return bits.view(np.float32)

    @weight.setter
    def weight(self, table):
        if self._low_halves is None:
            self._table = table
            return
        table = np.asarray(table)
        if table.dtype != np.float32 or table.shape != self._table.shape:
            raise ValueError(f"a split table's weight must be float32 {self._table.shape}, got "
                             f"{table.dtype} {table.shape}")
        high, low = _split(table)
        np.copyto(self._table, high)
        np.copyto(self._low_halves, low)

    @property
    def split(self):
        """True for a split float32 table (see the module docstring)."""
        return self._low_halves is not None

    @property
    def num_embeddings(self):
        return self._table.shape[0]

    @property
    def embedding_dim(self):
        return self._table.shape[1]

    def zero_grad(self):
        """Drop the accumulated gradient (``module.grad`` becomes None)."""
        self.grad = None

    def _saved_forward(self):
        """The saved forward; ``_accumulate`` consumes it, so a second backward for one forward
        is an error, while a backward rejected for bad input may be retried."""
        if self.frozen:
            raise RuntimeError(
                f"{type(self).__name__} is frozen (from_pretrained(freeze=True)); it has no "
                "gradient. Set module.frozen = False to train it."
            )
        if self._saved is None:
            raise RuntimeError(
                "backward needs a forward first: call the module, then backward once per call"
            )
        if self._saved_table != (self._table.shape, self._table.dtype):
            # (the saved forward, e.g. max winners, only fits the table it ran on)
            raise RuntimeError(
                f"module.weight changed from {self._saved_table[1]} {self._saved_table[0]} to "
                f"{self._table.dtype} {self._table.shape} since the forward; run a new forward"
            )
        return self._saved

    def _save(self, saved):
        self._saved = saved
        self._saved_table = (self._table.shape, self._table.dtype)

    def _accumulate(self, grad):
        total = grad if self.grad is None else self.grad + grad  # may raise: change nothing yet
        self._saved = None
        self.grad = total
        return grad

    def _options_repr(self):
        options = [f"{self.num_embeddings}", f"{self.embedding_dim}"]
        for name in ("padding_idx", "max_norm"):
            if getattr(self, name) is not None:
                options.append(f"{name}={getattr(self, name)}")
        if self.max_norm is not None and self.norm_type != 2.0:
            options.append(f"norm_type={self.norm_type}")
        if self.scale_grad_by_freq:
            options.append("scale_grad_by_freq=True")
        if self.split:
            options.append("split=True")
        elif self._table.dtype != np.float32:
            options.append(f"dtype={self._table.dtype}")
        if self.frozen:
            options.append("frozen=True")
        return options

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(self._options_repr())})"


class Embedding(_TableModule):
    """A lookup table: ``module(input)`` returns ``weight[input]`` with shape ``input.shape + (D,)``.

    The weight is initialised N(0, 1) from ``np.random.default_rng(seed)``, with the
    ``padding_idx`` row zeroed. Options follow torch's ``nn.Embedding``; ``dtype`` may also be
    float16 or bfloat16, and ``split=True`` makes a split float32 table (see the module
    docstring).

    >>> import numpy as np, fastemb
    >>> table = fastemb.Embedding(10, 3, seed=0)
    >>> table(np.array([[1, 2], [4, 9]])).shape
    (2, 2, 3)
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, dtype=np.float32, seed=None,
                 split: bool = False) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                         scale_grad_by_freq, dtype, seed, split=split)

    @classmethod
    def from_pretrained(cls, embeddings: np.ndarray, freeze: bool = True,
                        padding_idx: int | None = None, max_norm: float | None = None,
                        norm_type: float = 2.0, scale_grad_by_freq: bool = False) -> Embedding:
        """An Embedding that uses ``embeddings`` (2-D float32/float64) as its weight, without
        copying it; frozen (no gradient) unless ``freeze=False``. The padding row is kept.

        >>> import numpy as np, fastemb
        >>> vectors = np.eye(3, dtype=np.float32)
        >>> fastemb.Embedding.from_pretrained(vectors)([2]).tolist()
        [[0.0, 0.0, 1.0]]
        """
        module = cls.__new__(cls)
        _TableModule.__init__(module, None, None, padding_idx, max_norm, norm_type,
                              scale_grad_by_freq, None, None, _weight=as_weight(embeddings,
                              "embeddings", reduced_precision=True), _freeze=freeze)
        return module

    def __call__(self, input) -> np.ndarray:
        """Look up ``input`` (integer array of any shape); see ``fastemb.embedding``."""
        out, flat = lookup_forward(input, self._table, self.padding_idx, self.max_norm,
                                   self.norm_type)
        with reused_memory():  # a training loop's next copy reuses this one's pages
            self._save((flat.copy(), out.shape))  # private: the caller may reuse its array
        return out

    def backward(self, grad_output):
        """Add the weight gradient of the last forward, given ``grad_output`` (the shape of
        that forward's output), into ``self.grad``; returns this call's SparseGrad.

        >>> import numpy as np, fastemb
        >>> table = fastemb.Embedding(5, 2, seed=0)
        >>> out = table(np.array([[4, 1], [1, 1]]))
        >>> table.backward(np.ones_like(out)).rows.tolist(), table.grad.values[:, 0].tolist()
        ([1, 4], [3.0, 1.0])
        """
        flat, output_shape = self._saved_forward()
        padding = NO_PADDING if self.padding_idx is None else self.padding_idx
        grad_dtype = TABLE_DTYPES[self._table.dtype].compute_dtype
        if getattr(grad_output, "dtype", None) == self._table.dtype != grad_dtype:
            grad_output = grad_output.astype(grad_dtype)  # (a 16-bit table's: widened exactly)
        return self._accumulate(lookup_grad(flat, output_shape, grad_output, grad_dtype,
                                            self.num_embeddings, padding,
                                            self.scale_grad_by_freq))


class EmbeddingBag(_TableModule):
    """Bags of rows reduced by sum, mean or max: ``module(input, offsets, per_sample_weights)``.

    Options follow torch's ``nn.EmbeddingBag``; ``per_sample_weights`` also works with "mean"
    (weighted mean). See ``fastemb.embedding_bag`` for the input forms, and ``Embedding`` for
    ``dtype`` and ``split``.

    >>> import numpy as np, fastemb
    >>> bags = fastemb.EmbeddingBag(100, 8, mode="sum", seed=0)
    >>> bags(np.array([4, 7, 7, 1, 0]), offsets=np.array([0, 3])).shape
    (2, 8)
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str = "mean",
                 padding_idx: int | None = None, max_norm: float | None = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 include_last_offset: bool = False, dtype=np.float32, seed=None,
                 split: bool = False) -> None:
        self._set_bag_options(mode, include_last_offset, scale_grad_by_freq)
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                         scale_grad_by_freq, dtype, seed, split=split)

    def _set_bag_options(self, mode, include_last_offset, scale_grad_by_freq):
        mode = check_mode(mode)
        if mode == "max" and scale_grad_by_freq:
            raise ValueError("mode 'max' does not support scale_grad_by_freq")
        self.mode = mode
        self.include_last_offset = bool(include_last_offset)

    @classmethod
    def from_pretrained(cls, embeddings: np.ndarray, freeze: bool = True, mode: str = "mean",
                        padding_idx: int | None = None, max_norm: float | None = None,
                        norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                        include_last_offset: bool = False) -> EmbeddingBag:
        """An EmbeddingBag that uses ``embeddings`` as its weight, without copying it; frozen
        unless ``freeze=False``.

        >>> import numpy as np, fastemb
        >>> vectors = np.array([[1, 2], [3, 4]], dtype=np.float32)
        >>> fastemb.EmbeddingBag.from_pretrained(vectors, mode="sum")([[0, 1]]).tolist()
        [[4.0, 6.0]]
        """
        module = cls.__new__(cls)
        module._set_bag_options(mode, include_last_offset, scale_grad_by_freq)
        _TableModule.__init__(module, None, None, padding_idx, max_norm, norm_type,
                              scale_grad_by_freq, None, None, _weight=as_weight(embeddings,
                              "embeddings", reduced_precision=True), _freeze=freeze)
        return module

    def __call__(self, input, offsets=None, per_sample_weights=None) -> np.ndarray:
        """Reduce the bags of ``input``; see ``fastemb.embedding_bag``."""
        forward = bag_forward(input, self._table, offsets, self.mode, per_sample_weights,
                              self.include_last_offset, self.padding_idx, self.max_norm,
                              self.norm_type)
        self._save(forward.private_copy())  # the caller may reuse its arrays
        self.per_sample_weights_grad = None
        return forward.output

    def backward(self, grad_output):
        """Add the weight gradient of the last forward, given ``grad_output`` of shape
        ``(B, D)``, into ``self.grad``; returns this call's SparseGrad. With per-sample weights
        it also sets ``self.per_sample_weights_grad`` (the shape of the input).

        >>> import numpy as np, fastemb
        >>> bags = fastemb.EmbeddingBag(5, 2, mode="sum", seed=0)
        >>> out = bags(np.array([[4, 1], [1, 1]]))
        >>> bags.backward(np.ones_like(out)).values[:, 0].tolist()
        [3.0, 1.0]
        """
        forward = self._saved_forward()
        grad, sample_grad = bag_grads(forward, self._table, grad_output, self.scale_grad_by_freq)
        grad = self._accumulate(grad)
        self.per_sample_weights_grad = sample_grad
        return grad

    def _options_repr(self):
        options = super()._options_repr()
        options.insert(2, f"mode={self.mode!r}")
        if self.include_last_offset:
            options.append("include_last_offset=True")
        return options
