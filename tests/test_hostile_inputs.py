"""Hostile input never crashes: every public entry point, fuzzed with hypothesis.

Each case builds arguments of which none, one or two are hostile (indices at and past both
ends, int64 extremes, uint64 beyond int64, every dtype, non-contiguous, Fortran-ordered,
read-only, broadcast and memory-mapped arrays, bad offsets, NaN and inf, wrong shapes, wrong
types). An oracle written from the API contract, not from the implementation, works out which
exceptions the arguments call for:

- none: the call must succeed and equal the NumPy reference (``reference.py``,
  ``reference_training.py``) bit for bit, leaving every argument except a max_norm table
  unchanged;
- some: the call must raise one of them (where several problems meet, the contract does not say
  which is reported first) and leave every array argument byte for byte as it was.

``COUNTS`` records how many cases each entry point ran and how they ended;
``test_zz_case_counts`` (last in the file) prints the totals (and writes them as JSON to
``$FASTEMB_FUZZ_REPORT`` when that is set) and checks that each fuzz test ran both valid and
hostile cases. The number of examples scales with the hypothesis profile
(``HYPOTHESIS_PROFILE=thorough`` runs 10x as many).

Then: checkpoint files (truncated at many lengths, every byte flipped, random damage, foreign
files: ValueError, nothing changed, never a wrong table); the atheris target
``fuzz/fuzz_api.py`` (replayed on random bytes, and run briefly under atheris when installed);
and the private kernels called directly with inconsistent arrays in a child process, on arrays
that sit against inaccessible pages (crash isolation).
"""

import collections
import io
import json
import math
import numbers
import os
import re
import zipfile

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st
from reference import assert_same_bits, embedding_bag_ref, embedding_ref, renorm_ref
from reference_training import (
    adagrad_step_ref,
    bag_grad_ref,
    embedding_grad_ref,
    lazy_adam_step_ref,
    psw_grad_ref,
    rowwise_adagrad_step_ref,
    sgd_step_ref,
)

import fastemb

COUNTS = collections.Counter()  # (entry point, "matched" | "rejected") -> cases
MINIMUM_SHARE = 0.08  # each fuzz test must run at least this share of each kind of case


def examples(factor):
    """``factor`` times the profile's example count (120 by default, 1200 when thorough)."""
    return settings.default.max_examples * factor


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
seeds = st.integers(0, 2**32 - 1)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder for memory-mapped arrays and checkpoint files (module-scoped: hypothesis)."""
    folder = tmp_path_factory.mktemp("hostile")
    counter = iter(range(10**9))
    return lambda suffix=".bin": folder / f"{next(counter)}{suffix}"


# --------------------------------------------------------------------------------------------
# The check every case goes through
# --------------------------------------------------------------------------------------------


def _array_arguments(values):
    """Every ndarray among the arguments (one level into lists, tuples and dicts)."""
    found = []
    for value in values:
        if isinstance(value, np.ndarray):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += [v for v in value if isinstance(v, np.ndarray)]
        elif isinstance(value, dict):
            found += _array_arguments(list(value.values()))
    return found


def _same_bytes(array, saved):
    return (array.dtype == saved.dtype and array.shape == saved.shape
            and np.asarray(array).tobytes() == saved.tobytes())


def run_case(entry, errors, call, arguments, check_result, may_change=()):
    """Run ``call()`` and check it against the oracle's ``errors`` (a set of exception types;
    empty when the arguments are valid). ``arguments`` are copied before the call and compared
    after it (all of them when it raised; all but ``may_change`` when it succeeded)."""
    arrays = _array_arguments(arguments)
    saved = [(a, np.array(a, copy=True)) for a in arrays]
    note(f"{entry}: expecting {sorted(e.__name__ for e in errors) or 'success'} from "
         f"{arguments!r}")
    try:
        result = call()
    except Exception as error:  # noqa: BLE001 - the point is to look at any exception
        if not errors:
            raise AssertionError(f"{entry} rejected valid input: {error!r}") from error
        if not isinstance(error, tuple(errors)):
            raise AssertionError(
                f"{entry} raised {type(error).__name__}({error}), expected one of "
                f"{sorted(e.__name__ for e in errors)}") from error
        for number, (array, copy) in enumerate(saved):
            assert _same_bytes(array, copy), f"{entry} modified argument {number} and raised"
        COUNTS[entry, "rejected"] += 1
        return None
    assert not errors, (f"{entry} accepted input that calls for "
                        f"{sorted(e.__name__ for e in errors)}")
    for number, (array, copy) in enumerate(saved):
        if not any(array is other for other in may_change):
            assert _same_bytes(array, copy), f"{entry} modified argument {number}"
    with np.errstate(all="ignore"):  # the references meet NaN and inf on purpose
        check_result(result)
    COUNTS[entry, "matched"] += 1
    return result


# --------------------------------------------------------------------------------------------
# The oracle: which exceptions the contract calls for
# --------------------------------------------------------------------------------------------


def index_oracle(value, num_embeddings):
    """(errors, int64 values): the errors an index argument calls for, or its values.

    Integer dtypes are accepted; float, bool, complex, object, str and datetime arrays are a
    TypeError; an array-like is converted by NumPy (a ragged list is a ValueError, a list of
    Python ints keeps their values); a value that does not fit int64 or lies outside
    ``[0, num_embeddings)`` is an IndexError (no range when num_embeddings is None).
    """
    if isinstance(value, np.ndarray):
        array = value
        if array.dtype.kind not in "iu":
            return {TypeError}, None
    else:
        try:
            array = np.asarray(value)
        except ValueError:
            return {ValueError}, None
        if array.size == 0:
            return set(), np.zeros(array.shape, np.int64)
        if array.dtype == object:
            if not all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
                       for v in array.flat):
                return {TypeError}, None
        elif array.dtype.kind not in "iu":
            return {TypeError}, None
    values = [int(v) for v in array.flat]
    if any(not INT64_MIN <= v <= INT64_MAX for v in values):
        return {IndexError}, None
    if num_embeddings is not None and any(not 0 <= v < num_embeddings for v in values):
        return {IndexError}, None
    return set(), np.array(values, dtype=np.int64).reshape(array.shape)


def shape_of(value):
    """The shape an array-like argument has (None when NumPy cannot make one array of it)."""
    try:
        return np.shape(value)
    except ValueError:
        return None


def weight_oracle(weight):
    """(errors, array): a table must be a 2-D float32 or float64 array (array-likes converted)."""
    try:
        array = weight if isinstance(weight, np.ndarray) else np.asarray(weight)
    except ValueError:
        return {ValueError}, None
    errors = set()
    if array.dtype not in FLOATS:
        errors.add(TypeError)
    if array.ndim != 2:
        errors.add(ValueError)
    return errors, (None if errors else array)


def padding_oracle(padding_idx, num_embeddings):
    if padding_idx is None:
        return set()
    if isinstance(padding_idx, (bool, np.bool_)) or not isinstance(padding_idx, numbers.Integral):
        return {TypeError}
    if num_embeddings is not None and not -num_embeddings <= padding_idx < num_embeddings:
        return {ValueError}
    return set()


def is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def max_norm_oracle(max_norm, norm_type, weight):
    """max_norm and norm_type must be real numbers; the table must be writable C-contiguous."""
    if max_norm is None:
        return set()
    errors = set()
    if not is_real(max_norm) or not is_real(norm_type):
        errors.add(TypeError)
    if isinstance(weight, np.ndarray) and not (weight.flags.c_contiguous
                                               and weight.flags.writeable):
        errors.add(ValueError)
    return errors


def count_oracle(value):
    """A size (num_embeddings): an int >= 0 that fits in int64."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        return {TypeError}
    if not 0 <= value <= INT64_MAX:
        return {ValueError}
    return set()


def offsets_oracle(offsets, num_indices, include_last_offset):
    """(errors, int64 offsets) for offsets of a 1-D input of num_indices entries."""
    errors, values = index_oracle(offsets, None)
    if errors:
        return errors, None
    if values.ndim != 1:
        return {ValueError}, None
    values = [int(v) for v in values]
    if include_last_offset and (not values or values[-1] != num_indices):
        return {ValueError}, None
    if values and (values[0] != 0 or any(b < a for a, b in zip(values, values[1:]))
                   or values[-1] > num_indices):
        return {ValueError}, None
    return set(), np.array(values, dtype=np.int64)


def sample_weights_oracle(psw, input_shape, dtype):
    """(errors, array) for per_sample_weights: the table's dtype (an array-like of real numbers
    is converted) and the input's shape."""
    if isinstance(psw, np.ndarray):
        errors = set()
        if dtype is not None and psw.dtype != dtype:
            errors.add(TypeError)
        if input_shape is not None and psw.shape != tuple(input_shape):
            errors.add(ValueError)
        return errors, (None if errors else psw)
    try:
        array = np.asarray(psw)
    except ValueError:
        return {ValueError}, None
    errors = set()
    if array.size and array.dtype.kind not in "iuf":
        errors.add(TypeError)
    if input_shape is not None and array.shape != tuple(input_shape):
        errors.add(ValueError)
    if errors or dtype is None:
        return errors, None
    return set(), array.astype(dtype)


# --------------------------------------------------------------------------------------------
# Hostile argument makers. Each draws from ``data`` and builds with a seeded NumPy generator.
# --------------------------------------------------------------------------------------------

INDEX_DTYPES = [np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8,
                                      np.uint16, np.uint32, np.uint64)]
INDEX_DTYPES += [np.dtype(">i8"), np.dtype(">u4"), np.dtype("<i2")]


def _hostile_values(dtype, num_embeddings):
    """Values at and past both ends of [0, V) and of the dtype, that the dtype can hold."""
    info = np.iinfo(dtype)
    candidates = [-1, num_embeddings, num_embeddings + 1, num_embeddings + 1000, info.min,
                  info.max, 2**31 - 1, 2**31, -(2**31), 2**32, 2**63, 2**64 - 1, INT64_MIN,
                  INT64_MAX, -128, 255]
    return [v for v in candidates if info.min <= v <= info.max]


def place(array, layout, scratch):
    """The same values in another layout: C, strided view, Fortran, reversed, read-only,
    broadcast (stride 0), or a read-only / writable memory map."""
    if layout == "C" or (layout.startswith("memmap") and array.size == 0):
        return array
    if layout == "strided":
        base = np.zeros(array.shape + (2,), array.dtype)
        base[..., 1] = array
        return base[..., 1]
    if layout == "fortran":
        return np.asfortranarray(array)
    if layout == "reversed":
        if array.ndim == 0:
            return array
        return np.ascontiguousarray(array[::-1])[::-1]
    if layout == "readonly":
        array = array.copy()
        array.flags.writeable = False
        return array
    if layout == "broadcast":  # every row the same: stride 0, read-only
        if array.ndim == 0 or array.shape[0] == 0:
            return array
        return np.broadcast_to(array[:1], array.shape)
    path = scratch()
    np.ascontiguousarray(array).tofile(path)
    mode = "r" if layout == "memmap_r" else "r+"
    return np.memmap(path, dtype=array.dtype, mode=mode, shape=array.shape)


INDEX_LAYOUTS = ["C", "C", "strided", "fortran", "reversed", "readonly", "broadcast",
                 "memmap_r"]
BAD_INDEX_DTYPES = ["?", "f2", "f4", "f8", "c8", "c16", "O", "U2", "S2", "M8[D]", "m8[s]", "V8"]


def hostile_targets(data, names):
    """Which arguments of a case are hostile: none about half the time (a valid call), else
    one, sometimes two of ``names``."""
    if data.draw(st.booleans(), label="all valid"):
        return set()
    return data.draw(st.sets(st.sampled_from(names), min_size=1, max_size=2),
                     label="hostile arguments")


def draw_indices(data, rng, num_embeddings, shape, scratch, hostile=False):
    """An index argument. Valid: any integer dtype and layout, or a list. Hostile: values at
    and past both ends, a wrong dtype, or a Python object that is no index array."""
    kind = data.draw(st.sampled_from(["values", "values", "dtype", "python"] if hostile
                                     else ["valid"] * 4 + ["list"]), label="index kind")
    size = int(np.prod(shape))
    if kind == "list":
        values = rng.integers(0, max(num_embeddings, 1), size=shape).tolist()
        return data.draw(st.sampled_from([values, tuple(values) if isinstance(values, list)
                                          else values]), label="list or tuple")
    if kind in ("valid", "values"):
        dtype = data.draw(st.sampled_from(INDEX_DTYPES), label="index dtype")
        high = max(min(num_embeddings, int(np.iinfo(dtype).max) + 1), 1)
        array = rng.integers(0, high, size=shape).astype(dtype)
        if kind == "values" and size:
            pool = _hostile_values(dtype, num_embeddings)
            for _ in range(data.draw(st.integers(1, 3), label="hostile count")):
                at = data.draw(st.integers(0, size - 1), label="at")
                array.reshape(-1)[at] = data.draw(st.sampled_from(pool), label="hostile value")
        layout = data.draw(st.sampled_from(INDEX_LAYOUTS), label="index layout")
        return place(array, layout, scratch)
    if kind == "dtype":
        dtype = data.draw(st.sampled_from(BAD_INDEX_DTYPES), label="bad index dtype")
        values = rng.integers(0, max(num_embeddings, 1), size=shape)
        if dtype == "O" and data.draw(st.booleans(), label="object holds None"):
            array = np.full(shape, None, dtype=object)
        else:
            array = values.astype(dtype)
        return place(array, data.draw(st.sampled_from(["C", "strided", "readonly"])), scratch)
    choice = data.draw(st.sampled_from([
        "int", "big", "negative big", "float", "none", "str", "ragged", "float list",
        "bool list", "uint64 list", "set", "dict"]), label="python index")
    return {
        "int": int(rng.integers(-1, num_embeddings + 1)), "big": [0, 2**64 + 3],
        "negative big": [-(2**70), 0], "float": 1.0, "none": None, "str": "1",
        "ragged": [[0], [0, 1]], "float list": [0, 1.5], "bool list": [True, False],
        "uint64 list": [np.uint64(2**64 - 1)], "set": {0, 1}, "dict": {0: 1},
    }[choice]


def random_table(rng, num_embeddings, dim, dtype, kind):
    if kind == "ties":
        return rng.integers(-3, 4, size=(num_embeddings, dim)).astype(dtype)
    table = (rng.standard_normal((num_embeddings, dim)) * 3).astype(dtype)
    if kind == "special" and table.size:
        specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0], dtype=dtype)
        where = rng.random(table.shape) < 0.2
        table[where] = rng.choice(specials, size=int(where.sum()))
    return table


WEIGHT_LAYOUTS = ["C", "C", "C", "strided", "fortran", "reversed", "readonly", "broadcast",
                  "memmap_r", "memmap_rw", "list"]
BAD_WEIGHTS = ["f2", "i4", "i8", "?", "c8", "O", "U3", "M8[D]", ">f4", "1-D", "3-D", "0-d",
               "none", "scalar", "ragged", "1-D f16"]


def draw_weight(data, rng, num_embeddings, dim, scratch, hostile=False, dtype=None):
    """A table. Valid: float32/64 in any layout (C, strided, Fortran, reversed, read-only,
    broadcast, memory-mapped, a nested list), maybe with NaN/inf. Hostile: a wrong dtype, ndim
    or type."""
    if dtype is None:
        dtype = data.draw(st.sampled_from(FLOATS), label="table dtype")
    kind = data.draw(st.sampled_from(["normal", "ties", "special"]), label="table values")
    table = random_table(rng, num_embeddings, dim, dtype, kind)
    if hostile:
        bad = data.draw(st.sampled_from(BAD_WEIGHTS), label="bad table")
        if bad == "1-D":
            return table.reshape(-1)
        if bad == "3-D":
            return table.reshape(table.shape + (1,))
        if bad == "0-d":
            return np.array(1.5, dtype)
        if bad == "none":
            return None
        if bad == "scalar":
            return 2.0
        if bad == "ragged":
            return [[1.0, 2.0], [3.0]]
        if bad == "1-D f16":
            return table.reshape(-1).astype(np.float16)
        with np.errstate(invalid="ignore"):
            return table.astype(bad)
    layout = data.draw(st.sampled_from(WEIGHT_LAYOUTS), label="table layout")
    if layout == "list":
        return table.tolist() if table.size else table
    return place(table, layout, scratch)


def draw_padding(data, num_embeddings, hostile=False):
    if not hostile:
        choice = data.draw(st.sampled_from(["none", "none", "valid", "numpy"]), label="padding")
        if choice == "none" or num_embeddings == 0:
            return None
        value = data.draw(st.integers(-num_embeddings, num_embeddings - 1), label="padding")
        return np.int64(value) if choice == "numpy" else value
    choice = data.draw(st.sampled_from(["V", "-V-1", "huge", "float", "str", "bool"]),
                       label="bad padding_idx")
    return {"V": num_embeddings, "-V-1": -num_embeddings - 1, "huge": 2**70, "float": 1.0,
            "str": "0", "bool": True}[choice]


def draw_max_norm(data, hostile=False):
    """(max_norm, norm_type): valid reals (or None), or hostile types."""
    if not hostile:
        max_norm = data.draw(st.sampled_from([None] * 4 + [
            1.0, 2.5, 0.5, np.float32(2.0), 0.0, float("nan"), float("inf"), 3]),
            label="max_norm")
        norm_type = data.draw(st.sampled_from([2.0] * 3 + [1, 3.0, float("inf"), 0.5, 0.0,
                                              np.float64(2.0)]), label="norm_type")
        return max_norm, norm_type
    if data.draw(st.booleans(), label="bad max_norm"):
        return data.draw(st.sampled_from(["1", True, [1.0], 1j, np.array([1.0])])), 2.0
    return 1.0, data.draw(st.sampled_from([None, "2", False, [2.0]]), label="bad norm_type")


def draw_grad(data, rng, shape, dtype, hostile=False, label="grad_output"):
    """A gradient for an output of ``shape``. Valid: the right shape and dtype in any layout,
    maybe with NaN/inf. Hostile: a wrong dtype, shape or type."""
    choice = data.draw(st.sampled_from(
        ["list", "other float", "f16", "int", "complex", "short", "long", "extra dim", "none",
         "scalar"] if hostile else ["right"] * 3 + ["special", "non-contiguous", "readonly"]),
        label=label)
    grad = rng.standard_normal(shape).astype(dtype if dtype is not None else np.float32)
    if choice == "special" and grad.size:
        grad.reshape(-1)[rng.integers(0, grad.size)] = rng.choice([np.nan, np.inf, -np.inf])
    if choice == "non-contiguous":
        return place(grad, "strided", None)
    if choice == "readonly":
        return place(grad, "readonly", None)
    if choice == "list":
        return grad.tolist()  # float64 (int64 when empty): right only for a float64 table
    if choice == "other float":
        return grad.astype(np.float64 if grad.dtype == np.float32 else np.float32)
    if choice in ("f16", "int", "complex"):
        return grad.astype({"f16": np.float16, "int": np.int64, "complex": np.complex64}[choice])
    if choice == "short" and grad.ndim:
        return grad[:-1] if grad.shape[0] else np.zeros((1,) + grad.shape[1:], grad.dtype)
    if choice == "long" and grad.ndim:
        return np.concatenate([grad, grad[:1] if grad.shape[0] else np.zeros(
            (1,) + grad.shape[1:], grad.dtype)])
    if choice == "extra dim":
        return grad[None]
    if choice == "none":
        return None
    if choice == "scalar":
        return 1.0
    return grad


def grad_oracle(grad, shape, dtype):
    """grad_output must have the forward output's shape and the table's dtype: ValueError."""
    try:
        array = np.asarray(grad)
    except ValueError:
        return {ValueError}
    if dtype is None or array.dtype != dtype or array.shape != tuple(shape):
        return {ValueError}
    return set()


def same_gradient(grad, rows, values, num_embeddings, dtype):
    assert isinstance(grad, fastemb.SparseGrad)
    assert grad.rows.dtype == np.int64
    np.testing.assert_array_equal(grad.rows, rows)
    assert grad.num_embeddings == num_embeddings and grad.dtype == dtype
    assert grad.shape == (num_embeddings, values.shape[1])
    assert_same_bits(grad.values, values)


# --------------------------------------------------------------------------------------------
# fastemb.embedding
# --------------------------------------------------------------------------------------------

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@settings(max_examples=examples(6))
@given(data=st.data(), seed=seeds)
def test_embedding_fuzz(scratch, data, seed):
    rng = np.random.default_rng(seed)
    num_embeddings, dim = data.draw(st.integers(0, 8)), data.draw(st.integers(0, 5))
    hostile = hostile_targets(data, ["weight", "input", "padding_idx", "max_norm"])
    weight = draw_weight(data, rng, num_embeddings, dim, scratch, "weight" in hostile)
    indices = draw_indices(data, rng, num_embeddings, data.draw(shapes), scratch,
                           "input" in hostile)
    padding_idx = draw_padding(data, num_embeddings, "padding_idx" in hostile)
    max_norm, norm_type = draw_max_norm(data, "max_norm" in hostile)

    weight_errors, table = weight_oracle(weight)
    known_rows = None if weight_errors else table.shape[0]
    index_errors, values = index_oracle(indices, known_rows)
    errors = (weight_errors | index_errors | padding_oracle(padding_idx, known_rows)
              | max_norm_oracle(max_norm, norm_type, weight))
    before = None if errors else np.array(table, copy=True)

    def check(out):
        expected_table = before
        if max_norm is not None:
            # (as floats: NumPy would compare a float64 norm with an np.float32 max_norm in
            # float32; fastemb takes max_norm as a Python float)
            expected_table = renorm_ref(before, values, float(max_norm), float(norm_type))
            if isinstance(weight, np.ndarray):
                assert_same_bits(weight, expected_table)
        assert_same_bits(out, embedding_ref(values, expected_table))

    run_case("embedding", errors,
             lambda: fastemb.embedding(indices, weight, padding_idx, max_norm, norm_type),
             [weight, indices], check, may_change=[weight])


# --------------------------------------------------------------------------------------------
# fastemb.embedding_bag (and embedding_bag_backward on the same arguments)
# --------------------------------------------------------------------------------------------

MODES = ["sum", "mean", "max"]
BAD_MODES = ["SUM", "", None, 1, ["sum"], "min", b"sum", np.array("sum")]


def draw_offsets(data, rng, num_indices, include_last_offset, scratch, hostile=False):
    """Offsets for a 1-D input. Valid: well-formed, any integer dtype and layout, or a list.
    Hostile: unsorted, negative, not starting at 0, past the end, empty or too short (with
    include_last_offset), 2-D, float, bool, object, uint64 beyond int64, int64 extremes, None."""
    num_bags = data.draw(st.integers(0, 5), label="bags")
    cuts = np.sort(rng.integers(0, num_indices + 1, size=max(num_bags - 1, 0)))
    offsets = np.concatenate([[0], cuts]) if num_bags else np.zeros(0, np.int64)
    if include_last_offset:
        offsets = np.concatenate([offsets, [num_indices]])
    offsets = offsets.astype(np.int64)
    if not hostile:
        dtype = data.draw(st.sampled_from(INDEX_DTYPES + ["list"]), label="offsets dtype")
        if dtype == "list":
            return offsets.tolist()
        if offsets.size and offsets.max() > np.iinfo(dtype).max:
            dtype = np.int64
        layout = data.draw(st.sampled_from(["C", "strided", "readonly", "memmap_r"]))
        return place(offsets.astype(dtype), layout, scratch)
    choice = data.draw(st.sampled_from([
        "unsorted", "negative", "start", "past end", "empty", "drop last", "2-D", "float",
        "bool", "uint64 beyond", "int64 min", "int64 max", "object", "none"]), label="offsets")
    if choice == "unsorted" and offsets.size >= 2:
        offsets[-1], offsets[-2] = offsets[-2], offsets[-1] + 1
    elif choice == "negative" and offsets.size:
        offsets[data.draw(st.integers(0, offsets.size - 1))] = -1
    elif choice == "start" and offsets.size:
        offsets[0] = 1
    elif choice == "past end" and offsets.size:
        offsets[-1] = num_indices + 1
    elif choice == "empty":
        offsets = offsets[:0]
    elif choice == "drop last" and offsets.size:
        offsets = offsets[:-1]
    elif choice == "2-D":
        offsets = offsets.reshape(1, -1)
    elif choice == "float":
        offsets = offsets.astype(np.float64)
    elif choice == "bool":
        offsets = offsets.astype(bool)
    elif choice == "uint64 beyond":
        offsets = np.concatenate([offsets, [0]]).astype(np.uint64)
        offsets[-1] = 2**64 - 1
    elif choice in ("int64 min", "int64 max"):
        offsets = np.append(offsets, INT64_MIN if choice == "int64 min" else INT64_MAX)
    elif choice == "object":
        offsets = offsets.astype(object)
    elif choice == "none":
        return None
    return offsets


def draw_sample_weights(data, rng, shape, dtype, hostile=False):
    """per_sample_weights. Valid: None, or the input's shape and the table's dtype in any layout
    (maybe NaN/inf), or a list of numbers. Hostile: wrong dtype, shape or content."""
    choice = data.draw(st.sampled_from(
        ["other float", "f16", "int", "wrong shape", "flat", "none list", "str list", "scalar"]
        if hostile else ["none"] * 4 + ["right", "special", "list", "non-contiguous",
                                        "readonly"]), label="per_sample_weights")
    if choice == "none" or shape is None:
        return None
    dtype = dtype if dtype is not None else np.float32
    psw = rng.choice(np.array([-1.0, 0.0, 0.5, 1.0, 2.0, 1.5]), size=shape).astype(dtype)
    if choice == "special" and psw.size:
        psw.reshape(-1)[rng.integers(0, psw.size)] = rng.choice([np.nan, np.inf, -np.inf])
    if choice == "list":
        return psw.tolist()
    if choice == "other float":
        return psw.astype(np.float64 if psw.dtype == np.float32 else np.float32)
    if choice in ("f16", "int"):
        return psw.astype(np.float16 if choice == "f16" else np.int64)
    if choice == "wrong shape":
        return np.concatenate([psw.reshape(-1), np.ones(1, dtype)])
    if choice == "flat" and psw.ndim == 2:
        return psw.reshape(-1)
    if choice == "none list" and psw.size:
        return [None] * psw.shape[0] if psw.ndim == 1 else psw.tolist()
    if choice == "str list" and psw.size and psw.ndim == 1:
        return ["1.5"] * psw.shape[0]
    if choice == "non-contiguous":
        return place(psw, "strided", None)
    if choice == "readonly":
        return place(psw, "readonly", None)
    if choice == "scalar":
        return 1.0
    return psw


def draw_bag_case(data, rng, scratch, extra=()):
    """Every argument of embedding_bag, each maybe hostile, and the oracle's verdict:
    (arguments, errors, reference arguments or None, hostile targets)."""
    num_embeddings, dim = data.draw(st.integers(0, 8)), data.draw(st.integers(0, 5))
    hostile = hostile_targets(data, ["weight", "input", "offsets", "mode", "psw",
                                     "padding_idx", *extra])
    weight = draw_weight(data, rng, num_embeddings, dim, scratch, "weight" in hostile)
    two_d = data.draw(st.booleans(), label="2-D input")
    include_last_offset = False
    if two_d:
        shape = (data.draw(st.integers(0, 4)), data.draw(st.integers(0, 4)))
    else:
        shape = (data.draw(st.integers(0, 12)),)
        include_last_offset = data.draw(st.booleans(), label="include_last_offset")
    indices = draw_indices(data, rng, num_embeddings, shape, scratch, "input" in hostile)
    input_shape = shape_of(indices)
    offsets = None
    if not two_d:
        offsets = draw_offsets(data, rng, int(np.prod(shape)), include_last_offset, scratch,
                               "offsets" in hostile)
    elif "offsets" in hostile:  # offsets with a 2-D input
        offsets = np.array([0], np.int64)
    mode = data.draw(st.sampled_from(BAD_MODES if "mode" in hostile else MODES), label="mode")
    table_dtype = np.dtype(np.float64) if isinstance(weight, list) else None
    if isinstance(weight, np.ndarray) and weight.dtype in FLOATS:
        table_dtype = weight.dtype
    psw = draw_sample_weights(data, rng, input_shape, table_dtype, "psw" in hostile)
    if mode == "max" and "psw" not in hostile:
        psw = None  # (max takes no weights)
    if ("psw" in hostile and "mode" not in hostile and input_shape is not None
            and data.draw(st.booleans(), label="right weights, but with max")):
        mode, psw = "max", np.ones(input_shape, table_dtype or np.float32)
    padding_idx = draw_padding(data, num_embeddings, "padding_idx" in hostile)

    weight_errors, table = weight_oracle(weight)
    known_rows = None if weight_errors else table.shape[0]
    errors = set(weight_errors)
    good_mode = isinstance(mode, str) and mode in MODES
    if not good_mode:
        errors.add(ValueError)
    index_errors, values = index_oracle(indices, known_rows)
    errors |= index_errors
    bounds_offsets = None
    ndim = None if input_shape is None else len(input_shape)
    if ndim == 2 and offsets is not None:
        errors.add(ValueError)
    elif ndim == 1:
        if offsets is None:
            errors.add(ValueError)
        else:
            offset_errors, bounds_offsets = offsets_oracle(offsets, input_shape[0],
                                                           include_last_offset)
            errors |= offset_errors
    elif ndim not in (None, 2):
        errors.add(ValueError)
    psw_values = None
    if psw is not None:
        if mode == "max":
            errors.add(ValueError)
        psw_errors, psw_values = sample_weights_oracle(
            psw, input_shape, None if weight_errors else table.dtype)
        errors |= psw_errors
    errors |= padding_oracle(padding_idx, known_rows)
    case = dict(input=indices, weight=weight, offsets=offsets, mode=mode,
                per_sample_weights=psw, include_last_offset=include_last_offset,
                padding_idx=padding_idx)
    reference = None
    if not errors:
        reference = dict(indices=values, weight=np.array(table, copy=True),
                         offsets=bounds_offsets, mode=str(mode), per_sample_weights=psw_values,
                         include_last_offset=include_last_offset, padding_idx=padding_idx)
    return case, errors, reference, hostile


@settings(max_examples=examples(9))
@given(data=st.data(), seed=seeds)
def test_embedding_bag_fuzz(scratch, data, seed):
    rng = np.random.default_rng(seed)
    case, errors, reference, hostile = draw_bag_case(data, rng, scratch, extra=["max_norm"])
    max_norm, norm_type = draw_max_norm(data, "max_norm" in hostile)
    errors = errors | max_norm_oracle(max_norm, norm_type, case["weight"])

    def check(out):
        if max_norm is not None:
            reference["weight"] = renorm_ref(reference["weight"], reference["indices"],
                                             float(max_norm), float(norm_type))
            if isinstance(case["weight"], np.ndarray):
                assert_same_bits(case["weight"], reference["weight"])
        expected, _ = embedding_bag_ref(**reference)
        assert_same_bits(out, expected)

    run_case("embedding_bag", errors,
             lambda: fastemb.embedding_bag(**case, max_norm=max_norm, norm_type=norm_type),
             list(case.values()), check, may_change=[case["weight"]])


def bag_output_shape(reference):
    indices = reference["indices"]
    if indices.ndim == 2:
        return (indices.shape[0], reference["weight"].shape[1])
    offsets = reference["offsets"]
    bags = offsets.size - 1 if reference["include_last_offset"] else offsets.size
    return (bags, reference["weight"].shape[1])


@settings(max_examples=examples(5))
@given(data=st.data(), seed=seeds)
def test_embedding_bag_backward_fuzz(scratch, data, seed):
    rng = np.random.default_rng(seed)
    case, errors, reference, hostile = draw_bag_case(data, rng, scratch,
                                                     extra=["grad", "scale"])
    scale = data.draw(st.sampled_from([False, True, 0, 1]), label="scale_grad_by_freq")
    if case["mode"] == "max":
        if "scale" in hostile:
            scale = True
        elif scale:
            scale = False
    if case["mode"] == "max" and scale:
        errors = errors | {ValueError}
    if reference is not None:
        dtype = reference["weight"].dtype
        grad = draw_grad(data, rng, bag_output_shape(reference), dtype, "grad" in hostile)
        errors = errors | grad_oracle(grad, bag_output_shape(reference), dtype)
    else:
        grad = draw_grad(data, rng, (2, 2), np.float32)

    def check(result):
        weight = reference["weight"]
        psw = reference["per_sample_weights"]
        if psw is not None:
            assert isinstance(result, tuple) and len(result) == 2
            result, psw_grad = result
            if reference["mode"] == "sum" or reference["mode"] == "mean":
                expected = psw_grad_ref(weight, reference["indices"], np.asarray(grad), psw,
                                        reference["offsets"], reference["mode"],
                                        reference["include_last_offset"],
                                        reference["padding_idx"])
                assert_same_bits(psw_grad, expected)
        rows, values = bag_grad_ref(weight, reference["indices"], np.asarray(grad),
                                    reference["offsets"], reference["mode"], psw,
                                    reference["include_last_offset"], reference["padding_idx"],
                                    bool(scale))
        same_gradient(result, rows, values, weight.shape[0], weight.dtype)

    run_case("embedding_bag_backward", errors,
             lambda: fastemb.embedding_bag_backward(grad, **case, scale_grad_by_freq=scale),
             list(case.values()) + [grad], check)


# --------------------------------------------------------------------------------------------
# fastemb.embedding_backward
# --------------------------------------------------------------------------------------------


@settings(max_examples=examples(4))
@given(data=st.data(), seed=seeds)
def test_embedding_backward_fuzz(scratch, data, seed):
    rng = np.random.default_rng(seed)
    hostile = hostile_targets(data, ["num_embeddings", "input", "padding_idx", "grad"])
    num_embeddings = data.draw(st.sampled_from(
        [-1, 2**64, 5.0, "5", None, True] if "num_embeddings" in hostile
        else [0, 1, 3, 7, 7, np.int64(5)]), label="num_embeddings")
    known = int(num_embeddings) if not count_oracle(num_embeddings) else None
    rows_for_indices = known if known is not None else 4
    indices = draw_indices(data, rng, rows_for_indices, data.draw(shapes), scratch,
                           "input" in hostile)
    padding_idx = draw_padding(data, rows_for_indices, "padding_idx" in hostile)
    scale = data.draw(st.sampled_from([False, True]), label="scale_grad_by_freq")
    dim = data.draw(st.integers(0, 4))
    dtype = data.draw(st.sampled_from(FLOATS))
    input_shape = shape_of(indices)
    grad = draw_grad(data, rng, (input_shape if input_shape is not None else (1,)) + (dim,),
                     dtype, "grad" in hostile)

    errors = count_oracle(num_embeddings)
    index_errors, values = index_oracle(indices, known)
    errors |= index_errors | padding_oracle(padding_idx, known)
    try:
        grad_array = np.asarray(grad)
    except ValueError:
        grad_array = None
    if (grad_array is None or grad_array.dtype not in FLOATS or input_shape is None
            or grad_array.shape[:-1] != tuple(input_shape) or grad_array.ndim == 0):
        errors.add(ValueError)

    def check(result):
        rows, expected = embedding_grad_ref(values, grad_array, known, padding_idx, scale)
        same_gradient(result, rows, expected, known, grad_array.dtype)

    run_case("embedding_backward", errors,
             lambda: fastemb.embedding_backward(grad, indices, num_embeddings, padding_idx,
                                                scale),
             [indices, grad], check)


# --------------------------------------------------------------------------------------------
# Modules: construction, from_pretrained, forward, backward
# --------------------------------------------------------------------------------------------

SIZES = [0, 1, 3, 6, 6, 6, np.int64(4)]
BAD_SIZES = [-1, 2.0, True, None, "3", 2**64] + SIZES
DTYPES = [np.float32, np.float32, np.float64, "float64", None]
BAD_DTYPES = [np.float16, np.int32, "foo", object, bool]


def dtype_oracle(dtype):
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        return {TypeError}
    return set() if resolved in FLOATS else {TypeError}


def draw_module(data, rng, scratch):
    """Build an Embedding or EmbeddingBag (directly or from_pretrained) from arguments of
    which none, one or two are hostile; returns (module or None when rejected, is a bag)."""
    bag = data.draw(st.booleans(), label="EmbeddingBag")
    pretrained = data.draw(st.booleans(), label="from_pretrained")
    hostile = hostile_targets(data, ["size", "dtype", "padding_idx", "max_norm", "mode"]
                              if not pretrained else ["embeddings", "padding_idx", "max_norm",
                                                      "mode"])
    padding_idx = data.draw(st.sampled_from([9, 1.0, True, -10] if "padding_idx" in hostile
                                            else [None, None, 0, -1, 2]), label="padding_idx")
    max_norm, norm_type = None, 2.0
    if "max_norm" in hostile:
        max_norm, norm_type = data.draw(st.sampled_from([("1", 2.0), (1.5, None), (1.5, "2"),
                                                         (None, "2")]))
    elif data.draw(st.integers(0, 3)) == 0:
        max_norm, norm_type = data.draw(st.sampled_from([(1.5, 2.0), (0.5, 1), (2, np.inf)]))
    scale = data.draw(st.sampled_from([False, False, True]), label="scale_grad_by_freq")
    options = dict(padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                   scale_grad_by_freq=scale)
    errors = set()
    if bag:
        mode = data.draw(st.sampled_from(["min", None, ("max", "scale")] if "mode" in hostile
                                         else MODES + [np.str_("sum")]), label="mode")
        if mode == ("max", "scale"):
            mode, scale = "max", True
        elif mode == "max":
            scale = False
        include_last_offset = data.draw(st.booleans())
        options.update(mode=mode, include_last_offset=include_last_offset,
                       scale_grad_by_freq=scale)
        if not (isinstance(mode, str) and mode in MODES):
            errors.add(ValueError)
        elif mode == "max" and scale:
            errors.add(ValueError)
    cls = fastemb.EmbeddingBag if bag else fastemb.Embedding
    if pretrained:
        freeze = data.draw(st.booleans(), label="freeze")
        embeddings = draw_weight(data, rng, data.draw(st.integers(0, 6)),
                                 data.draw(st.integers(0, 4)), scratch, "embeddings" in hostile)
        weight_errors, table = weight_oracle(embeddings)
        errors |= weight_errors
        num_embeddings = None if weight_errors else table.shape[0]

        def make():
            return cls.from_pretrained(embeddings, freeze=freeze, **options)
    else:
        freeze = False
        sizes = BAD_SIZES if "size" in hostile else SIZES
        size = data.draw(st.sampled_from(sizes), label="num_embeddings")
        dim = data.draw(st.sampled_from(sizes), label="embedding_dim")
        dtype = data.draw(st.sampled_from(BAD_DTYPES if "dtype" in hostile else DTYPES),
                          label="dtype")
        errors |= count_oracle(size) | count_oracle(dim) | dtype_oracle(dtype)
        num_embeddings = None if count_oracle(size) else int(size)
        seed = data.draw(st.sampled_from([None, 0, 5]))
        embeddings = None

        def make():
            return cls(size, dim, dtype=dtype, seed=seed, **options)
    errors |= padding_oracle(padding_idx, num_embeddings)
    if max_norm is not None and not is_real(max_norm):
        errors.add(TypeError)
    if not is_real(norm_type):
        errors.add(TypeError)
    module = run_case("module construction", errors, make, [embeddings],
                      lambda module: None)
    if module is not None:
        assert module.frozen == bool(freeze)
        if pretrained:
            assert module.weight is embeddings or not isinstance(embeddings, np.ndarray)
        else:
            assert module.weight.shape == (num_embeddings, int(dim))
            if padding_idx is not None:
                assert not module.weight[padding_idx].any()
    return module, bag


@settings(max_examples=examples(6))
@given(data=st.data(), seed=seeds)
def test_module_fuzz(scratch, data, seed):
    """Build a module from hostile arguments, then call its forward with hostile input and its
    backward with a hostile gradient (and before a forward, twice, and when frozen)."""
    rng = np.random.default_rng(seed)
    module, bag = draw_module(data, rng, scratch)
    if module is None:
        return
    weight = module.weight
    num_embeddings, dim = weight.shape
    if module.grad is not None or module.num_embeddings != num_embeddings:
        raise AssertionError("a new module has a gradient or a wrong size")
    # backward before any forward
    run_case("module backward", {RuntimeError},
             lambda: module.backward(np.zeros((1, dim), weight.dtype)), [weight], None)

    hostile = hostile_targets(data, ["input", "offsets", "psw", "grad"] if bag
                              else ["input", "grad"])
    shape = (data.draw(st.integers(0, 4)),) if bag else data.draw(shapes)
    if bag and data.draw(st.booleans()):
        shape = shape + (data.draw(st.integers(0, 3)),)
    indices = draw_indices(data, rng, num_embeddings, shape, scratch, "input" in hostile)
    padding = module.padding_idx
    index_errors, values = index_oracle(indices, num_embeddings)
    errors = set(index_errors)
    input_shape = shape_of(indices)
    max_norm_errors = max_norm_oracle(module.max_norm, module.norm_type, weight)
    errors |= max_norm_errors
    offsets = psw = None
    reference = None
    if bag:
        if input_shape is not None and len(input_shape) == 1:
            offsets = draw_offsets(data, rng, input_shape[0], module.include_last_offset,
                                   scratch, "offsets" in hostile)
            if offsets is None:
                errors.add(ValueError)
            else:
                offset_errors, bounds = offsets_oracle(offsets, input_shape[0],
                                                       module.include_last_offset)
                errors |= offset_errors
        elif input_shape is not None and len(input_shape) != 2:
            errors.add(ValueError)
        psw = draw_sample_weights(data, rng, input_shape, weight.dtype, "psw" in hostile)
        if module.mode == "max" and "psw" not in hostile:
            psw = None
        psw_values = None
        if psw is not None:
            if module.mode == "max":
                errors.add(ValueError)
            psw_errors, psw_values = sample_weights_oracle(psw, input_shape, weight.dtype)
            errors |= psw_errors
        if not errors:
            reference = dict(indices=values, weight=None, offsets=bounds if offsets is not None
                             else None, mode=module.mode, per_sample_weights=psw_values,
                             include_last_offset=module.include_last_offset,
                             padding_idx=padding)
    before = np.array(weight, copy=True)

    def check_forward(out):
        table = before
        if module.max_norm is not None:
            table = renorm_ref(before, values, module.max_norm, module.norm_type)
            assert_same_bits(weight, table)
        if bag:
            reference["weight"] = table
            assert_same_bits(out, embedding_bag_ref(**reference)[0])
        else:
            assert_same_bits(out, embedding_ref(values, table))

    call = (lambda: module(indices, offsets, psw)) if bag else (lambda: module(indices))
    out = run_case("module forward", errors, call, [weight, indices, offsets, psw],
                   check_forward, may_change=[weight])
    if out is None:
        return
    if module.frozen:
        run_case("module backward", {RuntimeError}, lambda: module.backward(np.ones_like(out)),
                 [weight], None)
        assert module.grad is None
        return
    table_now = np.array(weight, copy=True)
    grad = draw_grad(data, rng, out.shape, weight.dtype, "grad" in hostile)
    errors = grad_oracle(grad, out.shape, weight.dtype)

    def check_backward(result):
        if bag:
            rows, expected = bag_grad_ref(
                reference["weight"], values, np.asarray(grad), reference["offsets"],
                module.mode, reference["per_sample_weights"], module.include_last_offset,
                padding, module.scale_grad_by_freq)
            if reference["per_sample_weights"] is not None and module.mode != "max":
                assert_same_bits(module.per_sample_weights_grad, psw_grad_ref(
                    table_now, values, np.asarray(grad), reference["per_sample_weights"],
                    reference["offsets"], module.mode, module.include_last_offset, padding))
        else:
            rows, expected = embedding_grad_ref(values, np.asarray(grad), num_embeddings,
                                                padding, module.scale_grad_by_freq)
        same_gradient(result, rows, expected, num_embeddings, weight.dtype)
        assert module.grad is result

    result = run_case("module backward", errors, lambda: module.backward(grad),
                      [weight, grad], check_backward)
    if result is None:  # a rejected backward may be retried with a right gradient
        assert module.grad is None
        result = module.backward(np.zeros_like(out))
        assert isinstance(result, fastemb.SparseGrad) and module.grad is result
    # a second backward for the same forward
    run_case("module backward", {RuntimeError}, lambda: module.backward(np.zeros_like(out)),
             [weight], None)


# --------------------------------------------------------------------------------------------
# SparseGrad(...) and SparseGrad + SparseGrad
# --------------------------------------------------------------------------------------------


def draw_rows(data, rng, num_embeddings, hostile):
    valid = np.sort(rng.choice(max(num_embeddings, 1), size=min(num_embeddings, 3),
                               replace=False)).astype(np.int64)
    choice = data.draw(st.sampled_from([
        "unsorted", "duplicate", "negative", "too big", "int64 max", "uint64 beyond", "float",
        "bool", "2-D", "none", "object"] if hostile else [
        "valid"] * 3 + ["list", "uint8", "empty list"]), label="rows")
    if choice == "valid":
        return place(valid, data.draw(st.sampled_from(["C", "strided", "readonly"])), None)
    if choice == "list":
        return valid.tolist()
    if choice == "uint8":
        return valid.astype(np.uint8)
    if choice == "empty list":
        return []
    extra = {"unsorted": None, "duplicate": None, "negative": -1, "too big": num_embeddings,
             "int64 max": INT64_MAX, "uint64 beyond": None, "float": None, "bool": None,
             "2-D": None, "none": None, "object": None}[choice]
    if extra is not None:
        return np.append(valid, extra) if extra >= 0 else np.append(extra, valid)
    if choice == "unsorted" and valid.size >= 2:
        return valid[::-1].copy()
    if choice == "duplicate" and valid.size:
        return np.append(valid, valid[-1])
    if choice == "uint64 beyond":
        return np.append(valid.astype(np.uint64), np.uint64(2**64 - 1))
    if choice == "float":
        return valid.astype(np.float64)
    if choice == "bool":
        return valid.astype(bool)
    if choice == "2-D":
        return valid.reshape(1, -1)
    if choice == "none":
        return None
    if choice == "object":
        return valid.astype(object)
    return valid


def sparse_grad_oracle(rows, values, num_embeddings):
    errors = count_oracle(num_embeddings)
    try:
        row_array = np.asarray(rows)
    except ValueError:
        return errors | {ValueError}
    if row_array.size == 0:
        row_array = row_array.astype(np.int64)
    if row_array.dtype.kind not in "iu" or row_array.ndim != 1:
        errors.add(TypeError)
    value_array = np.asarray(values)
    if value_array.dtype not in FLOATS or value_array.ndim != 2:
        errors.add(TypeError)
    if errors:
        return errors
    if value_array.shape[0] != row_array.size:
        return {ValueError}
    ints = [int(r) for r in row_array]
    if any(not 0 <= r < num_embeddings for r in ints) or any(
            b <= a for a, b in zip(ints, ints[1:])):
        return {ValueError}
    return set()


def draw_sparse_grad_arguments(data, rng, num_embeddings, dim, dtype):
    hostile = hostile_targets(data, ["rows", "values", "num_embeddings"])
    rows = draw_rows(data, rng, num_embeddings, "rows" in hostile)
    count = np.asarray(rows).shape[0] if np.ndim(rows) else 0
    choice = data.draw(st.sampled_from(["other count", "1-D", "int", "f16", "none"]
                                       if "values" in hostile else
                                       ["right"] * 3 + ["special", "list"]), label="values")
    values = rng.standard_normal((count, dim)).astype(dtype)
    if choice == "special" and values.size:
        values.reshape(-1)[0] = np.nan
    elif choice == "other count":
        values = rng.standard_normal((count + 1, dim)).astype(dtype)
    elif choice == "1-D":
        values = values.reshape(-1)
    elif choice in ("int", "f16"):
        values = values.astype(np.int32 if choice == "int" else np.float16)
    elif choice == "list":
        values = values.tolist() if count else values
    elif choice == "none":
        values = None
    size = data.draw(st.sampled_from(
        [-1, 2**64, float(num_embeddings), None, "9", True] if "num_embeddings" in hostile
        else [num_embeddings, np.int64(num_embeddings)]), label="num_embeddings")
    return rows, values, size


@settings(max_examples=examples(3))
@given(data=st.data(), seed=seeds)
def test_sparse_grad_fuzz(data, seed):
    rng = np.random.default_rng(seed)
    num_embeddings, dim = data.draw(st.integers(0, 6)), data.draw(st.integers(0, 3))
    dtype = data.draw(st.sampled_from(FLOATS))
    rows, values, size = draw_sparse_grad_arguments(data, rng, num_embeddings, dim, dtype)
    errors = sparse_grad_oracle(rows, values, size)

    def check(grad):
        row_array = np.asarray(rows).astype(np.int64)
        value_array = np.asarray(values)
        dense = np.zeros((int(size), value_array.shape[1]), value_array.dtype)
        dense[row_array] = value_array
        assert grad.rows.dtype == np.int64 and grad.nnz == row_array.size
        np.testing.assert_array_equal(grad.rows, row_array)
        assert grad.shape == dense.shape and grad.dtype == dense.dtype
        assert_same_bits(grad.to_dense(), dense)

    first = run_case("SparseGrad", errors, lambda: fastemb.SparseGrad(rows, values, size),
                     [rows, values], check)
    if first is None:
        return
    # the sum with another gradient, maybe of another table, maybe not a gradient at all
    other_kind = data.draw(st.sampled_from(["same table"] * 4 + [
        "other rows", "other dtype", "other dim", "None", "int", "ndarray"]), label="other")
    if other_kind in ("same table", "other rows", "other dtype", "other dim"):
        other_dtype = (np.float64 if first.dtype == np.float32 else np.float32) \
            if other_kind == "other dtype" else first.dtype
        other_dim = first.shape[1] + (1 if other_kind == "other dim" else 0)
        other_rows = np.sort(rng.choice(max(first.num_embeddings, 1),
                                        size=min(first.num_embeddings, 2), replace=False))
        other = fastemb.SparseGrad(other_rows, rng.standard_normal(
            (other_rows.size, other_dim)).astype(other_dtype),
            first.num_embeddings + (1 if other_kind == "other rows" else 0))
        errors = set() if other_kind == "same table" else {ValueError}
    else:
        other = {"None": None, "int": 1, "ndarray": np.zeros(first.shape, first.dtype)}[
            other_kind]
        errors = {TypeError}
    first_dense = first.to_dense()

    def check_sum(total):
        assert isinstance(total, fastemb.SparseGrad)
        np.testing.assert_array_equal(total.rows, np.union1d(first.rows, other.rows))
        np.testing.assert_array_equal(total.to_dense(), first_dense + other.to_dense())

    if other_kind == "ndarray":  # ndarray + SparseGrad is NumPy's business; only test ours
        assert first.__add__(other) is NotImplemented
        COUNTS["SparseGrad + SparseGrad", "rejected"] += 1
        return
    run_case("SparseGrad + SparseGrad", errors, lambda: first + other, [first_dense],
             check_sum)
    assert_same_bits(first.to_dense(), first_dense)  # the operands are unchanged


# --------------------------------------------------------------------------------------------
# Optimizers: construction, step, load_state_dict
# --------------------------------------------------------------------------------------------

OPTIMIZERS = {  # name: (class, {hyperparameter: (valid values, hostile values)})
    "SGD": (fastemb.optim.SGD, dict(lr=([0.1, 0.5, 0, np.float32(0.25)],
                                        [-0.1, float("nan"), float("inf"), "0.1", True, None]))),
    "LazyAdam": (fastemb.optim.LazyAdam, dict(
        lr=([1e-3, 0.05], [0, -1.0, float("nan"), "x"]),
        betas=([(0.9, 0.999), [0.5, 0.9], (0.0, 0.0), np.array([0.8, 0.9])],
               [(1.0, 0.9), (0.9, -0.1), (0.9,), None, 3, "ab", (float("nan"), 0.9)]),
        eps=([1e-8, 1e-3], [0.0, -1e-8, float("nan")]),
        maximize=([False, True], []))),
    "Adagrad": (fastemb.optim.Adagrad, dict(
        lr=([1e-2, 0.3, 0.0], [-0.1, float("inf")]),
        lr_decay=([0.0, 0.05], [-0.1, float("nan")]),
        eps=([1e-10, 0.0], [-1.0]),
        initial_accumulator_value=([0.0, 0.1], [-0.1, "0"]))),
    "RowWiseAdagrad": (fastemb.optim.RowWiseAdagrad, dict(
        lr=([1e-2, 0.3], [-1, None]), eps=([1e-10, 0.0], [-1e-10, float("inf")]))),
}


def draw_hyperparameters(data, choices, hostile):
    """Valid values for every hyperparameter, or hostile ones for one or two of them."""
    bad_keys = set()
    if hostile:
        candidates = sorted(key for key, (_, bad) in choices.items() if bad)
        bad_keys = data.draw(st.sets(st.sampled_from(candidates), min_size=1, max_size=2))
    return {key: data.draw(st.sampled_from(bad if key in bad_keys else valid), label=key)
            for key, (valid, bad) in choices.items()}


def hyperparameter_errors(name, values):
    """torch's rules: a real number (bools rejected) in the documented range, else
    TypeError/ValueError."""
    errors = set()

    def real(value, low, low_open=False, high=math.inf):
        if not is_real(value):
            errors.add(TypeError)
            return
        value = float(value)
        if not ((low < value if low_open else low <= value) and value < high):
            errors.add(ValueError)

    if name == "LazyAdam":
        real(values["lr"], 0.0, low_open=True)
        real(values["eps"], 0.0, low_open=True)
        betas = values["betas"]
        try:
            betas = tuple(betas)
        except TypeError:
            errors.add(TypeError)
        else:
            if len(betas) != 2:
                errors.add(ValueError)
            for beta in betas:
                real(beta, 0.0, high=1.0)
    else:
        for key, value in values.items():
            real(value, 0.0)
    return errors


def make_table_module(data, rng, scratch, dtype, hostile=False):
    """A trainable module; with ``hostile`` its table is unfit for an optimizer (read-only,
    Fortran-ordered, strided, a read-only memory map)."""
    num_embeddings, dim = data.draw(st.integers(2, 7)), data.draw(st.integers(2, 4))
    table = random_table(rng, num_embeddings, dim, dtype, "normal")
    layout = data.draw(st.sampled_from(["fortran", "readonly", "strided", "memmap_r"] if hostile
                                       else ["C", "C", "memmap_rw"]), label="layout")
    module_class = data.draw(st.sampled_from([fastemb.Embedding, fastemb.EmbeddingBag]))
    module = module_class.from_pretrained(place(table, layout, scratch), freeze=False,
                                          **({"mode": "sum"} if module_class is
                                             fastemb.EmbeddingBag else {}))
    writable = module.weight.flags.c_contiguous and module.weight.flags.writeable
    return module, writable


def reference_step(name, hyperparameters, weight, state, rows, g, step):
    if name == "SGD":
        sgd_step_ref(weight, rows, g, hyperparameters["lr"])
    elif name == "Adagrad":
        adagrad_step_ref(weight, state["sum"], rows, g, step, hyperparameters["lr"],
                         hyperparameters["lr_decay"], hyperparameters["eps"])
    elif name == "RowWiseAdagrad":
        rowwise_adagrad_step_ref(weight, state["sum"], rows, g, hyperparameters["lr"],
                                 hyperparameters["eps"])
    else:
        lazy_adam_step_ref(weight, state["exp_avg"], state["exp_avg_sq"], rows, g, step,
                           hyperparameters["lr"], hyperparameters["betas"],
                           hyperparameters["eps"], hyperparameters["maximize"])


def snapshot_optimizer(optimizer):
    return [(np.array(m.weight, copy=True), {k: (np.array(v, copy=True)
                                                 if isinstance(v, np.ndarray) else v)
                                             for k, v in optimizer.state[m].items()})
            for m in optimizer.modules]


def assert_same_optimizer(optimizer, saved, what):
    for module, (weight, state) in zip(optimizer.modules, saved):
        assert _same_bytes(np.asarray(module.weight), weight), f"{what}: a table changed"
        for key, value in state.items():
            now = optimizer.state[module][key]
            if isinstance(value, np.ndarray):
                assert _same_bytes(now, value), f"{what}: state {key!r} changed"
            else:
                assert now == value, f"{what}: state {key!r} changed"


def other_float(dtype):
    return np.dtype(np.float64) if dtype == np.float32 else np.dtype(np.float32)


def draw_step_gradient(data, rng, module, hostile=False):
    """Give ``module`` a gradient for the next step; returns (errors, expected (rows, values)
    or None). The expected gradient comes from the reference, not from ``grad.values``, so that
    the step runs its fused accumulate-and-update path on a gradient nobody has read yet."""
    num_embeddings, dim = module.weight.shape
    dtype = module.weight.dtype
    kind = data.draw(st.sampled_from(["other shape", "other dtype", "ndarray", "replaced table"]
                                     if hostile else ["backward"] * 3 + ["handmade", "none",
                                                                         "empty"]),
                     label="grad")
    module.grad = None
    if kind == "backward":
        indices = rng.integers(0, num_embeddings, size=(3, 2))
        out = module(indices)
        g = rng.standard_normal(out.shape).astype(dtype)
        if data.draw(st.integers(0, 4)) == 0:
            g.reshape(-1)[0] = np.inf
        module.backward(g)
        if isinstance(module, fastemb.EmbeddingBag):
            return set(), bag_grad_ref(module.weight, indices, g, mode="sum")
        return set(), embedding_grad_ref(indices, g, num_embeddings)
    if kind == "none":
        return set(), None
    if kind == "ndarray":
        module.grad = np.zeros(module.weight.shape, dtype)
        return {TypeError}, None
    if kind == "replaced table":  # same shape, other dtype: a state array no longer fits
        module.weight = module.weight.astype(other_float(dtype))
        rows, values = np.array([0]), np.ones((1, dim), module.weight.dtype)
        module.grad = fastemb.SparseGrad(rows, values, num_embeddings)
        return set(), (rows, values)  # (the step adds ValueError where there is state)
    rows = np.arange(0, num_embeddings, 2) if kind != "empty" else np.zeros(0, np.int64)
    values = rng.standard_normal((rows.size, dim)).astype(
        other_float(dtype) if kind == "other dtype" else dtype)
    module.grad = fastemb.SparseGrad(rows, values, num_embeddings + (kind == "other shape"))
    return ({ValueError} if kind in ("other shape", "other dtype") else set()), (rows, values)


@settings(max_examples=examples(5))
@given(data=st.data(), seed=seeds)
def test_optimizer_fuzz(scratch, data, seed):
    """Construct an optimizer from hostile modules and hyperparameters, then step with hostile
    gradients: each step equals the reference, or raises changing no table and no state."""
    rng = np.random.default_rng(seed)
    name = data.draw(st.sampled_from(sorted(OPTIMIZERS)), label="optimizer")
    cls, choices = OPTIMIZERS[name]
    hostile = hostile_targets(data, ["hyperparameters", "modules", "table"])
    hyperparameters = draw_hyperparameters(data, choices, "hyperparameters" in hostile)
    dtype = data.draw(st.sampled_from(FLOATS))
    count = data.draw(st.integers(1, 3))
    unfit = data.draw(st.integers(0, count - 1)) if "table" in hostile else -1
    made = [make_table_module(data, rng, scratch, dtype, i == unfit) for i in range(count)]
    modules = [module for module, _ in made]
    errors = hyperparameter_errors(name, hyperparameters)
    argument = data.draw(st.sampled_from(["empty", "twice", "none", "object"]
                                         if "modules" in hostile else
                                         ["list", "list", "single", "tuple"]),
                         label="modules argument")
    if argument == "single":
        modules = modules[:1]
        argument_value = modules[0]
    else:
        argument_value = {"list": modules, "tuple": tuple(modules), "empty": [],
                          "twice": modules + modules[:1], "none": None,
                          "object": modules + [object()]}[argument]
        errors |= {"empty": {ValueError}, "twice": {ValueError}, "none": {TypeError},
                   "object": {TypeError}}.get(argument, set())
    if argument not in ("none", "empty") and not all(writable for (module, writable) in made
                                      if module in modules):
        errors.add(ValueError)
    optimizer = run_case(f"{name} construction", errors,
                         lambda: cls(argument_value, **hyperparameters),
                         [m.weight for m in modules], lambda optimizer: None)
    if optimizer is None:
        return
    for _ in range(data.draw(st.integers(1, 3), label="steps")):
        errors, gradients = set(), []
        hostile_module = data.draw(st.sampled_from([None] * 2 + modules), label="hostile grad")
        for module in modules:
            grad_errors, gradient = draw_step_gradient(data, rng, module,
                                                       module is hostile_module)
            errors |= grad_errors
            if cls.state_arrays and module.weight.dtype != dtype:
                errors.add(ValueError)  # a replaced table does not fit the state
            gradients.append(gradient)
        saved = snapshot_optimizer(optimizer)
        expected = snapshot_optimizer(optimizer)
        for module, (weight, state), gradient in zip(modules, expected, gradients):
            if gradient is None:
                continue
            state["step"] += 1
            rows, values = gradient
            if rows.size:
                with np.errstate(all="ignore"):
                    reference_step(name, optimizer.hyperparameters, weight, state, rows, values,
                                   state["step"])

        def check(_):
            for module, (weight, state) in zip(modules, expected):
                assert_same_bits(module.weight, weight)
                for key, value in state.items():
                    if isinstance(value, np.ndarray):
                        assert_same_bits(optimizer.state[module][key], value)
                    else:
                        assert optimizer.state[module][key] == value

        if run_case(f"{name} step", errors, lambda: optimizer.step() or "stepped", [],
                    check) is None:
            assert_same_optimizer(optimizer, saved, f"{name} step")
            for module in modules:  # repair, then go on
                if module.weight.dtype != dtype:
                    module.weight = module.weight.astype(dtype)
                module.grad = None


def mutate_state_dict(data, rng, state_dict):
    """A copy of ``state_dict`` with one hostile change; returns (copy, errors)."""
    import copy
    mutated = copy.deepcopy(state_dict)
    states = mutated["state"]
    arrays = [k for k in states[0] if k != "step"]
    choices = ["none", "valid", "valid numpy step", "valid 0-d step", "missing key",
               "extra key", "negative step", "float step", "bool step", "array step",
               "states not a list", "state not a dict", "too few states", "too many states",
               "mixed keys", "hyperparameters missing", "hyperparameters none",
               "unknown hyperparameter", "bad hyperparameter", "not a dict"]
    if arrays:
        choices += ["wrong shape", "wrong dtype", "list array", "none array", "str array",
                    "nan array", "fortran array"]
    valid = {"valid", "valid numpy step", "valid 0-d step", "nan array", "fortran array"}
    hostile = data.draw(st.booleans(), label="hostile state_dict")
    choice = data.draw(st.sampled_from([c for c in choices if (c in valid) != hostile]),
                       label="state_dict change")
    key = data.draw(st.sampled_from(arrays)) if arrays else None
    if choice == "none":
        return None, {ValueError}
    if choice == "not a dict":
        return data.draw(st.sampled_from([[], "state", 3])), {ValueError}
    if choice == "valid":
        states[0]["step"] = int(rng.integers(0, 50))
        for name in arrays:
            states[0][name] = rng.random(states[0][name].shape).astype(states[0][name].dtype)
    elif choice == "valid numpy step":
        states[0]["step"] = np.int64(7)
    elif choice == "valid 0-d step":
        states[0]["step"] = np.array(4)
    elif choice == "missing key":
        del states[0]["step"]
    elif choice == "extra key":
        states[0]["extra"] = 1
    elif choice == "negative step":
        states[0]["step"] = -1
    elif choice == "float step":
        states[0]["step"] = 1.5
    elif choice == "bool step":
        states[0]["step"] = True
    elif choice == "array step":
        states[0]["step"] = np.array([1, 2])
    elif choice == "states not a list":
        mutated["state"] = 5
    elif choice == "state not a dict":
        states[0] = None
    elif choice == "too few states":
        mutated["state"] = states[:-1]
    elif choice == "too many states":
        mutated["state"] = states + states[:1]
    elif choice == "mixed keys":
        states[0][1] = 2
    elif choice == "hyperparameters missing":
        del mutated["hyperparameters"]
    elif choice == "hyperparameters none":
        mutated["hyperparameters"] = None
    elif choice == "unknown hyperparameter":
        mutated["hyperparameters"]["momentum"] = 0.9
    elif choice == "bad hyperparameter":
        mutated["hyperparameters"]["lr"] = data.draw(st.sampled_from([-1.0, "x", None]))
    elif choice == "wrong shape":
        states[0][key] = states[0][key][:-1]
    elif choice == "wrong dtype":
        states[0][key] = states[0][key].astype(np.float16)
    elif choice == "list array":
        states[0][key] = states[0][key].tolist()  # Python floats: float64
        if states[0][key] and np.asarray(states[0][key]).dtype == state_dict["state"][0][
                key].dtype:
            valid.add(choice)
    elif choice == "none array":
        states[0][key] = None
    elif choice == "str array":
        states[0][key] = "zeros"
    elif choice == "nan array":
        states[0][key] = np.full_like(states[0][key], np.nan)
    elif choice == "fortran array":
        states[0][key] = np.asfortranarray(rng.random(states[0][key].shape).astype(
            states[0][key].dtype))
    return mutated, (set() if choice in valid else {ValueError})


@settings(max_examples=examples(3))
@given(data=st.data(), seed=seeds)
def test_load_state_dict_fuzz(scratch, data, seed):
    rng = np.random.default_rng(seed)
    name = data.draw(st.sampled_from(sorted(OPTIMIZERS)), label="optimizer")
    dtype = data.draw(st.sampled_from(FLOATS))
    modules = [fastemb.Embedding(int(rng.integers(2, 6)), int(rng.integers(1, 4)), seed=i,
                                 dtype=dtype) for i in range(data.draw(st.integers(1, 2)))]
    optimizer = OPTIMIZERS[name][0](modules, **({"lr": 0.1} if name == "SGD" else {}))
    for module in modules:  # some state worth keeping
        module.backward(np.ones_like(module([0, 1])))
    optimizer.step()
    state_dict, errors = mutate_state_dict(data, rng, optimizer.state_dict())
    saved = snapshot_optimizer(optimizer)
    hyperparameters = dict(optimizer.hyperparameters)

    def check(_):
        for module, state in zip(modules, state_dict["state"]):
            for key, value in state.items():
                now = optimizer.state[module][key]
                if key == "step":
                    assert now == int(np.asarray(value)) and isinstance(now, int)
                else:
                    assert now.flags.c_contiguous and now is not value
                    assert_same_bits(now, np.asarray(value))
        assert optimizer.hyperparameters == hyperparameters

    if run_case(f"{name} load_state_dict", errors,
                lambda: optimizer.load_state_dict(state_dict) or "loaded", [state_dict],
                check) is None:
        assert_same_optimizer(optimizer, saved, "load_state_dict")
        assert optimizer.hyperparameters == hyperparameters


# --------------------------------------------------------------------------------------------
# fastemb.load on damaged and foreign files
# --------------------------------------------------------------------------------------------


def _checkpoint_targets(seed=1):
    modules = [fastemb.Embedding(9, 3, seed=seed),
               fastemb.EmbeddingBag(5, 2, mode="sum", dtype=np.float64, seed=seed + 1)]
    return modules, fastemb.optim.LazyAdam(modules, lr=0.01)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    """A real checkpoint (two tables, LazyAdam state after two steps), plain and compressed."""
    modules, optimizer = _checkpoint_targets(seed=10)
    for _ in range(2):
        for module in modules:
            out = module(np.array([[0, 1], [1, 4]]))
            module.backward(np.ones_like(out))
        optimizer.step()
    folder = tmp_path_factory.mktemp("checkpoints")
    path = folder / "good.npz"
    fastemb.save(path, modules, optimizer)
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    compressed = folder / "compressed.npz"
    np.savez_compressed(compressed, **arrays)
    return {"plain": path.read_bytes(), "compressed": compressed.read_bytes(),
            "tables": [m.weight.copy() for m in modules],
            "state": snapshot_optimizer(optimizer)}


def try_load(path, good):
    """Load ``path`` into fresh targets: either ValueError with nothing changed, or a load
    that restored exactly the saved tables and state (the damage was in bytes that do not
    matter, e.g. a zip timestamp). Returns "rejected" or "loaded"."""
    modules, optimizer = _checkpoint_targets()
    before = snapshot_optimizer(optimizer)
    try:
        fastemb.load(path, modules, optimizer)
    except ValueError:
        assert_same_optimizer(optimizer, before, f"load({path.name})")
        return "rejected"
    for module, table in zip(modules, good["tables"]):
        assert_same_bits(module.weight, table)
    assert_same_optimizer(optimizer, good["state"], "a damaged checkpoint that loaded")
    return "loaded"


@settings(max_examples=examples(3))
@given(data=st.data())
def test_load_damaged_checkpoint_fuzz(good_checkpoint, scratch, data):
    """Random damage to a real checkpoint (plain or compressed): truncation, bit flips,
    overwritten or inserted bytes, a forged .npy header; never a crash, never a wrong table."""
    raw = bytearray(good_checkpoint[data.draw(st.sampled_from(["plain", "compressed"]))])
    for _ in range(data.draw(st.integers(1, 3), label="damages")):
        damage = data.draw(st.sampled_from(["truncate", "flip", "overwrite", "insert",
                                            "delete"]), label="damage")
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)), label="at")
        if damage == "truncate":
            del raw[at:]
        elif damage == "flip" and raw:
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif damage == "overwrite":
            chunk = data.draw(st.binary(min_size=1, max_size=16))
            raw[at:at + len(chunk)] = chunk
        elif damage == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif damage == "delete":
            del raw[at:at + data.draw(st.integers(1, 16))]
    path = scratch(".npz")
    path.write_bytes(bytes(raw))
    COUNTS["load", "matched" if try_load(path, good_checkpoint) == "loaded"
           else "rejected"] += 1


def _forged_header_checkpoint(good, shape, path):
    """The good checkpoint with table_0's .npy header claiming ``shape``."""
    with zipfile.ZipFile(io.BytesIO(good["plain"])) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        for name, member in members.items():
            archive.writestr(name, header.getvalue() + b"\0" * 64 if name == "table_0.npy"
                             else member)
    return path


def test_truncated_checkpoints_at_many_lengths_raise_value_error(good_checkpoint, tmp_path):
    """Every 7th cut of a plain and a compressed checkpoint, and every cut of the last 64
    bytes (the zip directory), raises ValueError and changes nothing."""
    cases = 0
    for kind in ("plain", "compressed"):
        raw = good_checkpoint[kind]
        cuts = sorted(set(range(0, len(raw), 7)) | set(range(max(len(raw) - 64, 0), len(raw))))
        for cut in cuts:
            path = tmp_path / f"{kind}{cut}.npz"
            path.write_bytes(raw[:cut])
            assert try_load(path, good_checkpoint) == "rejected", f"{kind} cut at {cut}"
            path.unlink()
            cases += 1
    COUNTS["load (truncated)", "rejected"] += cases
    assert cases > 300


def _write_zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, member in members.items():
            archive.writestr(name, member)


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


FOREIGN_FILES = {
    "empty": lambda path: path.write_bytes(b""),
    "random bytes": lambda path: path.write_bytes(np.random.default_rng(0).bytes(4096)),
    "zip magic then garbage": lambda path: path.write_bytes(b"PK\x03\x04" + b"\xff" * 200),
    "text": lambda path: path.write_text("table_0,table_1\n1,2\n"),
    "foreign npz": lambda path: np.savez(path, table_0=np.zeros((9, 3), np.float32),
                                         table_1=np.zeros((5, 2))),
    "npz with pickled metadata": lambda path: np.savez(
        path, table_0=np.zeros((9, 3), np.float32), metadata=np.array([{"format": 1}], object)),
    "npz with numeric metadata": lambda path: np.savez(
        path, table_0=np.zeros((9, 3), np.float32), metadata=np.arange(3)),
    "npz with deeply nested metadata": lambda path: np.savez(
        path, metadata=np.array("[" * 100000 + "]" * 100000)),
    "npy": lambda path: np.save(path, np.zeros((9, 3), np.float32)),
    "pickle": lambda path: path.write_bytes(__import__("pickle").dumps({"table_0": [1.0]})),
    "a folder": lambda path: path.mkdir(),
    "zip of other files": lambda path: _write_zip(path, {"x.txt": b"hi"}),
    "zip with an npy of the wrong name": lambda path: _write_zip(
        path, {"weights.npy": _npy_bytes(np.zeros((9, 3), np.float32))}),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN_FILES))
def test_foreign_files_raise_value_error(good_checkpoint, tmp_path, kind):
    path = tmp_path / "foreign.npz"
    FOREIGN_FILES[kind](path)
    if kind == "npy":
        path = tmp_path / "foreign.npz.npy"  # np.save appends .npy
    assert try_load(path, good_checkpoint) == "rejected"
    COUNTS["load (foreign)", "rejected"] += 1


@pytest.mark.parametrize("shape", [(10**6, 10**6), (2**40, 3), (9, 3), (0,), (-1, 3)],
                         ids=str)
def test_forged_array_header_raises_value_error(good_checkpoint, tmp_path, shape):
    """A table header claiming terabytes (MemoryError inside NumPy) is no checkpoint either."""
    try:
        path = _forged_header_checkpoint(good_checkpoint, shape, tmp_path / "forged.npz")
    except ValueError:  # NumPy refuses to write a negative shape
        pytest.skip("NumPy cannot write this header")
    assert try_load(path, good_checkpoint) == "rejected"


@pytest.mark.parametrize("kind", ["plain", "compressed"])
def test_every_single_byte_flip_is_caught_or_harmless(good_checkpoint, tmp_path, kind):
    """Flip one bit in every byte: each load raises ValueError or restores exactly the saved
    data (the zip CRC catches damaged table bytes), and never crashes or loads a wrong table."""
    raw = good_checkpoint[kind]
    outcomes = collections.Counter()
    path = tmp_path / "flipped.npz"
    modules, optimizer = _checkpoint_targets()
    for at in range(len(raw)):
        damaged = bytearray(raw)
        damaged[at] ^= 0x10 if at % 2 else 0x01
        path.write_bytes(bytes(damaged))
        outcomes[try_load(path, good_checkpoint)] += 1
    assert outcomes["rejected"] > len(raw) // 2
    COUNTS["load (bit flips)", "rejected"] += outcomes["rejected"]
    COUNTS["load (bit flips)", "matched"] += outcomes["loaded"]


def test_load_and_save_reject_things_that_are_not_modules(good_checkpoint, tmp_path):
    path = tmp_path / "good.npz"
    path.write_bytes(good_checkpoint["plain"])
    for modules in (None, [None, None], "modules", [np.zeros((9, 3), np.float32)]):
        with pytest.raises(TypeError):
            fastemb.load(path, modules)
        with pytest.raises(TypeError):
            fastemb.save(tmp_path / "other.npz", modules)
    assert not (tmp_path / "other.npz").exists()


def test_a_failed_load_leaves_an_optimizer_and_tables_intact(good_checkpoint, tmp_path):
    """The table matches but the optimizer state is damaged: nothing at all is loaded."""
    path = tmp_path / "damaged_state.npz"
    with zipfile.ZipFile(io.BytesIO(good_checkpoint["plain"])) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    metadata = json.loads(str(np.load(io.BytesIO(members["metadata.npy"]))))
    metadata["optimizer"]["steps"] = [2, "two"]
    buffer = io.BytesIO()
    np.save(buffer, np.array(json.dumps(metadata)))
    members["metadata.npy"] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, member in members.items():
            archive.writestr(name, member)
    assert try_load(path, good_checkpoint) == "rejected"


# --------------------------------------------------------------------------------------------
# The atheris target (fuzz/fuzz_api.py): replayed on random bytes, and run under atheris
# --------------------------------------------------------------------------------------------

FUZZ_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz")


def _fuzz_target():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fuzz_api",
                                                  os.path.join(FUZZ_DIR, "fuzz_api.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_target_on_random_inputs(tmp_path):
    """The atheris target's checks, without atheris: 3,000 random byte strings (each decoded
    into a call with hostile arguments) raise no Finding and crash nothing."""
    target = _fuzz_target()
    rng = np.random.default_rng(12345)
    for number in range(3000):
        data = rng.bytes(int(rng.integers(0, 512)))
        try:
            target.run_one(data, fastemb, str(tmp_path))
        except target.Finding as finding:
            raise AssertionError(f"input {number} ({data.hex()}): {finding}") from finding
    COUNTS["atheris target, random bytes", "matched"] += 3000


def test_fuzz_target_reports_a_contract_violation(monkeypatch, tmp_path):
    """Control: the target turns an undocumented exception into a finding."""
    target = _fuzz_target()

    def broken(*args, **kwargs):
        raise KeyError("broken")

    monkeypatch.setattr(fastemb, "embedding", broken)
    monkeypatch.setattr(fastemb, "embedding_bag", broken)
    monkeypatch.setattr(fastemb, "embedding_backward", broken)
    monkeypatch.setattr(fastemb, "embedding_bag_backward", broken)
    with pytest.raises(KeyError):
        for seed in range(200):  # the first functional input
            target.run_one(np.random.default_rng(seed).bytes(64), fastemb, str(tmp_path))


def test_atheris_fuzzes_the_api_briefly(tmp_path):
    """A short libFuzzer run of fuzz/fuzz_api.py (coverage-guided); any crash, hang or finding
    fails it. Longer runs: ``python fuzz/fuzz_api.py -max_total_time=600``."""
    pytest.importorskip("atheris")
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(os.path.abspath(fastemb.__file__))),
        os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-W", "ignore", os.path.join(FUZZ_DIR, "fuzz_api.py"), "-runs=6000",
         "-max_total_time=20", "-timeout=20", "-rss_limit_mb=4096", "-seed=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr, result.stderr[-3000:]
    runs = re.search(r"Done (\d+) runs", result.stderr)
    COUNTS["atheris run", "matched"] += int(runs.group(1)) if runs else 0


# --------------------------------------------------------------------------------------------
# Crash isolation: the private kernels, called directly with inconsistent arrays, in a child
# process (a segfault fails the test instead of killing the run). Every array a kernel gets
# sits right against an inaccessible page (after its end, or before its start), so reading or
# writing even one element out of bounds is a segfault, not silent garbage. A kernel must raise
# ValueError or return having touched nothing out of bounds.
# --------------------------------------------------------------------------------------------

KERNEL_PRELUDE = r"""
import ctypes, mmap, sys
import numpy as np
sys.path.insert(0, TESTS)
from reference import assert_same_bits, embedding_bag_ref, renorm_ref
import fastemb
from fastemb.sparse import GradientPlan
K = __import__("fastemb." + BUILD, fromlist=["x"])
MODE = {name: K.BagMode["BAG_" + name.upper()] for name in ("sum", "mean", "max")}
METHOD = {name: K.StepMethod["STEP_" + name.upper()]
          for name in ("sgd", "adagrad", "rowwise_adagrad", "adam")}
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE
SIDE = "after"
kept = []

def guarded(array, dtype=None):
    # a copy of array whose first byte (SIDE "before") or last byte (SIDE "after") touches an
    # inaccessible page
    array = np.ascontiguousarray(array, dtype=dtype)
    nbytes = array.nbytes
    pages = max(1, -(-nbytes // PAGE))
    base = libc.mmap(None, (pages + 2) * PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert base and base != ctypes.c_void_p(-1).value
    assert libc.mprotect(base, PAGE, 0) == 0
    assert libc.mprotect(base + (pages + 1) * PAGE, PAGE, 0) == 0
    start = base + PAGE if SIDE == "before" else base + (pages + 1) * PAGE - nbytes
    buffer = (ctypes.c_char * max(nbytes, 1)).from_address(start)
    kept.append(buffer)
    out = np.frombuffer(buffer, dtype=array.dtype, count=array.size).reshape(array.shape)
    out[...] = array
    return out

def I(values):
    return guarded(np.array(values, dtype=np.int64).reshape(-1))

def expect(exception, call):
    try:
        call()
    except exception:
        return
    raise AssertionError(f"expected {exception.__name__}")

def case(name):
    print("CASE", name, flush=True)
"""

KERNEL_SAFE_CASES = r"""
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
f4, f8 = np.float32, np.float64
rng = np.random.default_rng(0)
BAD_ROWS = [-1, 5, 6, INT64_MIN, INT64_MAX, 2**31, -2**31]

def clamp(v, low, high):
    return min(max(int(v), low), high)

def bags_by_hand(weight, indices, bounds, mode, psw, padding):
    # the kernels' documented treatment of inconsistent input: bounds clamped into [0, n],
    # rows outside [0, V) skipped like padding
    n, (V, D) = len(indices), weight.shape
    flat, offsets, weights = [], [], []
    for b in range(len(bounds) - 1):
        start = clamp(bounds[b], 0, n)
        end = clamp(bounds[b + 1], start, n)
        offsets.append(len(flat))
        for k in range(start, end):
            if 0 <= indices[k] < V and indices[k] != padding:
                flat.append(int(indices[k]))
                weights.append(psw[k] if psw is not None else 0)
    with np.errstate(all="ignore"):
        return embedding_bag_ref(np.array(flat, np.int64), weight, np.array(offsets, np.int64),
                                 mode, None if psw is None else np.array(weights, weight.dtype))

for side in ("after", "before"):
    SIDE = side
    for dtype in (f4, f8):
        for threads in (1, 2):
            tag = f"{side} {np.dtype(dtype).name} threads={threads}"
            V, D = 5, 3
            table = rng.standard_normal((V, D)).astype(dtype)
            weight = guarded(table)

            case(f"first_out_of_range {tag}")
            for values in ([], [0, 4], [0, 5], [-1], [INT64_MIN, 0], [0, 1, INT64_MAX]):
                for bound in (V, 0, -1, INT64_MIN):
                    got = K.first_out_of_range(I(values), bound, threads)
                    want = next((i for i, v in enumerate(values) if not 0 <= v < bound), -1)
                    assert got == want, (values, bound, got)

            case(f"first_decrease {tag}")
            for values in ([], [7], [0, 0], [1, 0], [INT64_MIN, INT64_MAX, INT64_MIN]):
                got = K.first_decrease(I(values))
                want = next((i for i in range(1, len(values)) if values[i] < values[i - 1]), -1)
                assert got == want, (values, got)

            case(f"gather_rows {tag}")
            for index_dtype, values in ((np.int64, [0, 4] + BAD_ROWS + [2]),
                                        (np.int32, [0, 4, -1, 5, -2**31, 2**31 - 1, 3])):
                indices = guarded(np.array(values, index_dtype))
                out = guarded(np.full((len(values), D), 7, dtype))
                K.gather_rows(weight, indices, out, threads)
                want = np.array([table[v] if 0 <= v < V else np.zeros(D, dtype) for v in values])
                assert_same_bits(out, want)
                expect(ValueError, lambda: K.gather_rows(weight, indices, guarded(
                    np.zeros((len(values) + 1, D), dtype)), threads))
                expect(ValueError, lambda: K.gather_rows(weight, indices, guarded(
                    np.zeros((len(values), D + 1), dtype)), threads))
            empty = guarded(np.zeros((0, D), dtype))
            out = guarded(np.ones((3, D), dtype))
            K.gather_rows(empty, I([0, -1, 1]), out, threads)
            assert not out.any()

            case(f"bag_reduce {tag}")
            indices = I([0, 4, -1, 2, 5, 2, INT64_MAX, 1, 3, INT64_MIN, 0])
            n = 11
            bound_sets = [[0, 3, 100, 2, -5, 8], [0, INT64_MAX], [INT64_MIN, 4, 2, 11],
                          [5, 5, 5], [-1, -1], [0, 11], [12, 0, 11, 3], [0]]
            for bounds_list in bound_sets:
                bounds = I(bounds_list)
                B = len(bounds_list) - 1
                for mode in ("sum", "mean", "max"):
                    for padding in (-1, 2, 99):
                        for with_weights in ((False, True) if mode != "max" else (False,)):
                            psw = guarded(rng.choice([-1.0, 0.5, 2.0], n), dtype) \
                                if with_weights else None
                            out = guarded(np.full((B, D), 9, dtype))
                            winners = guarded(np.full((B, D), 9, np.int64)) \
                                if mode == "max" else None
                            K.bag_reduce(weight, indices, bounds, MODE[mode], psw, padding, out,
                                         winners, threads)
                            want, want_winners = bags_by_hand(
                                table, np.asarray(indices), bounds_list, mode,
                                None if psw is None else np.asarray(psw), padding)
                            assert_same_bits(out, want)
                            if winners is not None:
                                assert (winners == want_winners).all()
            bounds = I([0, 3, 11])
            for bad in (
                lambda: K.bag_reduce(weight, indices, bounds, MODE["sum"], None, -1,
                                     guarded(np.zeros((3, D), dtype)), None, threads),
                lambda: K.bag_reduce(weight, indices, bounds, MODE["sum"], None, -1,
                                     guarded(np.zeros((2, D + 1), dtype)), None, threads),
                lambda: K.bag_reduce(weight, indices, I([]), MODE["sum"], None, -1,
                                     guarded(np.zeros((0, D), dtype)), None, threads),
                lambda: K.bag_reduce(weight, indices, bounds, MODE["sum"],
                                     guarded(np.ones(3, dtype)), -1,
                                     guarded(np.zeros((2, D), dtype)), None, threads),
                lambda: K.bag_reduce(weight, indices, bounds, MODE["max"], None, -1,
                                     guarded(np.zeros((2, D), dtype)),
                                     guarded(np.zeros((1, D), np.int64)), threads),
                lambda: K.bag_reduce(weight, indices, bounds, MODE["sum"], None, -1,
                                     guarded(np.zeros((2, D), dtype)),
                                     guarded(np.zeros((2, D), np.int64)), threads),
            ):
                expect(ValueError, bad)
            expect(Exception, lambda: K.bag_reduce(weight, indices, bounds, 7, None, -1,
                                                   guarded(np.zeros((2, D), dtype)), None,
                                                   threads))

            case(f"renorm_rows {tag}")
            target = guarded(table * 10)
            K.renorm_rows(target, I([3, -1, 5, INT64_MAX, 0, INT64_MIN]), 1.0, 2.0, threads)
            assert_same_bits(target, renorm_ref(table * 10, [3, 0], 1.0))
            K.renorm_rows(guarded(np.zeros((0, D), dtype)), I([0, 1]), 1.0, 2.0, threads)

            case(f"group_by_row {tag}")
            values = [3, -1, 0, 5, 3, INT64_MAX, 2, INT64_MIN, 0, 3, 4]
            for num_rows in (5, 1, 0, -3, 2**62):
                for padding in (-1, 3, 2**40):
                    rows, starts, order = K.group_by_row(I(values), num_rows, padding, threads)
                    kept = [(v, p) for p, v in enumerate(values)
                            if 0 <= v < num_rows and v != padding]
                    want_rows = sorted({v for v, _ in kept})
                    assert rows.tolist() == want_rows, (num_rows, padding, rows)
                    groups = [[p for v, p in kept if v == r] for r in want_rows]
                    assert starts.tolist() == list(np.cumsum([0] + [len(g) for g in groups]))
                    assert order.tolist() == [p for g in groups for p in g]
                    # small payloads are packed with the row into one int64 for the sort;
                    # negative or huge ones (and rows near 2**62) take the two-array sort
                    for carry in (lambda p: 100 + 7 * p, lambda p: p - 5,
                                  lambda p: INT64_MAX - p, lambda p: INT64_MIN + p):
                        payload = I([carry(p) for p in range(len(values))])
                        rows, starts, carried = K.group_by_row(I(values), num_rows, padding,
                                                               threads, payload)
                        assert carried.tolist() == [carry(p) for g in groups for p in g]
            for wrong in (I(range(len(values) - 1)), I(range(len(values) + 1))):
                expect(ValueError, lambda: K.group_by_row(I(values), 5, -1, threads, wrong))

            case(f"bags_of_positions {tag}")
            for bounds_list in bound_sets:
                bag_of = guarded(np.full(n, -7, np.int64))
                K.bags_of_positions(I(bounds_list), bag_of, threads)
                if threads == 1:
                    want = [-7] * n
                    for b in range(len(bounds_list) - 1):
                        for k in range(clamp(bounds_list[b], 0, n),
                                       clamp(bounds_list[b + 1], 0, n)):
                            want[k] = b
                    assert bag_of.tolist() == want, (bounds_list, bag_of)

            case(f"bag_gradient_factors {tag}")
            for bounds_list in bound_sets:
                B = len(bounds_list) - 1
                for mode, psw in (("mean", None), ("mean", guarded(np.ones(n), dtype)),
                                  ("sum", guarded(np.full(n, 0.5), dtype))):
                    coefficients = guarded(np.full(n, 5, dtype))
                    totals = guarded(np.full(max(B, 0), 5, dtype))
                    with np.errstate(all="ignore"):
                        K.bag_gradient_factors(coefficients, totals, indices, I(bounds_list),
                                               MODE[mode], psw, 2, threads)
            expect(ValueError, lambda: K.bag_gradient_factors(
                guarded(np.zeros(n - 1, dtype)), guarded(np.zeros(2, dtype)), indices,
                I([0, 3, 11]), MODE["mean"], None, -1, threads))
            expect(ValueError, lambda: K.bag_gradient_factors(
                guarded(np.zeros(n, dtype)), guarded(np.zeros(3, dtype)), indices,
                I([0, 3, 11]), MODE["mean"], None, -1, threads))
            expect(ValueError, lambda: K.bag_gradient_factors(
                guarded(np.zeros(n, dtype)), guarded(np.zeros(2, dtype)), indices,
                I([0, 3, 11]), MODE["sum"], guarded(np.ones(n - 2), dtype), -1, threads))
            expect(ValueError, lambda: K.bag_gradient_factors(
                guarded(np.zeros(n, dtype)), guarded(np.zeros(2, dtype)), indices,
                I([0, 3, 11]), MODE["sum"], None, -1, threads))

            case(f"sample_weights_grad {tag}")
            grad = guarded(rng.standard_normal((3, D)), dtype)
            out = guarded(np.full(n, 5, dtype))
            bag_of = I([0, 1, 2, -1, 3, 99, INT64_MIN, 0, 1, 2, INT64_MAX])
            K.sample_weights_grad(weight, indices, bag_of, grad, None, None, -1, out, threads)
            for p in range(n):
                row, b = int(indices[p]), int(bag_of[p])
                if not (0 <= row < V and 0 <= b < 3):
                    assert out[p] == 0, p
            K.sample_weights_grad(weight, indices, bag_of, grad, guarded(np.zeros((3, D)), dtype),
                                  guarded(np.zeros(3), dtype), -1, out, threads)
            for bad in (
                lambda: K.sample_weights_grad(weight, indices, I([0] * (n - 1)), grad, None,
                                              None, -1, out, threads),
                lambda: K.sample_weights_grad(weight, indices, bag_of, grad, None, None, -1,
                                              guarded(np.zeros(n + 1, dtype)), threads),
                lambda: K.sample_weights_grad(weight, indices, bag_of,
                                              guarded(np.zeros((3, D + 1), dtype)), None, None,
                                              -1, out, threads),
                lambda: K.sample_weights_grad(weight, indices, bag_of, grad,
                                              guarded(np.zeros((2, D)), dtype), guarded(
                                                  np.zeros(2), dtype), -1, out, threads),
                lambda: K.sample_weights_grad(weight, indices, bag_of, grad,
                                              guarded(np.zeros((3, D)), dtype), None, -1, out,
                                              threads),
            ):
                expect(ValueError, bad)

            case(f"accumulate_rows {tag}")
            grad = guarded(rng.standard_normal((4, D)), dtype)
            values = guarded(np.full((3, D), 5, dtype))
            # order and source entries that name no position or grad row are skipped
            K.accumulate_rows(grad, I([0, 1]), I([0, 3, 5]), I([0, -1, 2, 4, 1]), None, None,
                              False, None, values[:2], threads)
            assert_same_bits(values[0], grad[0] + grad[2])
            assert_same_bits(values[1], np.asarray(grad[1]))
            K.accumulate_rows(grad, I([0]), I([0, 3]), I([0, 1, 2]), I([3, -5, 2**40]), None,
                              False, None, values[:1], threads)
            assert_same_bits(values[0], np.asarray(grad[3]))
            for bad in (
                # decreasing starts, even inside the order array
                lambda: K.accumulate_rows(grad, I([0, 1, 2]), I([0, 3, 1, 4]), I([0, 1, 2, 3]),
                                          None, None, False, None, values, threads),
                # fewer coefficients than positions
                lambda: K.accumulate_rows(grad, I([0]), I([0, 1]), I([0]), None,
                                          guarded(np.ones(3, dtype)), False, None,
                                          guarded(np.zeros((1, D), dtype)), threads),
                lambda: K.accumulate_rows(grad, I([0]), I([-1, 1]), I([0]), None, None, False,
                                          None, guarded(np.zeros((1, D), dtype)), threads),
                lambda: K.accumulate_rows(grad, I([0]), I([0, 2]), I([0]), None, None, False,
                                          None, guarded(np.zeros((1, D), dtype)), threads),
                lambda: K.accumulate_rows(grad, I([0]), I([0, 1, 1]), I([0]), None, None, False,
                                          None, guarded(np.zeros((1, D), dtype)), threads),
                lambda: K.accumulate_rows(grad, I([0]), I([0, 1]), I([0]), None, None, False,
                                          None, guarded(np.zeros((2, D), dtype)), threads),
                lambda: K.accumulate_rows(grad, I([0]), I([0, 1]), I([0]), None, None, False,
                                          guarded(np.zeros((3, D), np.int64)),
                                          guarded(np.zeros((1, D), dtype)), threads),
            ):
                expect(ValueError, bad)

            case(f"sparse_step {tag}")
            for method, states in (("sgd", (None, None)),
                                   ("adagrad", (np.zeros((V, D)), None)),
                                   ("rowwise_adagrad", (np.zeros((V, 1)), None)),
                                   ("adam", (np.zeros((V, D)), np.zeros((V, D))))):
                target = guarded(table)
                state_a, state_b = (None if x is None else guarded(x, dtype) for x in states)
                g = guarded(np.ones((3, D)), dtype)
                plan = GradientPlan(g, I([0, 1, 2, 3]), I([0, 1, 2]))
                K.sparse_step(METHOD[method], target, state_a, state_b, I([-1, 2, INT64_MAX]),
                              plan, -0.5, 0.1, 0.01, 1e-8, False, 0.0, threads)
                changed = np.flatnonzero((np.asarray(target) != table).any(axis=1)).tolist()
                assert changed == [2], (method, changed)
                wrong = {"sgd": [], "adagrad": [(np.zeros((V, 1)), None), (np.zeros((V - 1, D)),
                                                                            None), (None, None)],
                         "rowwise_adagrad": [(np.zeros((V, D)), None), (np.zeros((V + 1, 1)),
                                                                         None), (None, None)],
                         "adam": [(np.zeros((V, D)), np.zeros((V, 1))),
                                  (np.zeros((V, D)), None), (None, np.zeros((V, D))),
                                  (np.zeros((V, D)), np.zeros((V + 1, D)))]}[method]
                for a, b in wrong:
                    before = np.array(target)
                    expect(ValueError, lambda: K.sparse_step(
                        METHOD[method], target, None if a is None else guarded(a, dtype),
                        None if b is None else guarded(b, dtype), I([0]), plan, -0.5, 0.1, 0.01,
                        1e-8, False, 0.0, threads))
                    assert_same_bits(target, before)
                expect(ValueError, lambda: K.sparse_step(
                    METHOD[method], target, state_a, state_b, I([0, 1]), plan, -0.5, 0.1, 0.01,
                    1e-8, False, 0.0, threads))
                expect(ValueError, lambda: K.sparse_step(
                    METHOD[method], target, state_a, state_b, I([0]), GradientPlan(
                        guarded(np.ones((3, D + 1)), dtype), I([0, 3]), I([0, 1, 2])),
                    -0.5, 0.1, 0.01, 1e-8, False, 0.0, threads))
            expect(ValueError, lambda: K.sparse_step(7, guarded(table), None, None,
                                                     I([0]), plan, -0.5, 0, 0, 0, False, 0.0, 1))
print("ALL OK", flush=True)
"""

# Inconsistent GradientPlans: each once read out of bounds (the kernels trusted the plan).
KERNEL_CRASH_CASES = {
    "accumulate_rows: starts past the order array in the middle": (
        "K.accumulate_rows(guarded(np.ones((1, 3), np.float32)), I([0, 1]), I([0, 2**40, 1]),"
        " I([0]), None, None, False, None, np.empty((2, 3), np.float32), 1)"),
    "accumulate_rows: an order entry past grad": (
        "K.accumulate_rows(guarded(np.ones((1, 3), np.float32)), I([0]), I([0, 1]), I([1]),"
        " None, None, False, None, np.empty((1, 3), np.float32), 1)"),
    "accumulate_rows: a source entry past grad": (
        "K.accumulate_rows(guarded(np.ones((1, 3), np.float32)), I([0]), I([0, 1]), I([0]),"
        " I([2**40]), None, False, None, np.empty((1, 3), np.float32), 1)"),
    "accumulate_rows: fewer coefficients than positions": (
        "K.accumulate_rows(guarded(np.ones((3, 3), np.float32)), I([0]), I([0, 1]), I([2]),"
        " None, guarded(np.ones(1, np.float32)), False, None, np.empty((1, 3), np.float32), 1)"),
    "sparse_step: winners narrower than grad": (
        "K.sparse_step(METHOD['sgd'], guarded(np.ones((4, 3), np.float32)), None, None, I([0]),"
        " GradientPlan(guarded(np.ones((1, 3), np.float32)), I([0, 1]), I([0]),"
        " winners=I([0]).reshape(1, 1)), -0.1, 0, 0, 0, False, 0.0, 1)"),
    "sparse_step: starts past the order array": (
        "K.sparse_step(METHOD['sgd'], guarded(np.ones((4, 3), np.float32)), None, None, I([0]),"
        " GradientPlan(guarded(np.ones((1, 3), np.float32)), I([0, 2**40]), I([0])),"
        " -0.1, 0, 0, 0, False, 0.0, 1)"),
    "sparse_step: negative starts": (
        "K.sparse_step(METHOD['sgd'], guarded(np.ones((4, 3), np.float32)), None, None, I([0]),"
        " GradientPlan(guarded(np.ones((1, 3), np.float32)), I([-2**40, 1]), I([0])),"
        " -0.1, 0, 0, 0, False, 0.0, 1)"),
    "sparse_step: an order entry past grad": (
        "K.sparse_step(METHOD['sgd'], guarded(np.ones((4, 3), np.float32)), None, None, I([0]),"
        " GradientPlan(guarded(np.ones((1, 3), np.float32)), I([0, 1]), I([1])),"
        " -0.1, 0, 0, 0, False, 0.0, 1)"),
    "sparse_step: a source entry past grad": (
        "K.sparse_step(METHOD['sgd'], guarded(np.ones((4, 3), np.float32)), None, None, I([0]),"
        " GradientPlan(guarded(np.ones((1, 3), np.float32)), I([0, 1]), I([0]),"
        " source=I([2**40])), -0.1, 0, 0, 0, False, 0.0, 1)"),
    "sparse_step: fewer coefficients than positions": (
        "K.sparse_step(METHOD['sgd'], guarded(np.ones((4, 3), np.float32)), None, None, I([0]),"
        " GradientPlan(guarded(np.ones((3, 3), np.float32)), I([0, 1]), I([2]),"
        " coefficients=guarded(np.ones(1, np.float32))), -0.1, 0, 0, 0, False, 0.0, 1)"),
    "sparse_step: a group but an empty order array": (
        "K.sparse_step(METHOD['sgd'], guarded(np.ones((4, 3), np.float32)), None, None, I([0]),"
        " GradientPlan(guarded(np.ones((1, 3), np.float32)), I([0, 1]), I([])),"
        " -0.1, 0, 0, 0, False, 0.0, 1)"),
}
# Thread counts below 1: each once crashed (0 ran OpenMP's default team over sparse_step's
# single gradient buffer; a negative count made libgomp abort the process).
THREAD_CRASH_CASES = {
    "sparse_step: num_threads=0": (
        "V, D = 4096, 16; rows = np.arange(V, dtype=np.int64); w = np.zeros((V, D), np.float32)\n"
        "K.sparse_step(METHOD['sgd'], w, None, None, rows,"
        " GradientPlan(np.ones((V, D), np.float32), np.arange(V + 1, dtype=np.int64),"
        " rows.copy()), -1.0, 0, 0, 0, False, 0.0, 0)\n"
        "assert (w == -1).all()"),
    "gather_rows: num_threads=-1": (
        "out = np.empty((5000, 3), np.float32)\n"
        "K.gather_rows(np.ones((4, 3), np.float32), np.zeros(5000, np.int64), out, -1)"),
    "bag_reduce: num_threads=-1": (
        "out = np.empty((2, 3), np.float32)\n"
        "K.bag_reduce(np.ones((4, 3), np.float32), np.zeros(4, np.int64),"
        " np.array([0, 2, 4]), MODE['sum'], None, -1, out, None, -1)"),
}


def _kernel_builds():
    builds = ["_core"]
    try:
        from fastemb import _core_avx2  # noqa: F401

        if fastemb._core.cpu_has_avx2():
            builds.append("_core_avx2")
    except ImportError:
        pass
    return builds


def run_kernel_script(build, body, threads=2):
    """Run ``body`` after KERNEL_PRELUDE in a fresh interpreter; returns CompletedProcess."""
    import subprocess
    import sys

    prelude = KERNEL_PRELUDE.replace("TESTS", repr(os.path.dirname(os.path.abspath(__file__))))
    prelude = prelude.replace("BUILD", repr(build))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [
                   os.path.dirname(os.path.dirname(os.path.abspath(fastemb.__file__))),
                   os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", prelude + body], capture_output=True,
                          text=True, timeout=300, env=env)


def describe(result):
    last = [line for line in result.stdout.splitlines() if line.startswith("CASE")][-1:]
    return (f"exit status {result.returncode} (a negative status is the signal that killed it)"
            f", last case started: {last}\nstdout tail: {result.stdout[-500:]}\n"
            f"stderr tail: {result.stderr[-2000:]}")


def test_the_guard_pages_catch_an_out_of_bounds_read():
    """The harness itself: reading one element past a guarded array kills the child."""
    body = ("a = guarded(np.arange(10.0))\n"
            "p = a.ctypes.data_as(ctypes.POINTER(ctypes.c_double))\n"
            "assert p[9] == 9.0\nprint('IN BOUNDS OK', flush=True)\np[10]\nprint('ALL OK')")
    result = run_kernel_script("_core", body)
    assert "IN BOUNDS OK" in result.stdout and result.returncode != 0
    assert "ALL OK" not in result.stdout


@pytest.mark.parametrize("build", _kernel_builds())
def test_kernels_given_inconsistent_arrays_raise_or_stay_in_bounds(build):
    """Every kernel with out-of-range rows, garbage bag bounds, wrong shapes and wrong state
    shapes: ValueError, or a result that only used the in-bounds part (checked against the
    documented clamping), on guarded arrays, serial and parallel."""
    result = run_kernel_script(build, KERNEL_SAFE_CASES)
    assert result.returncode == 0 and "ALL OK" in result.stdout, describe(result)


def _kernel_outcome(build, statement):
    """Run one kernel call in a child: it must raise ValueError or return, and the child must
    exit cleanly (a heap overrun may only show when the interpreter frees memory at exit)."""
    body = ("try:\n" + "\n".join("    " + line for line in statement.splitlines())
            + "\nexcept ValueError as error:\n    print('RAISED', error)\nprint('ALL OK')\n")
    result = run_kernel_script(build, body, threads=4)
    if re.search(r"^(NameError|SyntaxError|AttributeError|ImportError|TypeError)",
                 result.stderr, re.M):  # the harness, not the kernel (the xfail must not hide it)
        raise RuntimeError(f"the kernel script itself is broken:\n{result.stderr[-2000:]}")
    assert result.returncode == 0 and "ALL OK" in result.stdout, describe(result)


@pytest.mark.parametrize("name", sorted(KERNEL_CRASH_CASES))
def test_gradient_kernels_check_their_plan(name):
    _kernel_outcome("_core", KERNEL_CRASH_CASES[name])


@pytest.mark.parametrize("name", sorted(THREAD_CRASH_CASES))
def test_kernels_check_their_thread_count(name):
    _kernel_outcome("_core", THREAD_CRASH_CASES[name])


# --------------------------------------------------------------------------------------------
# The totals (keep last: it reads what the tests above counted)
# --------------------------------------------------------------------------------------------


def test_zz_case_counts(capsys):
    """Print how many hostile cases ran, and check each fuzz test ran both kinds."""
    if not COUNTS:
        pytest.skip("no fuzz test ran in this session")
    entries = sorted({entry for entry, _ in COUNTS})
    lines = [f"{entry}: {COUNTS[entry, 'matched']} matched the reference, "
             f"{COUNTS[entry, 'rejected']} rejected" for entry in entries]
    total = sum(COUNTS.values())
    with capsys.disabled():
        print(f"\nhostile-input cases: {total} in all\n  " + "\n  ".join(lines))
    report = os.environ.get("FASTEMB_FUZZ_REPORT")
    if report:
        with open(report, "w") as file:
            json.dump({"total": total, "by_entry": {
                entry: {"matched": COUNTS[entry, "matched"],
                        "rejected": COUNTS[entry, "rejected"]} for entry in entries}}, file,
                indent=1)
    for entry in ("embedding", "embedding_bag", "embedding_bag_backward", "embedding_backward",
                  "module forward", "module backward", "SparseGrad"):
        ran = COUNTS[entry, "matched"] + COUNTS[entry, "rejected"]
        if ran == 0:
            continue  # that test was deselected
        for outcome in ("matched", "rejected"):
            assert COUNTS[entry, outcome] >= MINIMUM_SHARE * ran, (
                f"{entry}: only {COUNTS[entry, outcome]} of {ran} cases {outcome}; the fuzzing "
                "no longer explores both valid and hostile input")
