"""Row-wise quantized tables for inference: ``fastemb.quantize`` and ``fastemb.QuantizedTable``,
in torch's prepacked byte layout, and the lookups on them that ``fastemb.embedding`` and
``fastemb.embedding_bag`` run when given one.

Each row is stored as integer codes with its own scale and bias, and element j of a row is
``scale * q[j] + bias``, rounded once to float32 (a fused multiply-add, as FBGEMM computes
it): 8 bits store ``D`` byte codes then float32 scale and bias (D + 8 bytes a row, torch's
``embedding_bag_byte_prepack``), 4 bits store two codes a byte (the even element in the low
nibble) then float16 scale and bias (D / 2 + 4 bytes a row, torch's
``embedding_bag_4bit_prepack``). The kernels are in ``fastemb/_quantized.pyx``.
"""

from __future__ import annotations

import numbers

import numpy as np
from numpy.typing import ArrayLike

from ._config import threads_for
from ._kernels import kernels as _core
from ._validation import (
    BAG_MODES,
    NO_PADDING,
    as_index_array,
    as_weight,
    bag_arguments,
    check_index_range,
    normalize_padding_idx,
)

QUANTIZED_BITS = (8, 4)


def _check_bits(bits):
    """bits as an int, 8 or 4."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"bits must be an int (8 or 4), got {bits!r}")
    if bits not in QUANTIZED_BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    return int(bits)


class QuantizedTable:
    """A row-wise quantized embedding table (from :func:`quantize` or
    :meth:`from_prepacked`), accepted as the ``weight`` of ``fastemb.embedding`` and
    ``fastemb.embedding_bag``, whose outputs are float32.

    ``data`` holds the bytes (uint8, shape ``(num_embeddings, row_bytes)``) in torch's
    prepacked layout, so torch's ``quantized.embedding_bag_byte_rowwise_offsets`` /
    ``embedding_bag_4bit_rowwise_offsets`` read the same table. ``shape`` is the logical
    ``(num_embeddings, embedding_dim)``.

    >>> import numpy as np, fastemb
    >>> table = fastemb.quantize(np.array([[0, 255, 3, 100], [-1, 0, 2, 1]], np.float32), bits=8)
    >>> table
    QuantizedTable(num_embeddings=2, embedding_dim=4, bits=8)
    >>> table.data.shape, table.shape
    ((2, 12), (2, 4))
    >>> fastemb.embedding_bag([[0, 1]], table, mode="sum").round(2)
    array([[ -1., 255.,   5., 101.]], dtype=float32)
    """

    def __init__(self, data: np.ndarray, bits: int):
        """Wrap validated bytes; use :func:`quantize` or :meth:`from_prepacked` instead."""
        self.data = data
        self.bits = bits
        code_bytes = data.shape[1] - (8 if bits == 8 else 4)
        self.embedding_dim = code_bytes if bits == 8 else 2 * code_bytes
        self.num_embeddings = data.shape[0]

    @property
    def shape(self) -> tuple:
        """The logical shape ``(num_embeddings, embedding_dim)``."""
        return (self.num_embeddings, self.embedding_dim)

    @classmethod
    def from_prepacked(cls, data: ArrayLike, bits: int) -> QuantizedTable:
        """Wrap bytes made by torch's ``embedding_bag_byte_prepack`` (``bits=8``) or
        ``embedding_bag_4bit_prepack`` (``bits=4``): a 2-D uint8 array (a CPU tensor's
        ``.numpy()``), used without a copy when C-contiguous. A row must hold at least the
        scale and the bias (8 bytes for 8 bits, 4 for 4 bits).

        >>> import numpy as np, fastemb
        >>> packed = fastemb.quantize(np.eye(2, dtype=np.float32), bits=4).data
        >>> fastemb.QuantizedTable.from_prepacked(packed, bits=4).shape
        (2, 2)
        """
        bits = _check_bits(bits)
        array = np.asarray(data)
        if array.dtype != np.uint8:
            raise TypeError(f"prepacked data must be uint8, got dtype {array.dtype}")
        if array.ndim != 2:
            raise ValueError(f"prepacked data must be 2-D (num_embeddings, row_bytes), got shape "
                             f"{array.shape}")
        scale_bias_bytes = 8 if bits == 8 else 4
        if array.shape[1] < scale_bias_bytes:
            raise ValueError(f"a {bits}-bit prepacked row holds at least its scale and bias "
                             f"({scale_bias_bytes} bytes), got rows of {array.shape[1]} bytes")
        return cls(np.ascontiguousarray(array), bits)

    def dequantize(self) -> np.ndarray:
        """The table in float32, ``(num_embeddings, embedding_dim)``: ``scale * q + bias``
        row by row, rounded once (a fused multiply-add).

        >>> import numpy as np, fastemb
        >>> fastemb.quantize(np.array([[0, 15, 3, 7]], np.float32), bits=4).dequantize()
        array([[ 0., 15.,  3.,  7.]], dtype=float32)
        """
        return quantized_embedding(np.arange(self.num_embeddings), self)

    def __repr__(self):
        return (f"QuantizedTable(num_embeddings={self.num_embeddings}, "
                f"embedding_dim={self.embedding_dim}, bits={self.bits})")


def quantize(weight: ArrayLike, bits: int) -> QuantizedTable:
    """Quantize each row of a 2-D float32/float64 table to ``bits`` (8 or 4) bits, as torch's
    ``embedding_bag_byte_prepack`` / ``embedding_bag_4bit_prepack`` do (the same bytes; float64
    is rounded to float32 first).

    8 bits: ``scale = (max - min) / 255``, ``bias = min``, ``q = round((x - min) * 255 /
    (max - min + 1e-8))``. 4 bits: ``bias = float16(min)``, ``scale = float16((max - bias) /
    15)`` (1 for a constant row), ``q = clamp(round((x - bias) / scale), 0, 15)``; it needs an
    even embedding_dim, as torch's does. Rounding is to nearest even; NaN is skipped by the
    min and max.

    >>> import numpy as np, fastemb
    >>> weight = np.array([[0.0, 0.25, 1.0]], np.float32)
    >>> table = fastemb.quantize(weight, bits=8)
    >>> table.data[0, :3]
    array([  0,  64, 255], dtype=uint8)
    >>> bool(np.abs(table.dequantize() - weight).max() <= (1.0 / 255) / 2)
    True
    """
    bits = _check_bits(bits)
    weight = np.ascontiguousarray(as_weight(weight), dtype=np.float32)
    num_embeddings, dim = weight.shape
    if bits == 4 and dim % 2:
        raise ValueError(f"4-bit quantization needs an even embedding_dim (two codes a byte, as "
                         f"torch's embedding_bag_4bit_prepack requires), got {dim}")
    data = np.empty((num_embeddings, _core.quantized_row_bytes(dim, bits)), dtype=np.uint8)
    _core.quantize_rows(weight, bits, data, threads_for(weight.size))
    return QuantizedTable(data, bits)


def _check_no_max_norm(max_norm):
    if max_norm is not None:
        raise ValueError("max_norm is not supported on a quantized table (its rows cannot be "
                         "renormalised in place); renormalise the float table, then quantize it")


def quantized_embedding(input, table, padding_idx=None, max_norm=None):
    """``fastemb.embedding`` on a QuantizedTable: the dequantized rows, float32, shape
    ``input.shape + (D,)``; an index outside ``[0, V)`` is the float path's IndexError."""
    _check_no_max_norm(max_norm)
    indices = as_index_array(input)
    normalize_padding_idx(padding_idx, table.num_embeddings)  # validated; the forward ignores it
    flat = indices.reshape(-1)
    out = _core.empty_reused((flat.size, table.embedding_dim), np.float32)
    out_of_range = _core.gather_quantized(table.data, table.bits, flat, out,
                                          threads_for(out.size))
    if out_of_range:
        check_index_range(flat, indices.shape, table.num_embeddings)
    return out.reshape(indices.shape + (table.embedding_dim,))


def quantized_embedding_bag(input, table, offsets=None, mode="mean", per_sample_weights=None,
                            include_last_offset=False, padding_idx=None, max_norm=None):
    """``fastemb.embedding_bag`` on a QuantizedTable: float32 ``(B, D)``, the float path's
    validation and errors, float32 per-sample weights. The common case runs in one compiled
    call (``quantized_bag_forward_common``, as ``bag_forward_common`` for float tables)."""
    _check_no_max_norm(max_norm)
    out = _core.quantized_bag_forward_common(input, table.data, table.bits, offsets, mode,
                                             per_sample_weights, include_last_offset,
                                             padding_idx)
    if out is not None:
        return out  # (else the call is not the common case, or not valid: see below)
    mode, indices, bounds, sample_weights, padding = bag_arguments(
        input, offsets, mode, per_sample_weights, include_last_offset, padding_idx,
        table.num_embeddings, np.dtype(np.float32))
    flat = indices.reshape(-1)
    out = _core.empty_reused((bounds.size - 1, table.embedding_dim), np.float32)
    out_of_range = _core.quantized_bag_reduce(
        table.data, table.bits, flat, bounds, BAG_MODES[mode], sample_weights,
        NO_PADDING if padding is None else padding, out,
        threads_for(flat.size * table.embedding_dim))
    if out_of_range:
        check_index_range(flat, indices.shape, table.num_embeddings)
    return out
