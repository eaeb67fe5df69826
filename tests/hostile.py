"""The machinery of the hostile-input tests (``test_hostile_*.py``): every public entry point,
fuzzed with hypothesis, never crashes.

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
``test_hostile_totals.py`` (run last) prints the totals (and writes them as JSON to
``$FASTEMB_FUZZ_REPORT`` when that is set) and checks that each fuzz test ran both valid and
hostile cases. The number of examples scales with the hypothesis profile
(``HYPOTHESIS_PROFILE=thorough`` runs 10x as many).

The test files by area: lookups, modules (and SparseGrad), optimizers, checkpoint files, the
atheris target ``fuzz/fuzz_api.py``, and the private kernels in a child process on arrays that
sit against inaccessible pages (crash isolation).
"""

import collections
import numbers

import numpy as np
from hypothesis import note, settings
from hypothesis import strategies as st
from reference import assert_same_bits, renorm_ref

import fastemb
from fastemb._dtypes import TABLE_DTYPES

COUNTS = collections.Counter()  # (entry point, "matched" | "rejected") -> cases
MINIMUM_SHARE = 0.08  # each fuzz test must run at least this share of each kind of case


def examples(factor):
    """``factor`` times the profile's example count (120 by default, 1200 when thorough)."""
    return settings.default.max_examples * factor


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# the 16-bit tables the lookups also take (computed in float32)
HALF_FLOATS = tuple(dtype for dtype in TABLE_DTYPES if dtype not in FLOATS)
seeds = st.integers(0, 2**32 - 1)


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


def weight_oracle(weight, reduced_precision=False):
    """(errors, array): a table must be a 2-D float32 or float64 array (with
    ``reduced_precision``, the lookups', also float16/bfloat16; array-likes converted)."""
    try:
        array = weight if isinstance(weight, np.ndarray) else np.asarray(weight)
    except ValueError:
        return {ValueError}, None
    errors = set()
    if array.dtype not in (FLOATS + HALF_FLOATS if reduced_precision else FLOATS):
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


def computed_in(dtype):
    """The dtype a lookup on a table of ``dtype`` computes in: float32 for a 16-bit table."""
    return np.dtype(np.float32) if dtype in HALF_FLOATS else dtype


def renorm_as_fastemb(table, indices, max_norm, norm_type):
    """renorm_ref as fastemb applies max_norm: a 16-bit table in float32, rounded back. (The
    arguments as floats: NumPy would compare a float64 norm with an np.float32 max_norm in
    float32; fastemb takes max_norm as a Python float.)"""
    renormed = renorm_ref(table.astype(computed_in(table.dtype)), indices, float(max_norm),
                          float(norm_type))
    return renormed.astype(table.dtype)


def sample_weights_oracle(psw, input_shape, table_dtype):
    """(errors, array) for per_sample_weights: the dtype the lookup computes in, or a 16-bit
    table's own (an array-like of real numbers is converted), and the input's shape."""
    dtype = None if table_dtype is None else computed_in(table_dtype)
    if isinstance(psw, np.ndarray):
        errors = set()
        if dtype is not None and psw.dtype not in (dtype, table_dtype):
            errors.add(TypeError)
        if input_shape is not None and psw.shape != tuple(input_shape):
            errors.add(ValueError)
        return errors, (None if errors else psw.astype(dtype))
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


shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


# --------------------------------------------------------------------------------------------
# Bag arguments (the lookups and the modules draw them), optimizer snapshots (the optimizer and
# checkpoint tests compare them)
# --------------------------------------------------------------------------------------------

MODES = ["sum", "mean", "max"]


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
