"""The calls that check an embedding_bag one-call path (``bag_forward_common`` for float
tables, ``quantized_bag_forward_common`` for quantized ones): plain calls it must run, and
calls it must decline, over the same 12 indices in 3 bags of a 9-row table."""

import numpy as np


def plain_bag_calls(weight, indices, offsets, sample_weights):
    """Calls of plain arrays that the one-call path runs: sum, weighted mean, max with a
    negative padding_idx, include_last_offset, and 2-D input with 2-D weights."""
    plain = dict(input=indices, weight=weight, offsets=offsets, mode="sum")
    return [plain, {**plain, "mode": "mean", "per_sample_weights": sample_weights},
            {**plain, "mode": "max", "padding_idx": -2},
            {**plain, "offsets": np.append(offsets, indices.size), "include_last_offset": True},
            {**plain, "input": indices.reshape(3, 4), "offsets": None,
             "per_sample_weights": sample_weights.reshape(3, 4)}]


def declined_bag_calls(weight, indices, offsets, sample_weights):
    """Calls, of any table, that the one-call path declines: an index out of range, offsets
    that are not valid, arguments that are not plain arrays of the types it takes, a mode
    that is not a str, weights that do not fit, a padding_idx that is not an int in range,
    2-D input with offsets, no bags."""
    index_dtype = indices.dtype
    plain = dict(input=indices, weight=weight, offsets=offsets, mode="sum")
    bad_index = indices.copy()
    bad_index[5] = 9
    return [
        {**plain, "input": bad_index}, {**plain, "offsets": np.array([1, 3], index_dtype)},
        {**plain, "offsets": np.array([0, 13], index_dtype)},
        {**plain, "offsets": np.array([0, 5, 3], index_dtype)},
        {**plain, "offsets": offsets.tolist()}, {**plain, "input": indices.tolist()},
        {**plain, "input": indices.astype(np.int16)}, {**plain, "input": indices[::-1]},
        {**plain, "mode": np.str_("sum")}, {**plain, "mode": "product"},
        {**plain, "mode": np.array(["sum"])},
        {**plain, "per_sample_weights": sample_weights.astype(np.float16)},
        {**plain, "per_sample_weights": sample_weights[:11]},
        {**plain, "per_sample_weights": sample_weights.tolist()},
        {**plain, "mode": "max", "per_sample_weights": sample_weights},
        {**plain, "padding_idx": 9}, {**plain, "padding_idx": True},
        {**plain, "padding_idx": np.int64(2)}, {**plain, "padding_idx": 2**70},
        {**plain, "input": indices.reshape(3, 4)},
        {**plain, "offsets": np.zeros(0, index_dtype)}]


def check_runs_unchanged(calls, common_path, expected_output, assert_same_bits):
    """Each call runs on the one-call path, gives ``expected_output(call)``'s bits and leaves
    every array it was handed as it was."""
    for call in calls:
        arrays = {name: value for name, value in call.items() if isinstance(value, np.ndarray)}
        if not isinstance(call["weight"], np.ndarray):  # a QuantizedTable: its bytes
            arrays["weight"] = call["weight"].data
        before = {name: value.tobytes() for name, value in arrays.items()}
        out = common_path(call)
        assert out is not None, call
        assert_same_bits(out, expected_output(call))
        for name, value in arrays.items():  # (as bytes: NaNs and bfloat16 compare too)
            assert value.tobytes() == before[name], name
