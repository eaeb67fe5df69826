"""Input checks and coercions shared by the functional API, the modules and the optimizers.

Everything here runs before any kernel and before any array is modified. Each check raises with
a message that names the argument, the offending value and, for arrays, its position.
"""

import numbers

import numpy as np

from ._config import threads_for
from ._dtypes import TABLE_DTYPE_NAMES, TABLE_DTYPES
from ._kernels import kernels as _core

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
NATIVE_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
INT64_MAX = np.iinfo(np.int64).max
# The bag modes of the public API and the kernels' names for them.
BAG_MODES = {"sum": _core.BagMode.BAG_SUM, "mean": _core.BagMode.BAG_MEAN,
             "max": _core.BagMode.BAG_MAX}
NO_PADDING = -1  # what the kernels take for "no padding_idx"


def _position(flat_position, shape):
    """Format a flat position as the index a user would type: ``[3]`` or ``[1, 2]``."""
    if len(shape) <= 1:
        return f"[{flat_position}]"
    return "[" + ", ".join(str(i) for i in np.unravel_index(flat_position, shape)) + "]"


def as_index_array(values, name="input"):
    """Return ``values`` as a C-contiguous int32 or int64 array (int32/int64 are not copied
    when already contiguous; other integer dtypes become int64).

    Raises TypeError for non-integer dtypes and IndexError for values that do not fit int64.
    """
    if (type(values) is np.ndarray and values.dtype in NATIVE_INDEX_DTYPES
            and values.flags.c_contiguous):
        return values  # the common case, without the checks below
    if isinstance(values, np.ndarray):
        array = values
    else:
        try:
            array = np.asarray(values)
        except ValueError as error:  # a ragged list
            raise ValueError(f"{name} must be a rectangular array of integers ({error})") from None
    if not isinstance(values, np.ndarray) and array.size == 0:
        array = array.astype(np.int64)  # np.asarray([]) is float64; an empty list is fine
    if (array is not values and array.dtype == object
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                    for v in array.flat)):
        # a list holding Python ints beyond int64 (NumPy keeps them as objects)
        outside = [i for i, v in enumerate(array.flat) if not -INT64_MAX - 1 <= v <= INT64_MAX]
        if outside:
            raise IndexError(f"{name}{_position(outside[0], array.shape)} = "
                             f"{array.flat[outside[0]]} does not fit in int64")
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.dtype.kind == "u" and array.dtype.itemsize == 8 and array.size:
        too_big = np.flatnonzero(array.reshape(-1) > INT64_MAX)
        if too_big.size:
            at = int(too_big[0])
            raise IndexError(
                f"{name}{_position(at, array.shape)} = {array.reshape(-1)[at]} does not fit in int64"
            )
    if array.dtype not in NATIVE_INDEX_DTYPES:
        array = array.astype(np.int64)
    return np.asarray(array, order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)


def check_index_range(flat_indices, shape, num_embeddings, name="input"):
    """Raise IndexError naming the first index outside ``[0, num_embeddings)``."""
    at = _core.first_out_of_range(flat_indices, num_embeddings, threads_for(flat_indices.size))
    if at >= 0:
        raise IndexError(
            f"{name}{_position(at, shape)} = {flat_indices[at]} is out of range for "
            f"num_embeddings={num_embeddings}"
        )


def as_weight(weight, name="weight", reduced_precision=False):
    """Check that ``weight`` is a 2-D float32 or float64 array (with ``reduced_precision``, also
    float16 or bfloat16: the lookups take those); array-likes are converted."""
    if not isinstance(weight, np.ndarray):
        weight = np.asarray(weight)
    if weight.dtype not in (TABLE_DTYPES if reduced_precision else FLOAT_DTYPES):
        names = TABLE_DTYPE_NAMES if reduced_precision else "float32 or float64"
        raise TypeError(f"{name} must be {names}, got dtype {weight.dtype}")
    if weight.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_embeddings, embedding_dim), got shape {weight.shape}")
    return weight


def check_writable_table(weight, name="weight", purpose="max_norm"):
    """Operations that update the table in place need it C-contiguous and writable."""
    if not weight.flags.c_contiguous:
        raise ValueError(f"{purpose} updates {name} in place, so it must be C-contiguous")
    if not weight.flags.writeable:
        raise ValueError(f"{purpose} updates {name} in place, but it is read-only")


def normalize_padding_idx(padding_idx, num_embeddings):
    """Return padding_idx in ``[0, V)`` (negative means ``V + padding_idx``), or None."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral):
        raise TypeError(f"padding_idx must be an int or None, got {padding_idx!r}")
    padding_idx = int(padding_idx)
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"padding_idx = {padding_idx} must lie in [-{num_embeddings}, {num_embeddings - 1}] "
            f"for num_embeddings={num_embeddings}"
        )
    return padding_idx % num_embeddings


def as_count(value, name):
    """A size such as num_embeddings: an int in [0, 2**63) (bools and non-ints are rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= value <= INT64_MAX:
        raise ValueError(f"{name} must be >= 0 (and fit in int64), got {value}")
    return int(value)


def as_real(value, name):
    """A Python float from a real number (bools and non-numbers are rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def bag_bounds(offsets, num_indices, include_last_offset):
    """Validate torch-style offsets fully and return CSR bounds (int64, B + 1 entries).

    Bag b is ``input[bounds[b]:bounds[b+1]]``. Without include_last_offset the last bag runs to
    the end of the input; with it, offsets must end exactly at ``len(input)``.
    """
    bounds = _core.bounds_from_offsets(offsets, num_indices, include_last_offset)
    if bounds is not None:
        return bounds  # valid int32/int64 offsets, checked and copied in one call
    offsets = as_index_array(offsets, "offsets")
    if offsets.ndim != 1:
        raise ValueError(f"offsets must be 1-D, got shape {offsets.shape}")
    offsets = offsets.astype(np.int64, copy=False)
    if include_last_offset:
        if offsets.size == 0:
            raise ValueError("offsets must have at least one entry when include_last_offset=True")
        if offsets[-1] != num_indices:
            raise ValueError(
                f"offsets[{offsets.size - 1}] = {offsets[-1]} must equal len(input) = "
                f"{num_indices} when include_last_offset=True"
            )
        bounds = offsets
    else:
        bounds = np.empty(offsets.size + 1, dtype=np.int64)
        bounds[:-1] = offsets
        bounds[-1] = num_indices
    if offsets.size == 0 or (bounds[0] == 0 and _core.first_decrease(bounds) < 0):
        return bounds  # valid: from 0, non-decreasing, ending at len(input) at most
    if offsets[0] != 0:
        raise ValueError(f"offsets[0] = {offsets[0]} must be 0")
    at = _core.first_decrease(offsets)
    if at >= 0:
        raise ValueError(
            f"offsets must be non-decreasing, but offsets[{at}] = {offsets[at]} < "
            f"offsets[{at - 1}] = {offsets[at - 1]}"
        )
    if offsets[-1] > num_indices:
        raise ValueError(
            f"offsets[{offsets.size - 1}] = {offsets[-1]} is past the end of input "
            f"(len(input) = {num_indices})"
        )
    return bounds


def as_sample_weights(per_sample_weights, input_shape, dtype, also=None):
    """Per-sample weights: same shape as input, in ``dtype`` (the dtype the lookup computes
    in), returned flat.

    An ndarray of another dtype is rejected (no silent rounding), except one of ``also`` (a
    16-bit table's own dtype), which widens exactly; a list is converted.
    """
    if isinstance(per_sample_weights, np.ndarray):
        weights = per_sample_weights
        if also is not None and weights.dtype == also:  # (np.dtype == None compares to float64)
            weights = weights.astype(dtype)
        elif weights.dtype != dtype:
            wanted = dtype if also is None or also == dtype else f"{dtype} or {also}"
            raise TypeError(f"per_sample_weights must have dtype {wanted}, got {weights.dtype}")
    else:
        try:
            weights = np.asarray(per_sample_weights)
        except ValueError as error:  # a ragged list
            raise ValueError(f"per_sample_weights must be a rectangular array ({error})") from None
        if weights.dtype.kind not in "iuf" and weights.size:
            # (np.asarray(..., dtype) would turn None into NaN and parse strings)
            raise TypeError(f"per_sample_weights must hold real numbers, got dtype {weights.dtype}")
        weights = weights.astype(dtype)
    if weights.shape != tuple(input_shape):
        raise ValueError(
            f"per_sample_weights must have the shape of input {tuple(input_shape)}, "
            f"got {weights.shape}"
        )
    return np.ascontiguousarray(weights).reshape(-1)


def check_mode(mode):
    """The bag mode as a plain str (a str subclass such as np.str_ is accepted)."""
    if not isinstance(mode, str) or mode not in BAG_MODES:
        raise ValueError(f"mode must be one of {', '.join(BAG_MODES)}; got {mode!r}")
    return str(mode)


def bag_arguments(input, offsets, mode, per_sample_weights, include_last_offset, padding_idx,
                  num_embeddings, dtype, table_dtype=None):
    """Validate the arguments of an embedding_bag call that say what its bags are, for a table
    of ``num_embeddings`` rows whose per-sample weights have ``dtype`` (or, converted,
    ``table_dtype``: see :func:`as_sample_weights`). Returns ``(mode,
    indices, bounds, sample_weights, padding)``: the mode as a str, the indices (1-D, or 2-D
    with one bag per row), the bags' int64 bounds (see :func:`bag_bounds`), the weights flat
    (or None) and padding_idx in ``[0, V)`` (or None)."""
    mode = check_mode(mode)
    indices = as_index_array(input)
    if indices.ndim == 2:
        if offsets is not None:
            raise ValueError(
                "offsets must be None when input is 2-D (each row of input is one bag)"
            )
        num_bags, bag_size = indices.shape
        bounds = np.arange(num_bags + 1, dtype=np.int64) * bag_size
    elif indices.ndim == 1:
        if offsets is None:
            raise ValueError("offsets is required when input is 1-D")
        bounds = bag_bounds(offsets, indices.size, include_last_offset)
    else:
        raise ValueError(f"input must be 1-D (with offsets) or 2-D, got shape {indices.shape}")
    sample_weights = None
    if per_sample_weights is not None:
        if mode == "max":
            raise ValueError("per_sample_weights is supported with mode 'sum' and 'mean', not 'max'")
        sample_weights = as_sample_weights(per_sample_weights, indices.shape, dtype,
                                           also=table_dtype)
    padding = normalize_padding_idx(padding_idx, num_embeddings)
    return mode, indices, bounds, sample_weights, padding
