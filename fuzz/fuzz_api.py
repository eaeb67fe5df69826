"""Coverage-guided fuzzing of fastemb's public API with atheris (libFuzzer for Python).

    pip install atheris
    python fuzz/fuzz_api.py -max_total_time=600          # fuzz for 10 minutes
    python fuzz/fuzz_api.py crash-<hash>                 # replay a finding

Each input (a byte string) is decoded into one call of a public entry point (embedding,
embedding_bag, embedding_backward, embedding_bag_backward, Embedding/EmbeddingBag and their
from_pretrained, forward and backward, SparseGrad and +, optimizer construction, step and
load_state_dict, fastemb.load) with arguments built from raw bytes: index arrays of any dtype
holding any bit pattern (so every extreme value), tables holding any float bits (NaN payloads,
inf, denormals), offsets, weights and gradients in odd layouts, wrong types and shapes.

What counts as a finding:
- a crash (segfault, abort) or a hang: libFuzzer reports it;
- an exception of an undocumented type (anything but TypeError, ValueError, IndexError,
  RuntimeError; MemoryError only where the input asks for a huge array);
- an array argument modified by a call that raised;
- a result of the wrong shape or dtype, or an embedding forward that differs from NumPy's
  ``weight[input]``.

``run_one(data)`` does all of that for one input without atheris, so the tests replay it on
random bytes (tests/test_hostile_fuzz_target.py) and run this file under atheris when it is
installed.
"""

import os
import sys
import tempfile

import numpy as np

DOCUMENTED = (TypeError, ValueError, IndexError, RuntimeError)
INDEX_DTYPES = ["i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", ">i8", ">u4", "?", "f2", "f4",
                "f8", "c8", "M8[s]", "m8[s]", "O"]
FLOAT_DTYPES = ["f4", "f4", "f8", "f8", "f2", ">f4", "i4", "c8", "O"]


class Bytes:
    """Reads decisions from the fuzzer's bytes (zeros once they run out)."""

    def __init__(self, data):
        self.data = memoryview(bytes(data))
        self.at = 0

    def take(self, count):
        chunk = bytes(self.data[self.at:self.at + count])
        self.at += len(chunk)
        return chunk + b"\0" * (count - len(chunk))

    def byte(self):
        return self.take(1)[0]

    def int(self, low, high):
        """An int in [low, high]."""
        return low + int.from_bytes(self.take(4), "little") % (high - low + 1)

    def choice(self, options):
        return options[self.byte() % len(options)]

    def bool(self):
        return bool(self.byte() & 1)


def array_from(reader, dtype, shape):
    """An array of ``shape`` whose elements are raw fuzzer bytes read as ``dtype``, in a
    layout the fuzzer picks (C, Fortran, strided, reversed, read-only)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    if dtype == object:
        values = [reader.int(-3, 12) for _ in range(count)]
        array = np.array(values + [None], dtype=object)[:-1].reshape(shape)
    else:
        raw = reader.take(count * dtype.itemsize)
        array = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).copy()
        if dtype.kind in "iu" and count and reader.bool():
            # mostly small values, so that valid calls happen too
            array = np.asarray(array.astype(np.int64) % 13).astype(dtype)
    layout = reader.choice(["C", "C", "C", "F", "strided", "reversed", "readonly"])
    if layout == "F" and array.ndim >= 2:
        array = np.asfortranarray(array)
    elif layout == "strided" and array.ndim:
        wide = np.zeros(array.shape[:-1] + (array.shape[-1] * 2,), dtype)
        wide[..., ::2] = array
        array = wide[..., ::2]
    elif layout == "reversed" and array.ndim and array.shape[0]:
        array = np.ascontiguousarray(array[::-1])[::-1]
    elif layout == "readonly":
        array.flags.writeable = False
    return array


def shape_of(value):
    try:
        return np.shape(value)
    except ValueError:  # a ragged list
        return (2,)


def shape_from(reader, max_dims=3, max_size=6):
    return tuple(reader.int(0, max_size) for _ in range(reader.int(0, max_dims)))


def argument(reader, make_array, python_values):
    """Mostly an array, sometimes a hostile Python value."""
    if reader.byte() < 220:
        return make_array()
    return reader.choice(python_values)


HOSTILE_PYTHON = [None, 3, -1, 2**64, 2**70, 1.5, float("nan"), "1", [1, [2]], [[0, 1], [2]],
                  [], [0, 1], (0, 1), {0: 1}, True, b"ab", np.float32(1), object()]


def indices(reader):
    return argument(reader, lambda: array_from(reader, reader.choice(INDEX_DTYPES),
                                               shape_from(reader)), HOSTILE_PYTHON)


def table(reader):
    def make():
        shape = (reader.int(0, 9), reader.int(0, 6)) if reader.byte() < 230 else \
            shape_from(reader)
        return array_from(reader, reader.choice(FLOAT_DTYPES), shape)
    return argument(reader, make, HOSTILE_PYTHON + [[[1.0, 2.0]], [[1.0], [2.0, 3.0]]])


def small(reader):
    """A size, index or hyperparameter: usually a small int, sometimes anything."""
    return reader.choice([0, 1, 2, 3, 5, 7, -1, -8, 2**31, 2**63, 2**64, 1.0, 0.5, -0.5,
                          float("inf"), float("nan"), None, "2", True, np.int64(3),
                          np.uint64(2**64 - 1), 1e-8, 0.9, 0.999])


def arrays_in(values):
    found = []
    for value in values:
        if isinstance(value, np.ndarray):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += [v for v in value if isinstance(v, np.ndarray)]
        elif isinstance(value, dict):
            found += arrays_in(list(value.values()))
    return found


class Finding(AssertionError):
    """Something the contract forbids (not an ordinary rejection)."""


def call(function, *args, **kwargs):
    """Call ``function``; a documented exception must leave every array argument unchanged.
    Returns (True, result) or (False, None)."""
    arrays = arrays_in(list(args) + list(kwargs.values()))
    saved = [(a, a.tobytes(), a.dtype, a.shape) for a in arrays]
    try:
        return True, function(*args, **kwargs)
    except DOCUMENTED:
        for number, (array, data, dtype, shape) in enumerate(saved):
            if array.tobytes() != data or array.dtype != dtype or array.shape != shape:
                raise Finding(f"{function.__qualname__} raised and modified argument {number}")
        return False, None
    except MemoryError:
        return False, None  # a shape of huge sizes, asked for by the input itself


def check_lookup(out, input_value, weight):
    """A successful embedding forward: NumPy's ``weight[input]`` (same bits, NaN included)."""
    expected = np.asarray(weight)[np.asarray(input_value).astype(np.int64)]
    if out.dtype != expected.dtype or out.shape != expected.shape:
        raise Finding(f"embedding gave {out.dtype} {out.shape}, expected {expected.dtype} "
                      f"{expected.shape}")
    if out.tobytes() != expected.tobytes():
        raise Finding("embedding differs from weight[input]")


def fuzz_functional(reader, fastemb):
    kind = reader.choice(["embedding", "bag", "backward", "bag_backward"])
    weight, input_value = table(reader), indices(reader)
    padding_idx = reader.choice([None, None, None, small(reader)])
    max_norm = reader.choice([None, None, None, small(reader)])
    norm_type = reader.choice([2.0, 2.0, small(reader)])
    if kind == "embedding":
        ok, out = call(fastemb.embedding, input_value, weight, padding_idx, max_norm, norm_type)
        if ok and max_norm is None:
            check_lookup(out, input_value, weight)
        return
    offsets = argument(reader, lambda: array_from(reader, reader.choice(INDEX_DTYPES),
                                                  shape_from(reader, 1, 8)), HOSTILE_PYTHON)
    if reader.bool():
        offsets = None
    mode = reader.choice(["sum", "mean", "max", "sum", "mean", "max", "min", None, 1])
    psw = None
    if reader.bool():
        psw = argument(reader, lambda: array_from(reader, reader.choice(FLOAT_DTYPES),
                                                  shape_of(input_value) if reader.byte() < 200
                                                  else shape_from(reader)), HOSTILE_PYTHON)
    include_last_offset = reader.bool()
    if kind == "bag":
        ok, out = call(fastemb.embedding_bag, input_value, weight, offsets, mode, psw,
                       include_last_offset, padding_idx, max_norm, norm_type)
        if ok and (out.ndim != 2 or out.dtype != np.asarray(weight).dtype
                   or out.shape[1] != np.asarray(weight).shape[1]):
            raise Finding(f"embedding_bag gave {out.dtype} {out.shape}")
        return
    scale = reader.bool()
    grad = argument(reader, lambda: array_from(reader, reader.choice(FLOAT_DTYPES),
                                               shape_from(reader)), HOSTILE_PYTHON)
    if kind == "backward":
        ok, result = call(fastemb.embedding_backward, grad, input_value, small(reader),
                          padding_idx, scale)
    else:
        ok, result = call(fastemb.embedding_bag_backward, grad, input_value, weight, offsets,
                          mode, psw, include_last_offset, padding_idx, scale)
        if ok and isinstance(result, tuple):
            result = result[0]
    if ok:
        check_gradient(result)


def check_gradient(grad):
    values = grad.values
    rows = grad.rows
    if rows.dtype != np.int64 or values.shape != (rows.size, grad.shape[1]):
        raise Finding(f"malformed gradient: rows {rows.dtype} {rows.shape}, values "
                      f"{values.shape}, shape {grad.shape}")
    if rows.size and (rows[0] < 0 or rows[-1] >= grad.num_embeddings
                      or np.any(np.diff(rows) <= 0)):
        raise Finding("gradient rows are not sorted, unique and in range")


def fuzz_module(reader, fastemb):
    bag = reader.bool()
    cls = fastemb.EmbeddingBag if bag else fastemb.Embedding
    options = dict(padding_idx=reader.choice([None, None, small(reader)]),
                   max_norm=reader.choice([None, None, None, small(reader)]),
                   norm_type=reader.choice([2.0, 2.0, small(reader)]),
                   scale_grad_by_freq=reader.bool())
    if bag:
        options.update(mode=reader.choice(["sum", "mean", "max", "median"]),
                       include_last_offset=reader.bool())
        if options["mode"] == "max" and reader.byte() < 200:
            options["scale_grad_by_freq"] = False
    if reader.bool():
        ok, module = call(cls.from_pretrained, table(reader), freeze=reader.bool(), **options)
    else:
        sizes = [reader.choice([0, 1, 3, 5, 5, 5, -1, 2.0, None]) for _ in range(2)]
        ok, module = call(cls, *sizes, dtype=reader.choice(["float32", "float64", "float16",
                                                            None, int]), seed=reader.int(0, 9),
                          **options)
    if not ok:
        return
    for _ in range(reader.int(1, 3)):
        input_value = indices(reader)
        if bag:
            offsets = None if reader.bool() else argument(
                reader, lambda: array_from(reader, reader.choice(INDEX_DTYPES),
                                           shape_from(reader, 1, 8)), HOSTILE_PYTHON)
            psw = None if reader.bool() else argument(
                reader, lambda: array_from(reader, reader.choice(FLOAT_DTYPES),
                                           shape_of(input_value)), HOSTILE_PYTHON)
            ok, out = call(module, input_value, offsets, psw)
        else:
            ok, out = call(module, input_value)
        if reader.bool() and ok:
            grad = np.ones_like(out) if reader.bool() else array_from(
                reader, reader.choice(FLOAT_DTYPES), out.shape if reader.bool()
                else shape_from(reader))
        else:
            grad = argument(reader, lambda: array_from(reader, "f4", shape_from(reader)),
                            HOSTILE_PYTHON)
        ok, result = call(module.backward, grad)
        if ok:
            check_gradient(result)
            if module.grad is None:
                raise Finding("backward did not set module.grad")
    if reader.bool():
        fuzz_optimizer(reader, fastemb, [module])


def fuzz_optimizer(reader, fastemb, modules):
    name = reader.choice(["SGD", "LazyAdam", "Adagrad", "RowWiseAdagrad"])
    cls = getattr(fastemb.optim, name)
    kwargs = {"lr": small(reader)} if name == "SGD" or reader.bool() else {}
    if name == "LazyAdam" and reader.bool():
        kwargs["betas"] = reader.choice([(0.9, 0.999), (small(reader), small(reader)), None,
                                         (0.5,), "ab"])
    if reader.bool():
        kwargs["eps"] = small(reader)
    target = reader.choice([modules, modules[0], modules * 2, [], None])
    ok, optimizer = call(cls, target, **kwargs)
    if not ok:
        return
    for module in optimizer.modules:
        if reader.bool():
            rows = array_from(reader, reader.choice(["i8", "u8", "i4", "f8"]), (reader.int(0, 4),))
            values = array_from(reader, reader.choice(FLOAT_DTYPES),
                                (rows.size, reader.int(0, 6)))
            ok, grad = call(fastemb.SparseGrad, rows, values, small(reader))
            module.grad = grad if ok else reader.choice([None, module.grad, "x"])
    before = [(m.weight.copy(), {k: (v.copy() if isinstance(v, np.ndarray) else v)
                                 for k, v in optimizer.state[m].items()})
              for m in optimizer.modules]
    try:
        optimizer.step()
    except DOCUMENTED:
        for module, (weight, state) in zip(optimizer.modules, before):
            if module.weight.tobytes() != weight.tobytes():
                raise Finding("a rejected step changed a table") from None
            for key, value in state.items():
                now = optimizer.state[module][key]
                if (now.tobytes() != value.tobytes()) if isinstance(value, np.ndarray) \
                        else now != value:
                    raise Finding(f"a rejected step changed the state {key!r}") from None
    state_dict = optimizer.state_dict()
    if reader.bool() and state_dict["state"]:
        state = state_dict["state"][0]
        key = reader.choice(sorted(state))
        state[key] = reader.choice([None, -1, 1.5, "x", np.zeros(3), [1.0],
                                    np.zeros((1, 1), np.float16)])
    call(optimizer.load_state_dict, state_dict)


def fuzz_sparse_grad(reader, fastemb):
    rows = argument(reader, lambda: array_from(reader, reader.choice(INDEX_DTYPES),
                                               shape_from(reader, 2, 5)), HOSTILE_PYTHON)
    values = argument(reader, lambda: array_from(reader, reader.choice(FLOAT_DTYPES),
                                                 shape_from(reader, 3, 5)), HOSTILE_PYTHON)
    ok, grad = call(fastemb.SparseGrad, rows, values, small(reader))
    if not ok:
        return
    check_gradient(grad)
    other = reader.choice([grad, None, 1, grad])
    try:
        total = grad + other
    except (TypeError, ValueError):
        return
    check_gradient(total)


def fuzz_load(reader, fastemb, folder):
    modules = [fastemb.Embedding(4, 3, seed=0),
               fastemb.EmbeddingBag(3, 2, dtype=np.float64, mode="sum", seed=1)]
    optimizer = fastemb.optim.LazyAdam(modules) if reader.bool() else None
    path = os.path.join(folder, "checkpoint.npz")
    if reader.bool():  # a real checkpoint, then damaged
        fastemb.save(path, modules, optimizer)
        with open(path, "rb") as file:
            raw = bytearray(file.read())
        for _ in range(reader.int(1, 4)):
            at = reader.int(0, max(len(raw) - 1, 0))
            what = reader.choice(["flip", "cut", "insert"])
            if what == "flip" and raw:
                raw[at] ^= 1 << reader.int(0, 7)
            elif what == "cut":
                del raw[at:]
            else:
                raw[at:at] = reader.take(reader.int(1, 8))
    else:
        raw = reader.take(reader.int(0, 600))
    with open(path, "wb") as file:
        file.write(bytes(raw))
    targets = [fastemb.Embedding(4, 3, seed=5),
               fastemb.EmbeddingBag(3, 2, dtype=np.float64, mode="sum", seed=6)]
    target_optimizer = fastemb.optim.LazyAdam(targets) if optimizer is not None else None
    before = [m.weight.copy() for m in targets]
    try:
        fastemb.load(path, targets, target_optimizer)
    except ValueError:
        if any(m.weight.tobytes() != b.tobytes() for m, b in zip(targets, before)):
            raise Finding("a rejected load changed a table") from None
        return
    if any(m.weight.tobytes() != s.weight.tobytes() for m, s in zip(targets, modules)):
        raise Finding("a damaged checkpoint loaded tables other than the ones saved")


def run_one(data, fastemb=None, folder=None):
    """Decode ``data`` into one call (or a short sequence) and check it; raises Finding."""
    if fastemb is None:
        import fastemb
    reader = Bytes(data)
    target = reader.choice(["functional", "functional", "functional", "module", "module",
                            "sparse", "optimizer", "load"])
    with np.errstate(all="ignore"):
        if target == "functional":
            fuzz_functional(reader, fastemb)
        elif target == "module":
            fuzz_module(reader, fastemb)
        elif target == "sparse":
            fuzz_sparse_grad(reader, fastemb)
        elif target == "optimizer":
            modules = [fastemb.Embedding(reader.int(1, 6), reader.int(1, 4), seed=0)]
            out = modules[0](np.arange(modules[0].num_embeddings))
            modules[0].backward(np.ones_like(out))
            fuzz_optimizer(reader, fastemb, modules)
        else:
            if folder is None:
                with tempfile.TemporaryDirectory() as scratch:
                    fuzz_load(reader, fastemb, scratch)
            else:
                fuzz_load(reader, fastemb, folder)


def main():
    import atheris

    with atheris.instrument_imports():
        import fastemb
    folder = tempfile.mkdtemp(prefix="fastemb-fuzz-")

    def test_one_input(data):
        run_one(data, fastemb, folder)

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
