"""Jagged inputs and keyed outputs of the collections, in TorchRec's layouts.

``KeyedJaggedArray`` holds one batch of several sparse features (TorchRec's
``KeyedJaggedTensor``): for K keys and a batch of B samples, ``lengths[k * B + b]`` values of
``values`` belong to key k, sample b, stored key by key and, within a key, sample by sample.
``JaggedArray`` is one feature's unpooled rows (TorchRec's ``JaggedTensor``), and
``KeyedArray`` is a collection's pooled output (TorchRec's ``KeyedTensor``): one ``(B, C)``
array whose columns hold each key's embedding side by side.
"""

from __future__ import annotations

import numpy as np

from ._validation import as_index_array, as_sample_weights, bag_bounds


def _as_keys(keys):
    """The keys as a list of distinct strs."""
    if isinstance(keys, str):
        raise TypeError(f"keys must be a list of str, got the str {keys!r}")
    keys = list(keys)
    for position, key in enumerate(keys):
        if not isinstance(key, str):
            raise TypeError(f"keys[{position}] must be a str, got {key!r}")
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"keys must be distinct, but {duplicate!r} appears twice")
    return [str(key) for key in keys]


class KeyedJaggedArray:
    """A batch of B samples of several sparse features, TorchRec's ``KeyedJaggedTensor`` on
    NumPy arrays: ``values`` holds key 0's values for samples 0..B-1, then key 1's, and so on;
    ``lengths`` (K * B counts) or ``offsets`` (K * B + 1 positions from 0 to ``len(values)``)
    says where each (key, sample) starts. ``weights`` (float32/float64, one per value) is
    optional. Everything is validated here, before any lookup.

    >>> import fastemb
    >>> features = fastemb.KeyedJaggedArray(["user", "genres"], values=[7, 1, 4, 9],
    ...                                     lengths=[1, 1, 2, 0])
    >>> features.batch_size, features.offsets.tolist()
    (2, [0, 1, 2, 4, 4])
    >>> features["genres"][0].tolist(), features["genres"][1].tolist()
    ([4, 9], [0, 2, 2])
    """

    def __init__(self, keys, values, lengths=None, offsets=None, weights=None):
        self.keys = _as_keys(keys)
        self.values = as_index_array(values, "values")
        if self.values.ndim != 1:
            raise ValueError(f"values must be 1-D, got shape {self.values.shape}")
        if (lengths is None) == (offsets is None):
            raise ValueError("give exactly one of lengths and offsets")
        if lengths is not None:
            lengths = as_index_array(lengths, "lengths")
            if lengths.ndim != 1:
                raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
            negative = np.flatnonzero(lengths < 0)
            if negative.size:
                raise ValueError(f"lengths[{negative[0]}] = {lengths[negative[0]]} is negative")
            total = int(lengths.sum(dtype=np.int64)) if lengths.size else 0
            if total != self.values.size:
                raise ValueError(f"lengths add up to {total}, but values has "
                                 f"{self.values.size} entries")
            self.offsets = np.zeros(lengths.size + 1, dtype=np.int64)
            np.cumsum(lengths, out=self.offsets[1:])
        else:
            self.offsets = bag_bounds(offsets, self.values.size, include_last_offset=True)
        num_slots = self.offsets.size - 1
        if self.keys and num_slots % len(self.keys):
            raise ValueError(f"{num_slots} lengths do not split into {len(self.keys)} keys of "
                             f"one batch each")
        if not self.keys and num_slots:
            raise ValueError(f"{num_slots} lengths but no keys")
        self.batch_size = num_slots // len(self.keys) if self.keys else 0
        self.weights = None
        if weights is not None:
            weights = np.asarray(weights)
            dtype = weights.dtype if weights.dtype in (np.float32, np.float64) else np.float32
            self.weights = as_sample_weights(weights, self.values.shape, dtype)

    @property
    def lengths(self):
        """How many values each (key, sample) has: K * B counts (int64)."""
        return np.diff(self.offsets)

    def key_bounds(self, key):
        """The first and last position of ``values`` that ``key`` holds."""
        k = self.keys.index(key)
        return int(self.offsets[k * self.batch_size]), int(self.offsets[(k + 1) * self.batch_size])

    def __getitem__(self, key):
        """``(values, offsets, weights)`` of one key: its values, the B + 1 offsets of its
        samples from 0, and its weights (None without)."""
        if key not in self.keys:
            raise KeyError(f"no key {key!r}; the keys are {self.keys}")
        start, end = self.key_bounds(key)
        k = self.keys.index(key)
        offsets = self.offsets[k * self.batch_size:(k + 1) * self.batch_size + 1] - start
        weights = None if self.weights is None else self.weights[start:end]
        return self.values[start:end], offsets, weights

    def __repr__(self):
        return (f"KeyedJaggedArray(keys={self.keys}, batch_size={self.batch_size}, "
                f"values={self.values.size}{', weighted' if self.weights is not None else ''})")


class JaggedArray:
    """One feature's unpooled rows (TorchRec's ``JaggedTensor``): ``values`` is ``(n, D)``, and
    sample b's rows are ``values[offsets[b]:offsets[b + 1]]``.

    >>> import numpy as np, fastemb
    >>> rows = fastemb.JaggedArray(np.arange(6.0).reshape(3, 2), np.array([0, 2, 2, 3]))
    >>> rows[0].tolist(), rows.lengths.tolist()
    ([[0.0, 1.0], [2.0, 3.0]], [2, 0, 1])
    """

    def __init__(self, values, offsets):
        self.values = values
        self.offsets = offsets

    @property
    def lengths(self):
        """How many rows each sample has."""
        return np.diff(self.offsets)

    def __getitem__(self, sample):
        """Sample ``sample``'s rows (a view of ``values``)."""
        return self.values[self.offsets[sample]:self.offsets[sample + 1]]

    def __len__(self):
        return self.offsets.size - 1

    def __repr__(self):
        return f"JaggedArray(values={self.values.dtype} {self.values.shape}, samples={len(self)})"


class KeyedArray:
    """A collection's pooled output (TorchRec's ``KeyedTensor``): ``values`` is ``(B, C)``, and
    key ``keys[i]`` holds the columns ``offset_per_key[i]:offset_per_key[i + 1]``.

    >>> import numpy as np, fastemb
    >>> out = fastemb.KeyedArray(["a", "b"], np.arange(6.0).reshape(2, 3), [1, 2])
    >>> out["b"].tolist(), out.offset_per_key
    ([[1.0, 2.0], [4.0, 5.0]], [0, 1, 3])
    """

    def __init__(self, keys, values, length_per_key):
        self.keys = _as_keys(keys)
        self.values = values
        self.length_per_key = [int(length) for length in length_per_key]
        if len(self.length_per_key) != len(self.keys):
            raise ValueError("length_per_key needs one entry per key")
        self.offset_per_key = np.concatenate([[0], np.cumsum(self.length_per_key)]).astype(
            int).tolist()
        if values.ndim != 2 or values.shape[1] != self.offset_per_key[-1]:
            raise ValueError(f"values must be (B, {self.offset_per_key[-1]}), got "
                             f"{values.shape}")

    def __getitem__(self, key):
        """The ``(B, D)`` columns of one key (a view of ``values``)."""
        if key not in self.keys:
            raise KeyError(f"no key {key!r}; the keys are {self.keys}")
        i = self.keys.index(key)
        return self.values[:, self.offset_per_key[i]:self.offset_per_key[i + 1]]

    def to_dict(self):
        """``{key: (B, D) view}`` for every key."""
        return {key: self[key] for key in self.keys}

    def __repr__(self):
        return f"KeyedArray(keys={self.keys}, values={self.values.dtype} {self.values.shape})"
