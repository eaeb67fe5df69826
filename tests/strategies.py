"""Hypothesis strategies (and seeded generators) for random well-formed lookups and bags.

A case is a dict of keyword arguments for ``fastemb.embedding_bag`` (``input``, ``weight``,
``offsets``, ``mode``, ``per_sample_weights``, ``include_last_offset``, ``padding_idx``); the
same dict (with ``input`` renamed) feeds ``reference.embedding_bag_ref``.
"""

import numpy as np
from hypothesis import strategies as st

TABLE_DTYPES = (np.float32, np.float64)
# int32/int64 are used as they are; the others are converted by fastemb.
INDEX_DTYPES = (np.int32, np.int64, np.int8, np.uint16, np.uint64)
MODES = ("sum", "mean", "max")

seeds = st.integers(0, 2**32 - 1)


def random_table(rng, num_embeddings, dim, dtype, kind="normal"):
    """A (V, D) table. ``kind``: "normal" values, "ties" (small integers, so equal values and
    exact sums are common), or "special" (normal values sprinkled with NaN, +-inf and -0.0)."""
    if kind == "ties":
        return rng.integers(-3, 4, size=(num_embeddings, dim)).astype(dtype)
    table = rng.standard_normal((num_embeddings, dim)).astype(dtype)
    if kind == "special" and table.size:
        specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0], dtype=dtype)
        where = rng.random(table.shape) < 0.15
        table[where] = rng.choice(specials, size=int(where.sum()))
    return table


def random_sample_weights(rng, shape, dtype, kind="normal"):
    """Per-sample weights; "signs" gives values in {-1, 0, 0.5, 1} so weight sums hit 0."""
    if kind == "signs":
        return rng.choice(np.array([-1.0, 0.0, 0.5, 1.0]), size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def random_indices(rng, shape, num_embeddings, padding, index_dtype, padding_share=0.0):
    """Valid indices of the given shape and dtype; about ``padding_share`` of them padding."""
    if num_embeddings == 0:
        assert int(np.prod(shape)) == 0
        return np.zeros(shape, dtype=index_dtype)
    values = np.asarray(rng.integers(0, num_embeddings, size=shape))
    if padding is not None and padding_share:
        values[rng.random(shape) < padding_share] = padding
    return np.asarray(values.astype(index_dtype))


def random_offsets(rng, num_indices, num_bags, include_last_offset):
    """Well-formed offsets for ``num_bags`` bags over ``num_indices`` indices (empty bags are
    likely). Zero bags give ``[]`` (or ``[0]`` with include_last_offset, which needs
    num_indices == 0)."""
    if num_bags == 0:
        return np.array([0] if include_last_offset else [], dtype=np.int64)
    cuts = np.sort(rng.integers(0, num_indices + 1, size=num_bags - 1))
    offsets = np.concatenate([[0], cuts])
    if include_last_offset:
        offsets = np.concatenate([offsets, [num_indices]])
    return offsets.astype(np.int64)


@st.composite
def bag_cases(draw, modes=MODES, table_kinds=("normal", "ties", "special"), weights=None,
              table_dtypes=TABLE_DTYPES, index_dtypes=INDEX_DTYPES):
    """A random well-formed embedding_bag call (see the module docstring).

    ``weights``: None lets hypothesis choose whether per-sample weights are given; True/False
    forces it (they are never given with max).
    """
    rng = np.random.default_rng(draw(seeds))
    dtype = np.dtype(draw(st.sampled_from(table_dtypes)))
    index_dtype = np.dtype(draw(st.sampled_from(index_dtypes)))
    mode = draw(st.sampled_from(modes))
    num_embeddings = draw(st.integers(0, 12))
    dim = draw(st.integers(0, 9))
    padding = None
    if num_embeddings and draw(st.booleans()):
        padding = draw(st.integers(-num_embeddings, num_embeddings - 1))
    two_d = draw(st.booleans())
    include_last_offset = False
    if two_d:
        num_bags = draw(st.integers(0, 6))
        length = draw(st.integers(0, 5))
        if num_embeddings == 0:
            length = 0
        shape = (num_bags, length)
        offsets = None
    else:
        num_indices = draw(st.integers(0, 25)) if num_embeddings else 0
        include_last_offset = draw(st.booleans())
        num_bags = draw(st.integers(0, 7))
        if include_last_offset and num_bags == 0:
            num_indices = 0
        shape = (num_indices,)
        offsets = random_offsets(rng, num_indices, num_bags, include_last_offset)
    padding_share = draw(st.sampled_from([0.0, 0.3, 0.9])) if padding is not None else 0.0
    indices = random_indices(
        rng, shape, num_embeddings,
        None if padding is None else padding % num_embeddings, index_dtype, padding_share,
    )
    weight = random_table(rng, num_embeddings, dim, dtype, draw(st.sampled_from(table_kinds)))
    psw = None
    use_weights = draw(st.booleans()) if weights is None else weights
    if mode != "max" and use_weights:
        psw = random_sample_weights(rng, shape, dtype, draw(st.sampled_from(["normal", "signs"])))
    return dict(input=indices, weight=weight, offsets=offsets, mode=mode,
                per_sample_weights=psw, include_last_offset=include_last_offset,
                padding_idx=padding)


def reference_kwargs(case):
    """The case's arguments for ``reference.embedding_bag_ref`` (``input`` -> ``indices``)."""
    kwargs = dict(case)
    kwargs["indices"] = kwargs.pop("input")
    return kwargs


@st.composite
def lookup_cases(draw, table_dtypes=TABLE_DTYPES, index_dtypes=INDEX_DTYPES):
    """A random well-formed embedding call: (indices of 0 to 3 dims, table, padding_idx)."""
    rng = np.random.default_rng(draw(seeds))
    dtype = np.dtype(draw(st.sampled_from(table_dtypes)))
    index_dtype = np.dtype(draw(st.sampled_from(index_dtypes)))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    num_embeddings = draw(st.integers(0 if 0 in shape else 1, 12))
    dim = draw(st.integers(0, 9))
    padding = None
    if num_embeddings and draw(st.booleans()):
        padding = draw(st.integers(-num_embeddings, num_embeddings - 1))
    indices = random_indices(rng, shape, num_embeddings, None, index_dtype)
    weight = random_table(rng, num_embeddings, dim, dtype, draw(st.sampled_from(
        ["normal", "special"])))
    return indices, weight, padding
