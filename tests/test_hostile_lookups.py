"""Hostile input to the lookups: ``fastemb.embedding``, ``fastemb.embedding_bag`` and their
backward functions (the machinery is in ``hostile.py``)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hostile import (
    FLOATS, HALF_FLOATS, MODES, computed_in, count_oracle, draw_grad, draw_indices,
    draw_max_norm, draw_offsets, draw_padding, draw_sample_weights, draw_weight, examples, grad_oracle, hostile_targets,
    index_oracle, max_norm_oracle, offsets_oracle, padding_oracle, run_case, same_gradient,
    renorm_as_fastemb, sample_weights_oracle, seeds, shape_of, shapes, weight_oracle,
)
from reference import assert_same_bits, embedding_bag_ref, embedding_ref
from reference_training import bag_grad_ref, embedding_grad_ref, psw_grad_ref

import fastemb


# --------------------------------------------------------------------------------------------
# fastemb.embedding
# --------------------------------------------------------------------------------------------


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

    weight_errors, table = weight_oracle(weight, reduced_precision=True)
    known_rows = None if weight_errors else table.shape[0]
    index_errors, values = index_oracle(indices, known_rows)
    errors = (weight_errors | index_errors | padding_oracle(padding_idx, known_rows)
              | max_norm_oracle(max_norm, norm_type, weight))
    before = None if errors else np.array(table, copy=True)

    def check(out):
        expected_table = before
        if max_norm is not None:
            expected_table = renorm_as_fastemb(before, values, max_norm, norm_type)
            if isinstance(weight, np.ndarray):
                assert_same_bits(weight, expected_table)
        assert_same_bits(out, embedding_ref(values, expected_table))

    run_case("embedding", errors,
             lambda: fastemb.embedding(indices, weight, padding_idx, max_norm, norm_type),
             [weight, indices], check, may_change=[weight])


# --------------------------------------------------------------------------------------------
# fastemb.embedding_bag (and embedding_bag_backward on the same arguments)
# --------------------------------------------------------------------------------------------

BAD_MODES = ["SUM", "", None, 1, ["sum"], "min", b"sum", np.array("sum")]


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

    weight_errors, table = weight_oracle(weight, reduced_precision=True)
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
        # (a 16-bit table as the float32 it is computed in)
        reference = dict(indices=values, weight=table.astype(computed_in(table.dtype)),
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
            table_dtype = np.asarray(case["weight"]).dtype
            renormed = renorm_as_fastemb(reference["weight"].astype(table_dtype),
                                         reference["indices"], max_norm, norm_type)
            reference["weight"] = renormed.astype(computed_in(table_dtype))
            if isinstance(case["weight"], np.ndarray):
                assert_same_bits(case["weight"], renormed)
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
    if (grad_array is None or grad_array.dtype not in FLOATS + HALF_FLOATS or input_shape is None
            or grad_array.shape[:-1] != tuple(input_shape) or grad_array.ndim == 0):
        errors.add(ValueError)

    def check(result):
        grad_values = grad_array.astype(computed_in(grad_array.dtype))  # (16-bit: float32)
        rows, expected = embedding_grad_ref(values, grad_values, known, padding_idx, scale)
        same_gradient(result, rows, expected, known, grad_values.dtype)

    run_case("embedding_backward", errors,
             lambda: fastemb.embedding_backward(grad, indices, num_embeddings, padding_idx,
                                                scale),
             [indices, grad], check)
