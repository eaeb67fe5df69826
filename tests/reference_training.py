"""Plain NumPy references for fastemb's training path: sparse gradients and optimizer steps.

Written for clarity, not speed (Python loops over positions). Every arithmetic step is done in
the table's dtype, in the order the contract fixes, so a float32/float64 result is bit for bit
what the kernels compute (they are built with ``-ffp-contract=off``: no fused multiply-add):

- Embedding: row r gets ``acc = acc + G[p]`` over the positions p with ``x_p = r``, ascending;
  with ``scale_grad_by_freq`` each term is ``dtype(1.0 / count_r) * G[p]`` (rounded, then added).
- EmbeddingBag: position p of bag b contributes ``c_p * G[b]`` where ``c_p`` is 1 (sum),
  ``psw[p]`` (sum with weights), ``dtype(1.0 / count_b)`` (mean) or ``psw[p] / total_b`` in the
  dtype (weighted mean; ``total_b`` the sequential dtype sum of the bag's non-padding weights,
  0 when it is 0); ``scale_grad_by_freq`` makes the factor ``dtype(double(c_p) / freq_r)``.
  Plain sum without scaling adds ``G[b]`` itself. Max: each bag gives each row at most once,
  ``G[b, d]`` to the row that won column d.
- per-sample-weights gradient: ``dot(G[b], W[x_p])`` (sum) or ``dot(G[b], W[x_p] - out[b]) /
  total_b`` (weighted mean), the dot product accumulated sequentially in double.
- Optimizers: SGD, Adagrad, row-wise Adagrad and lazy Adam (torch's SparseAdam), see below.

All functions return fresh arrays and never modify their arguments unless they say so.
"""

import numpy as np

# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def normalize_padding(padding_idx, num_embeddings):
    if padding_idx is None:
        return None
    assert -num_embeddings <= padding_idx < num_embeddings
    return padding_idx % num_embeddings


def bounds_from(num_indices, offsets=None, include_last_offset=False, shape_2d=None):
    """[(start, end)] of every bag (well-formed input only)."""
    if shape_2d is not None:
        num_bags, length = shape_2d
        return [(b * length, (b + 1) * length) for b in range(num_bags)]
    offsets = [int(o) for o in np.asarray(offsets).reshape(-1)]
    ends = offsets if include_last_offset else offsets + [num_indices]
    return [(ends[b], ends[b + 1]) for b in range(len(ends) - 1)]


def ordered_ints(a):
    """Map floats to integers whose order and differences count ulps (sign-magnitude fixed)."""
    a = np.asarray(a)
    if a.dtype == np.float32:
        i = a.view(np.int32).astype(np.int64)
        return np.where(i < 0, -(2**31) - i, i)
    assert a.dtype == np.float64
    i = a.view(np.int64).astype(object)
    return np.where(i < 0, -(2**63) - i, i)


def ulp_distance(a, b):
    """Elementwise distance in ulps between two same-dtype float arrays (0 where both NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    a = np.where(a == 0, np.zeros((), a.dtype), a)  # -0.0 == +0.0
    b = np.where(b == 0, np.zeros((), b.dtype), b)
    d = np.abs(ordered_ints(a) - ordered_ints(b))
    both_nan = np.isnan(a) & np.isnan(b)
    return np.where(both_nan, 0, d).astype(np.float64)


def assert_ulp(actual, expected, max_ulp, what=""):
    """Assert same shape/dtype and at most ``max_ulp`` ulps apart everywhere."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if actual.size == 0:
        return
    d = ulp_distance(actual, expected)
    worst = int(np.argmax(d))
    assert d.max() <= max_ulp, (
        f"{what}: {d.max():.0f} ulps apart at flat {worst}: "
        f"{actual.reshape(-1)[worst]!r} vs {expected.reshape(-1)[worst]!r}"
    )


def assert_bitwise(actual, expected, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if actual.tobytes() != expected.tobytes():
        d = ulp_distance(actual, expected)
        worst = int(np.argmax(d))
        raise AssertionError(
            f"{what}: not bitwise equal; {int((d > 0).sum())} elements differ, worst "
            f"{d.max():.0f} ulps at flat {worst}: {actual.reshape(-1)[worst]!r} vs "
            f"{expected.reshape(-1)[worst]!r}"
        )


# --------------------------------------------------------------------------------------------
# Weight gradients, as (rows, values): rows int64 sorted unique (padding excluded), values
# (nnz, D) in the dtype.
# --------------------------------------------------------------------------------------------


def _rows_of(flat, padding):
    return np.array(sorted({int(r) for r in flat if r != padding}), dtype=np.int64)


def _add_term(values, started, k, term):
    """values[k] += term, except that a row's first term is taken as it is: a gradient sum
    starts from its first term, as torch's coalesce() does (a single -0 stays -0)."""
    values[k] = values[k] + term if started[k] else term
    started[k] = True


def embedding_grad_ref(indices, grad_output, num_embeddings, padding_idx=None,
                       scale_grad_by_freq=False):
    flat = np.asarray(indices).reshape(-1)
    grad_output = np.asarray(grad_output)
    dtype = grad_output.dtype
    dim = grad_output.shape[-1]
    G = grad_output.reshape(flat.size, dim)
    padding = normalize_padding(padding_idx, num_embeddings)
    rows = _rows_of(flat, padding)
    slot = {int(r): k for k, r in enumerate(rows)}
    counts = {int(r): int(np.sum(flat == r)) for r in rows}
    values = np.zeros((rows.size, dim), dtype=dtype)
    started = np.zeros(rows.size, dtype=bool)
    for p, r in enumerate(flat):
        r = int(r)
        if r == padding:
            continue
        if scale_grad_by_freq:
            term = dtype.type(1.0 / counts[r]) * G[p]
        else:
            term = G[p]
        _add_term(values, started, slot[r], term)
    return rows, values


def max_winners_ref(weight, flat, bounds, padding):
    """(B, D) winning row per bag and column (strict >, first wins ties), -1 for empty bags."""
    weight = np.asarray(weight)
    winners = np.full((len(bounds), weight.shape[1]), -1, dtype=np.int64)
    for b, (start, end) in enumerate(bounds):
        best = None
        for k in range(start, end):
            r = int(flat[k])
            if r == padding:
                continue
            if best is None:
                best = weight[r].copy()
                winners[b] = r
            else:
                better = weight[r] > best
                best = np.where(better, weight[r], best)
                winners[b] = np.where(better, r, winners[b])
    return winners


def bag_forward_ref(weight, flat, bounds, mode, psw=None, padding=None):
    """(output, totals) of an embedding_bag forward (totals: count or weight sum per bag)."""
    weight = np.asarray(weight)
    dtype = weight.dtype
    out = np.zeros((len(bounds), weight.shape[1]), dtype=dtype)
    totals = np.zeros(len(bounds), dtype=dtype)
    for b, (start, end) in enumerate(bounds):
        acc = np.zeros(weight.shape[1], dtype=dtype)
        total = dtype.type(0)
        for k in range(start, end):
            r = int(flat[k])
            if r == padding:
                continue
            if psw is None:
                acc = acc + weight[r]
                total = total + dtype.type(1)
            else:
                acc = acc + psw[k] * weight[r]
                total = total + psw[k]
        totals[b] = total
        if mode == "mean":
            acc = acc / total if total != 0 else np.zeros_like(acc)
        out[b] = acc
    return out, totals


def bag_grad_ref(weight, indices, grad_output, offsets=None, mode="mean",
                 per_sample_weights=None, include_last_offset=False, padding_idx=None,
                 scale_grad_by_freq=False):
    """(rows, values) of the embedding_bag weight gradient, in the contract's order."""
    weight = np.asarray(weight)
    dtype = weight.dtype
    V, dim = weight.shape
    indices = np.asarray(indices)
    flat = indices.reshape(-1)
    shape_2d = indices.shape if indices.ndim == 2 else None
    bounds = bounds_from(flat.size, offsets, include_last_offset, shape_2d)
    G = np.asarray(grad_output)
    assert G.dtype == dtype and G.shape == (len(bounds), dim)
    padding = normalize_padding(padding_idx, V)
    psw = None if per_sample_weights is None else np.asarray(per_sample_weights).reshape(-1)
    rows = _rows_of(flat, padding)
    slot = {int(r): k for k, r in enumerate(rows)}
    freq = {int(r): int(np.sum(flat == r)) for r in rows}
    values = np.zeros((rows.size, dim), dtype=dtype)
    if mode == "max":
        winners = max_winners_ref(weight, flat, bounds, padding)
        for b, (start, end) in enumerate(bounds):
            seen = set()
            for k in range(start, end):
                r = int(flat[k])
                if r == padding or r in seen:
                    continue
                seen.add(r)
                won = winners[b] == r
                values[slot[r]] = values[slot[r]] + np.where(won, G[b], dtype.type(0))
        return rows, values
    _, totals = bag_forward_ref(weight, flat, bounds, mode, psw, padding)
    started = np.zeros(rows.size, dtype=bool)
    for b, (start, end) in enumerate(bounds):
        for k in range(start, end):
            r = int(flat[k])
            if r == padding:
                continue
            if mode == "sum" and psw is None:
                c = None
            elif mode == "sum":
                c = psw[k]
            elif psw is None:
                c = dtype.type(1.0 / float(totals[b]))
            else:
                c = psw[k] / totals[b] if totals[b] != 0 else dtype.type(0)
            if scale_grad_by_freq:
                c = dtype.type((1.0 if c is None else float(c)) / freq[r])
            term = G[b] if c is None else c * G[b]
            _add_term(values, started, slot[r], term)
    return rows, values


def psw_grad_ref(weight, indices, grad_output, per_sample_weights, offsets=None, mode="sum",
                 include_last_offset=False, padding_idx=None):
    """Gradient of the loss sum(out * G) with respect to the per-sample weights."""
    weight = np.asarray(weight)
    dtype = weight.dtype
    indices = np.asarray(indices)
    flat = indices.reshape(-1)
    shape_2d = indices.shape if indices.ndim == 2 else None
    bounds = bounds_from(flat.size, offsets, include_last_offset, shape_2d)
    padding = normalize_padding(padding_idx, weight.shape[0])
    psw = np.asarray(per_sample_weights).reshape(-1)
    G = np.asarray(grad_output)
    out, totals = bag_forward_ref(weight, flat, bounds, mode, psw, padding)
    result = np.zeros(flat.size, dtype=dtype)
    for b, (start, end) in enumerate(bounds):
        for k in range(start, end):
            r = int(flat[k])
            if r == padding:
                continue
            if mode == "sum":
                terms = G[b].astype(np.float64) * weight[r].astype(np.float64)
            else:
                terms = G[b].astype(np.float64) * (weight[r] - out[b]).astype(np.float64)
            dot = 0.0
            for t in terms:  # sequential, in double
                dot = dot + float(t)
            if mode == "mean":
                dot = dot / float(totals[b]) if totals[b] != 0 else 0.0
            result[k] = dtype.type(dot)
    return result.reshape(indices.shape)


def dense(rows, values, num_embeddings):
    out = np.zeros((num_embeddings, values.shape[1]), dtype=values.dtype)
    out[rows] = values
    return out


# --------------------------------------------------------------------------------------------
# Optimizer steps on (weight, state) given a coalesced gradient (rows, g); in place, in dtype.
# L2 weight decay replaces g by g + dtype(weight_decay) * w[rows] (after maximize's negation).
# --------------------------------------------------------------------------------------------


def decayed(weight, rows, g, weight_decay):
    """The gradient with L2 weight decay: g + wd * w (rounded twice, no fused multiply-add)."""
    if weight_decay == 0:
        return g
    return g + weight.dtype.type(weight_decay) * weight[rows]


def sgd_step_ref(weight, rows, g, lr, weight_decay=0.0):
    dtype = weight.dtype
    g = decayed(weight, rows, g, weight_decay)
    weight[rows] = weight[rows] + dtype.type(-lr) * g


def adagrad_step_ref(weight, state_sum, rows, g, step, lr=1e-2, lr_decay=0.0, eps=1e-10,
                     weight_decay=0.0):
    """torch's Adagrad on a sparse gradient; ``step`` is the already incremented counter."""
    dtype = weight.dtype
    g = decayed(weight, rows, g, weight_decay)
    clr = lr / (1 + (step - 1) * lr_decay)
    s = state_sum[rows] + g * g
    state_sum[rows] = s
    weight[rows] = weight[rows] + dtype.type(-clr) * (g / (np.sqrt(s) + dtype.type(eps)))


def rowwise_adagrad_step_ref(weight, acc, rows, g, lr=1e-2, eps=1e-10, weight_decay=0.0):
    """acc[r] += dtype(mean(g[r]**2) in double: column j into partial sum j % 8, the 8 sums added
    pairwise); w -= lr * g/(sqrt+eps)."""
    dtype = weight.dtype
    g = decayed(weight, rows, g, weight_decay)
    dim = weight.shape[1]
    for k, r in enumerate(rows):
        partial = [0.0] * 8
        for j, x in enumerate(g[k]):
            partial[j % 8] = partial[j % 8] + float(x) * float(x)
        mean_square = (((partial[0] + partial[1]) + (partial[2] + partial[3]))
                       + ((partial[4] + partial[5]) + (partial[6] + partial[7])))
        a = acc[r, 0] + dtype.type(mean_square / dim)
        acc[r, 0] = a
        denominator = np.sqrt(a) + dtype.type(eps)
        weight[r] = weight[r] - dtype.type(lr) * (g[k] / denominator)


def lazy_adam_step_ref(weight, exp_avg, exp_avg_sq, rows, g, step, lr=1e-3, betas=(0.9, 0.999),
                       eps=1e-8, maximize=False, weight_decay=0.0):
    """torch's SparseAdam (``step`` already incremented), with a correctly rounded sqrt."""
    import math

    dtype = weight.dtype
    beta1, beta2 = betas
    if maximize:
        g = -g
    g = decayed(weight, rows, g, weight_decay)
    m_old, v_old = exp_avg[rows], exp_avg_sq[rows]
    m = m_old + (g - m_old) * dtype.type(1 - beta1)
    v = v_old + (g * g - v_old) * dtype.type(1 - beta2)
    exp_avg[rows] = m
    exp_avg_sq[rows] = v
    step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    weight[rows] = weight[rows] + dtype.type(-step_size) * (m / (np.sqrt(v) + dtype.type(eps)))
