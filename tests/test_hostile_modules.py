"""Hostile input to the modules (construction, from_pretrained, forward, backward) and to
``SparseGrad`` (the machinery is in ``hostile.py``)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hostile import (
    COUNTS, FLOATS, HALF_FLOATS, INT64_MAX, MODES, computed_in, count_oracle, draw_grad,
    draw_indices, draw_offsets, draw_sample_weights, draw_weight, examples, grad_oracle,
    hostile_targets, index_oracle, is_real, max_norm_oracle, offsets_oracle, padding_oracle,
    place, renorm_as_fastemb, run_case, same_gradient, sample_weights_oracle, seeds, shape_of,
    shapes, weight_oracle,
)
from reference import assert_same_bits, embedding_bag_ref, embedding_ref
from reference_training import bag_grad_ref, embedding_grad_ref, psw_grad_ref

import fastemb


# --------------------------------------------------------------------------------------------
# Modules: construction, from_pretrained, forward, backward
# --------------------------------------------------------------------------------------------

SIZES = [0, 1, 3, 6, 6, 6, np.int64(4)]
BAD_SIZES = [-1, 2.0, True, None, "3", 2**64] + SIZES
DTYPES = [np.float32, np.float32, np.float64, "float64", None, *HALF_FLOATS]
BAD_DTYPES = [np.longdouble, np.int32, "foo", object, bool]


def dtype_oracle(dtype):
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        return {TypeError}
    return set() if resolved in FLOATS + HALF_FLOATS else {TypeError}


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
                                 data.draw(st.integers(0, 4)), scratch, "embeddings" in hostile,
                                 None if "embeddings" in hostile
                                 else data.draw(st.sampled_from(FLOATS + HALF_FLOATS)))
        weight_errors, table = weight_oracle(embeddings, reduced_precision=True)
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
        # a split float32 table: float32 only, no max_norm
        split = data.draw(st.sampled_from([False, False, True]), label="split")
        if split and (dtype_oracle(dtype) or np.dtype(dtype) != np.float32
                      or max_norm is not None):
            errors.add(ValueError)

        def make():
            return cls(size, dim, dtype=dtype, seed=seed, split=split, **options)
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
    # what the lookups read: the weight, or a split table's bfloat16 top halves
    looked_up = np.array(module._table, copy=True)

    def check_forward(out):
        table = looked_up
        if module.max_norm is not None:
            table = renorm_as_fastemb(before, values, module.max_norm, module.norm_type)
            assert_same_bits(weight, table)
        if bag:  # (a 16-bit table as the float32 it is computed in)
            reference["weight"] = table.astype(computed_in(table.dtype))
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
    table_now = np.array(module._table, copy=True).astype(computed_in(module._table.dtype))
    grad = draw_grad(data, rng, out.shape, out.dtype, "grad" in hostile)
    errors = grad_oracle(grad, out.shape, out.dtype)
    if not bag and out.dtype in HALF_FLOATS and np.asarray(grad).dtype == np.float32:
        errors = grad_oracle(grad, out.shape, np.float32)  # (also taken, as the gradient's)

    def check_backward(result):
        grad_values = np.asarray(grad).astype(computed_in(weight.dtype))  # (16-bit: exact)
        if bag:
            rows, expected = bag_grad_ref(
                reference["weight"], values, grad_values, reference["offsets"],
                module.mode, reference["per_sample_weights"], module.include_last_offset,
                padding, module.scale_grad_by_freq)
            if reference["per_sample_weights"] is not None and module.mode != "max":
                assert_same_bits(module.per_sample_weights_grad, psw_grad_ref(
                    table_now, values, grad_values, reference["per_sample_weights"],
                    reference["offsets"], module.mode, module.include_last_offset, padding))
        else:
            rows, expected = embedding_grad_ref(values, grad_values, num_embeddings,
                                                padding, module.scale_grad_by_freq)
        same_gradient(result, rows, expected, num_embeddings, computed_in(weight.dtype))
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
