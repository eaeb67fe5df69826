"""Crash isolation for a collection's kernels: ``collection_bag_reduce``, ``collection_gather``
(fastemb/_lookup.pyx), ``collection_group_by_row`` (_grouping.pyx), ``split_columns`` and
``sparse_step_tables`` (_training.pyx), called directly with hostile arguments in a child process,
on arrays that sit against inaccessible pages, under every kernel build (the machinery of
test_hostile_kernels.py: ``guarded``, ``I``, ``case``, ``run_kernel_script``).

Every call must either raise a clear exception (ValueError for arrays that do not fit together,
TypeError for arguments of the wrong type), leaving its arguments byte for byte as they were, or
return the documented result, having touched nothing outside its arrays:

- collection_bag_reduce: each feature's bags (its bounds clamped into [0, n]) reduced from its
  table into its columns, values outside the table skipped like padding and counted;
- collection_gather: each feature's rows copied into its block of out, a value outside its table
  copied as a row of zeros and counted, every other byte of out untouched;
- collection_group_by_row: table by table, the positions grouped by row, values that are padding
  or outside ``[0, num_rows)`` left out;
- split_columns: grad's column blocks one after the other;
- sparse_step_tables: each table stepped as ``sparse_step`` steps it alone, rows outside the
  table (and plan entries that name no position or grad row) skipped, nothing changed when any
  table's arguments do not fit.

OVERFLOW_CASES, at the end, are arguments whose checks once overflowed or were missing.
"""

import pytest
from test_hostile_kernels import (KERNEL_SAFE_HELPERS, _kernel_builds, describe,
                                  run_kernel_script)

# --------------------------------------------------------------------------------------------
# Helpers of every script (after test_hostile_kernels' prelude and KERNEL_SAFE_HELPERS, which
# give guarded, I, case, MODE, METHOD, bags_by_hand, bag_indices, clamp, rng, INT64_MIN/MAX)
# --------------------------------------------------------------------------------------------

COLLECTION_HELPERS = KERNEL_SAFE_HELPERS + r"""
try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # (bfloat16 tables need ml_dtypes: float32 stands in)
    BF16 = np.dtype(np.float32)
MODE_NAME = {int(value): name for name, value in MODE.items()}
SIDES = ("after", "before")

def same_bytes(array, saved):
    array = np.asarray(array)
    return (array.dtype == saved.dtype and array.shape == saved.shape
            and array.tobytes() == saved.tobytes())

def refused(call, untouched=(), allowed=(ValueError,), what=None):
    # call() must raise one of `allowed` and leave every array of `untouched` as it was
    saved = [np.array(array, copy=True) for array in untouched]
    try:
        call()
    except allowed:
        for number, (array, copy) in enumerate(zip(untouched, saved)):
            assert same_bytes(array, copy), f"{what}: argument {number} changed, and it raised"
        return
    raise AssertionError(f"{what}: returned; expected "
                         + " or ".join(e.__name__ for e in allowed))

def strided(array):
    # the same values in a view whose elements are not contiguous
    base = np.zeros(np.shape(array) + (2,), np.asarray(array).dtype)
    base[..., 1] = array
    return base[..., 1]

def swapped(array):
    array = np.asarray(array)
    return array.astype(array.dtype.newbyteorder())

def readonly(array):
    array = np.array(array)
    array.flags.writeable = False
    return array

def edge_view(wide, columns, side):
    # `columns` columns of guarded `wide` that touch its guard page: the last ones (after), the
    # first ones (before); rows not contiguous with each other
    return wide[:, wide.shape[1] - columns:] if side == "after" else wide[:, :columns]
"""

# --------------------------------------------------------------------------------------------
# collection_bag_reduce
# --------------------------------------------------------------------------------------------

BAG_REDUCE_CASES = COLLECTION_HELPERS + r"""
def collection_by_hand(tables, values, bounds, feature_tables, first_bags, modes, padding,
                       columns, psw, out, winners):
    # The documented result: feature f's B bags (bounds[first_bags[f]:][:B + 1], clamped into
    # [0, n]) reduced from its table (a 16-bit one widened exactly) skipping padding and values
    # outside the table, into its columns (winners too, for max); every other element of out
    # and winners as it was. And the count of values outside their table in the features' bags
    # (None when some feature's bounds decrease: BUG_CASES has that).
    want = np.array(out)
    want_winners = None if winners is None else np.array(winners)
    values = np.zeros(0, np.int64) if values is None else np.asarray(values)
    n, B, count = len(values), want.shape[0], 0
    for f in range(len(feature_tables)):
        table = np.asarray(tables[feature_tables[f]])
        mode = MODE_NAME[int(modes[f])]
        fb = [int(v) for v in bounds[first_bags[f]:first_bags[f] + B + 1]]
        weights = None if psw is None or mode == "max" else np.asarray(psw)
        got, got_winners = bags_by_hand(table.astype(want.dtype), values, fb, mode, weights,
                                        int(padding[f]))
        column, dim = int(columns[f]), table.shape[1]
        want[:, column:column + dim] = got
        if want_winners is not None and mode == "max":
            want_winners[:, column:column + dim] = got_winners
        if count is not None and all(a <= b for a, b in zip(fb, fb[1:])):
            count += sum(not 0 <= v < table.shape[0]
                         for v in values[clamp(fb[0], 0, n):clamp(fb[-1], 0, n)])
        else:
            count = None
    return want, want_winners, count

def check_reduce(tables, values, bounds, feature_tables, first_bags, modes, padding, columns,
                 psw, out, winners, threads):
    want, want_winners, want_count = collection_by_hand(
        tables, values, bounds, feature_tables, first_bags, modes, padding, columns, psw, out,
        winners)
    got = K.collection_bag_reduce(tables, values, I(bounds), I(feature_tables), I(first_bags),
                                  I(modes), I(padding), I(columns), psw, out, winners, threads)
    assert_same_bits(out, want)
    if winners is not None:
        assert (np.asarray(winners) == want_winners).all(), (winners, want_winners)
    if want_count is not None:
        assert got == want_count, (got, want_count)

# (bounds, B): each feature's B + 1 bounds start at some entry of bounds
LAYOUTS = [
    ([0, 2, 4, 4, 7, 9, 11], 2),  # consistent
    ([0, 3, 100, 2, -5, 8, INT64_MAX, INT64_MIN, 11, 12, 0], 2),  # backwards, past both ends
    ([5, 5, 5, 5], 3),
    ([0, 11], 1),
    ([-3, 11, 4, 4, 70], 4),
]
PADDINGS = [-1, 2, 99, INT64_MIN, INT64_MAX, 0]
VALUES32 = [0, 4, -1, 2, 5, 2, 2**31 - 1, 1, 3, -2**31, 0]

for side in SIDES:
    SIDE = side
    for dtype in (f4, f8):
        other = f8 if dtype is f4 else f4
        # a float64 call takes float64 tables; a float32 one float32, float16 and bfloat16 ones.
        # Rows of 16 (one block of columns) and 70 (several, bag by bag) elements; a table
        # without rows and one without columns.
        kinds = [f8] * 4 if dtype is f8 else [f4, np.float16, BF16, f4]
        made = [rng.standard_normal((5, d)).astype(k) for k, d in zip(kinds, (3, 2, 16, 70))]
        made += [np.zeros((0, 3), dtype), np.zeros((5, 0), dtype)]
        tables = [guarded(t) for t in made]
        for threads in (1, 2):
            tag = f"{side} {np.dtype(dtype).name} threads={threads}"

            case(f"collection_bag_reduce: garbage bounds, values outside the tables {tag}")
            for number, (bounds, B) in enumerate(LAYOUTS):
                values = bag_indices() if number % 2 == 0 else guarded(np.array(VALUES32,
                                                                                np.int32))
                feature_tables = list(range(len(tables)))[::(-1) ** number]
                # features in any order, sharing bags, one spare column before each and after
                first_bags = [(2 * f) % (len(bounds) - B) for f in range(len(feature_tables))]
                columns, width = [], 1
                for t in feature_tables:
                    columns.append(width)
                    width += made[t].shape[1] + 1
                for rotation in range(3):
                    modes = [int(MODE[("sum", "mean", "max")[(f + rotation) % 3]])
                             for f in range(len(feature_tables))]
                    padding = [PADDINGS[(f + rotation) % len(PADDINGS)]
                               for f in range(len(feature_tables))]
                    for weighted, with_winners in ((False, False), (True, True), (False, True)):
                        psw = guarded(rng.choice([-1.0, 0.5, 2.0], len(values)), dtype) \
                            if weighted else None
                        out = guarded(np.full((B, width), 9, dtype))
                        winners = guarded(np.full((B, width), 9, np.int64)) \
                            if with_winners else None
                        check_reduce(tables, values, bounds, feature_tables, first_bags, modes,
                                     padding, columns, psw, out, winners, threads)

            case(f"collection_bag_reduce: a table large enough to prefetch {tag}")
            big = guarded(rng.standard_normal((30000, 3)).astype(dtype))
            values = I([29999, 0, 30000, -1, INT64_MAX, 5, INT64_MIN, 29998] * 12 + [7])
            for bounds in ([0, 40, 97], [0, 97, 20], [97, 0, 50]):
                for mode in ("sum", "mean", "max"):
                    out = guarded(np.full((2, 4), 9, dtype))
                    winners = guarded(np.full((2, 4), 9, np.int64))
                    check_reduce([big], values, bounds, [0], [0], [int(MODE[mode])], [5],
                                 [1], None, out, winners, threads)

            case(f"collection_bag_reduce: arguments that do not fit {tag}")
            values = bag_indices()
            n, d0, d1 = len(values), made[0].shape[1], made[1].shape[1]
            base = dict(tables=tables, values=values, bounds=I([0, 2, 4, 4, 7, 9, 11]),
                        feature_tables=I([0, 1]), first_bags=I([0, 2]),
                        modes=I([int(MODE["sum"]), int(MODE["max"])]), padding=I([-1, -1]),
                        columns=I([0, d0]), sample_weights=None,
                        out=guarded(np.full((2, d0 + d1), 9, dtype)),
                        winners=guarded(np.full((2, d0 + d1), 9, np.int64)),
                        num_threads=threads)
            untouched = [base["out"], base["winners"]] + tables

            def reduce_with(**changes):
                return K.collection_bag_reduce(*dict(base, **changes).values())

            def with_table(table):
                return dict(tables=[tables[0], table])

            TYPE = (TypeError,)
            EITHER = (ValueError, TypeError)
            bad = [
                # first_bags: a feature's B + 1 bounds must lie within bounds
                (dict(first_bags=I([-1, 2])), None), (dict(first_bags=I([0, 5])), None),
                (dict(first_bags=I([0, 7])), None), (dict(first_bags=I([INT64_MIN, 0])), None),
                (dict(first_bags=I([0, 2**62])), None),
                # columns: a feature's D columns must lie within out
                (dict(columns=I([0, -1])), None), (dict(columns=I([0, d0 + 1])), None),
                (dict(columns=I([INT64_MIN, d0])), None), (dict(columns=I([0, 2**62])), None),
                (dict(columns=I([d0 + d1, 0])), None),
                # feature_tables: a feature must name a table
                (dict(feature_tables=I([0, -1])), None),
                (dict(feature_tables=I([0, len(tables)])), None),
                (dict(feature_tables=I([0, INT64_MAX])), None),
                (dict(feature_tables=I([INT64_MIN, 0])), None),
                (dict(modes=I([0, -1])), None), (dict(modes=I([3, 0])), None),
                (dict(modes=I([0, INT64_MAX])), None),
                # one entry per feature in each feature array
                (dict(first_bags=I([0])), None), (dict(first_bags=I([0, 2, 4])), None),
                (dict(modes=I([0])), None), (dict(padding=I([-1, -1, -1])), None),
                (dict(columns=I([0])), None), (dict(feature_tables=I([0, 1, 0])), None),
                (dict(feature_tables=I([])), None),
                # sample_weights: one per value, the call's dtype, contiguous
                (dict(sample_weights=guarded(np.ones(n - 1), dtype)), None),
                (dict(sample_weights=guarded(np.ones(n + 1), dtype)), None),
                (dict(sample_weights=guarded(np.ones(n), other)), None),
                (dict(sample_weights=strided(np.ones(n, dtype))), None),
                (dict(sample_weights=guarded(np.ones((n, 1)), dtype)), EITHER),
                (dict(sample_weights=[1.0] * n), TYPE),
                # winners: out's shape, int64
                (dict(winners=guarded(np.zeros((3, d0 + d1), np.int64))), None),
                (dict(winners=guarded(np.zeros((2, d0 + d1 + 1), np.int64))), None),
                (dict(winners=guarded(np.zeros((2, d0 + d1), np.int32))), None),
                (dict(winners=guarded(np.zeros((2, d0 + d1), dtype))), None),
                # tables of the wrong dtype, layout or type mixed in the list
                (with_table(guarded(np.ones((5, d1), other))), None),
                (with_table(guarded(np.ones((5, d1), np.int32))), None),
                (with_table(guarded(np.ones((5, d1), bool))), None),
                (with_table(swapped(made[1].astype(dtype))), None),
                (with_table(np.asfortranarray(np.ones((5, d1), dtype))), None),
                (with_table(strided(np.ones((5, d1), dtype))), None),
                (with_table(np.ones(5 * d1, dtype)), None),
                (with_table(np.ones((5, d1, 1), dtype)), None),
                (with_table(None), None), (with_table(np.ones((5, d1)).tolist()), None),
                (dict(tables=None), TYPE), (dict(tables=tuple(tables)), TYPE),
                # out: the tables' sum dtype, C-contiguous, writable
                (dict(out=guarded(np.zeros((2, d0 + d1), other))), None),
                (dict(out=guarded(np.zeros((2, d0 + d1), np.int32))), EITHER),
                (dict(out=strided(np.zeros((2, d0 + d1), dtype))), None),
                (dict(out=readonly(np.zeros((2, d0 + d1), dtype))), None),
                # values: int32 or int64, contiguous, 1-D
                (dict(values=guarded(np.asarray(values), np.float64)), TYPE),
                (dict(values=guarded(np.asarray(values), np.int16)), TYPE),
                (dict(values=guarded(np.asarray(values), np.uint64)), TYPE),
                (dict(values=strided(np.asarray(values))), None),
                (dict(values=guarded(np.asarray(values)).reshape(1, -1)), EITHER),
                (dict(values=[0, 1, 2]), TYPE),
                # bounds: int64, long enough for every feature
                (dict(bounds=guarded(np.array([0, 2, 4, 4, 7, 9, 11], np.int32))), None),
                (dict(bounds=I([])), None), (dict(bounds=None), None),
                (dict(bounds=I([0, 2, 4, 4])), None),
                (dict(first_bags=guarded(np.array([0, 2], np.int32))), None),
            ]
            for changes, allowed in bad:
                refused(lambda: reduce_with(**changes), untouched, allowed or (ValueError,),
                        what=changes)

            case(f"collection_bag_reduce: nothing to reduce, None, odd thread counts {tag}")
            before = np.array(base["out"])
            assert reduce_with(feature_tables=I([]), first_bags=I([]), modes=I([]),
                               padding=I([]), columns=I([])) == 0
            assert same_bytes(base["out"], before)
            assert reduce_with(out=guarded(np.zeros((0, d0 + d1), dtype)),
                               winners=guarded(np.zeros((0, d0 + d1), np.int64))) == 0
            assert reduce_with(out=None, winners=None) == 0
            for changes in (dict(values=None), dict(num_threads=0), dict(num_threads=-1),
                            dict(winners=None)):
                arguments = dict(base, out=guarded(np.full((2, d0 + d1), 9, dtype)),
                                 winners=guarded(np.full((2, d0 + d1), 9, np.int64)))
                arguments.update(changes)
                arguments.pop("num_threads")
                check_reduce(*arguments.values(), changes.get("num_threads", threads))
print("ALL OK", flush=True)
"""

# --------------------------------------------------------------------------------------------
# collection_gather
# --------------------------------------------------------------------------------------------

GATHER_CASES = COLLECTION_HELPERS + r"""
def gathered_by_hand(tables, values, feature_tables, starts, ends, out, out_offsets):
    # out's bytes with each feature's rows (zeros for a value outside its table) in its block,
    # and how many values lie outside their table
    want = bytearray(np.asarray(out).tobytes())
    values = np.zeros(0, np.int64) if values is None else np.asarray(values)
    count = 0
    for f in range(len(feature_tables)):
        table = np.asarray(tables[feature_tables[f]])
        rows = []
        for v in values[starts[f]:ends[f]]:
            inside = 0 <= v < table.shape[0]
            count += not inside
            rows.append(table[v] if inside else np.zeros(table.shape[1], table.dtype))
        block = np.array(rows, table.dtype).reshape(len(rows), table.shape[1]).tobytes()
        want[out_offsets[f]:out_offsets[f] + len(block)] = block
    return bytes(want), count

def check_gather(tables, values, feature_tables, starts, ends, out, out_offsets, threads):
    want, want_count = gathered_by_hand(tables, values, feature_tables, starts, ends, out,
                                        out_offsets)
    got = K.collection_gather(tables, values, I(feature_tables), I(starts), I(ends), out,
                              I(out_offsets), threads)
    assert np.asarray(out).tobytes() == want, "collection_gather: wrong bytes in out"
    assert got == want_count, (got, want_count)

def blocks(tables, feature_tables, starts, ends, gap=3):
    # out_offsets with `gap` spare bytes before each block (odd offsets: unaligned blocks), and
    # out's size
    offsets, size = [], gap
    for t, start, end in zip(feature_tables, starts, ends):
        offsets.append(size)
        size += (end - start) * tables[t].shape[1] * tables[t].dtype.itemsize + gap
    return offsets, size

# several chunks of rows for one feature; empty features between others; features in any order,
# sharing values; every dtype; a table without rows and one without columns
FEATURES = [(0, 0, 300), (1, 300, 300), (2, 300, 305), (4, 305, 310), (5, 310, 320),
            (3, 320, 700), (0, 10, 20), (2, 699, 700), (1, 0, 0)]

for side in SIDES:
    SIDE = side
    made = [rng.standard_normal(shape).astype(kind) for kind, shape in (
        (f4, (5, 3)), (f8, (5, 2)), (np.float16, (5, 4)), (BF16, (5, 1)))]
    made += [np.zeros((0, 3), f4), np.zeros((5, 0), f8)]
    tables = [guarded(t) for t in made]
    drawn = rng.integers(-2, 8, 700)
    drawn[[3, 333, 600]] = [INT64_MAX, INT64_MIN, 2**31]
    drawn32 = np.clip(drawn, -2**31, 2**31 - 1).astype(np.int32)
    for threads in (1, 2):
        tag = f"{side} threads={threads}"

        case(f"collection_gather: values outside the tables, every dtype {tag}")
        for values in (guarded(drawn), guarded(drawn32)):
            for order in (FEATURES, FEATURES[::-1]):
                feature_tables, starts, ends = (list(x) for x in zip(*order))
                offsets, size = blocks(tables, feature_tables, starts, ends)
                out = guarded(np.full(size, 0x5A, np.int8))
                check_gather(tables, values, feature_tables, starts, ends, out, offsets, threads)

        case(f"collection_gather: arguments that do not fit {tag}")
        values = bag_indices()
        n = len(values)
        offsets, size = blocks(tables, [0, 2], [0, 4], [4, n], gap=0)
        base = dict(tables=tables, values=values, feature_tables=I([0, 2]), starts=I([0, 4]),
                    ends=I([4, n]), out=guarded(np.full(size, 0x5A, np.int8)),
                    out_offsets=I(offsets), num_threads=threads)
        untouched = [base["out"]] + tables
        last_block = size - offsets[1]

        def gather_with(**changes):
            return K.collection_gather(*dict(base, **changes).values())

        def with_table(table):
            return dict(tables=[tables[0], tables[1], table])

        TYPE = (TypeError,)
        EITHER = (ValueError, TypeError)
        bad = [
            # a feature's values [starts, ends) must lie within values
            (dict(starts=I([3, 4]), ends=I([2, n])), None),
            (dict(ends=I([4, n + 1])), None), (dict(starts=I([-1, 4])), None),
            (dict(starts=I([INT64_MIN, 4])), None), (dict(ends=I([4, INT64_MAX])), None),
            (dict(starts=I([INT64_MAX, 4]), ends=I([INT64_MAX, n])), None),
            (dict(starts=I([0, INT64_MIN]), ends=I([4, INT64_MIN])), None),
            # a feature's block must lie within out
            (dict(out_offsets=I([-1, offsets[1]])), None),
            (dict(out_offsets=I([0, size - last_block + 1])), None),
            (dict(out_offsets=I([INT64_MIN, offsets[1]])), None),
            (dict(out_offsets=I([0, 2**62])), None), (dict(out_offsets=I([0, size])), None),
            (dict(out=guarded(np.zeros(size - 1, np.int8))), None),
            (dict(out=None), None),
            # a feature must name a table
            (dict(feature_tables=I([0, -1])), None), (dict(feature_tables=I([0, 6])), None),
            (dict(feature_tables=I([0, INT64_MAX])), None),
            (dict(feature_tables=I([INT64_MIN, 2])), None),
            # one entry per feature
            (dict(starts=I([0])), None), (dict(ends=I([4, n, n])), None),
            (dict(out_offsets=I([0])), None), (dict(feature_tables=I([0])), None),
            (dict(feature_tables=None), None),
            # tables of the wrong dtype, layout or type mixed in the list
            (with_table(guarded(np.ones((5, 4), np.int32))), None),
            (with_table(guarded(np.ones((5, 4), bool))), None),
            (with_table(guarded(np.ones((5, 4), np.complex64))), None),
            (with_table(swapped(made[2])), None),
            (with_table(np.asfortranarray(np.ones((5, 4), np.float16))), None),
            (with_table(strided(np.ones((5, 4), np.float16))), None),
            (with_table(np.ones(20, np.float16)), None),
            (with_table(np.ones((5, 4, 1), np.float16)), None),
            (with_table(None), None), (with_table(np.ones((5, 4)).tolist()), None),
            (dict(tables=None), TYPE), (dict(tables=tuple(tables)), TYPE),
            # out: a writable contiguous array of bytes
            (dict(out=guarded(np.zeros(size // 4 + 1, f4))), None),
            (dict(out=strided(np.zeros(size, np.int8))), None),
            (dict(out=readonly(np.zeros(size, np.int8))), None),
            # values: int32 or int64, contiguous
            (dict(values=guarded(np.asarray(values), np.float64)), TYPE),
            (dict(values=guarded(np.asarray(values), np.int8)), TYPE),
            (dict(values=strided(np.asarray(values))), None),
            (dict(values=[0, 1]), TYPE),
            (dict(starts=guarded(np.array([0, 4], np.int32))), None),
        ]
        for changes, allowed in bad:
            refused(lambda: gather_with(**changes), untouched, allowed or (ValueError,),
                    what=changes)

        case(f"collection_gather: nothing to copy, None, odd thread counts {tag}")
        before = np.array(base["out"])
        assert gather_with(feature_tables=I([]), starts=I([]), ends=I([]),
                           out_offsets=I([])) == 0
        assert gather_with(values=None, starts=I([0, 0]), ends=I([0, 0]),
                           out=guarded(np.zeros(0, np.int8)), out_offsets=I([0, 0])) == 0
        assert same_bytes(base["out"], before)
        for thread_count in (0, -1):
            out = guarded(np.full(size, 0x5A, np.int8))
            check_gather(tables, values, [0, 2], [0, 4], [4, n], out, offsets, thread_count)
print("ALL OK", flush=True)
"""

# --------------------------------------------------------------------------------------------
# collection_group_by_row
# --------------------------------------------------------------------------------------------

GROUP_CASES = COLLECTION_HELPERS + r"""
def grouped_by_hand(values, bounds, B, table_features, num_rows, padding, bases, one_row,
                    in_order):
    # per position its gradient row (source); per table its first position, its rows
    # ascending and each row's positions (or their sources) ascending
    values = [int(v) for v in values]
    source = [None] * len(values)
    tables = []
    for t in range(len(table_features) - 1):
        kept = []
        for f in range(table_features[t], table_features[t + 1]):
            first = bounds[f * B]
            for b in range(B):
                for k in range(bounds[f * B + b], bounds[f * B + b + 1]):
                    source[k] = bases[f] + (k - first if one_row else b)
                    if values[k] != padding[f] and 0 <= values[k] < num_rows[t]:
                        kept.append((values[k], k))
        rows = sorted({v for v, _ in kept})
        groups = [[k if in_order else source[k] for v, k in kept if v == r] for r in rows]
        tables.append((bounds[table_features[t] * B], rows, groups))
    return source, tables

def check_grouping(values, bounds, B, table_features, num_rows, padding, bases, one_row,
                   in_order, threads):
    result = K.collection_group_by_row(values, I(bounds), B, I(table_features), I(num_rows),
                                       I(padding), I(bases), one_row, in_order, threads)
    source, order, rows, starts, counts = (np.asarray(a) for a in result)
    want_source, tables = grouped_by_hand(values, bounds, B, table_features, num_rows, padding,
                                          bases, one_row, in_order)
    assert source.tolist() == want_source, (source, want_source)
    assert counts.tolist() == [len(rows_t) for _, rows_t, _ in tables], counts
    for t, (s, rows_t, groups) in enumerate(tables):
        U, sizes = len(rows_t), [len(g) for g in groups]
        assert rows[s:s + U].tolist() == rows_t, (t, rows, rows_t)
        assert starts[s + t:s + t + U + 1].tolist() == [s + sum(sizes[:u]) for u in range(U + 1)]
        assert order[s:s + sum(sizes)].tolist() == [p for g in groups for p in g], (t, order)

def layout(K_features, B, high, dtype):
    # bounds of K_features * B bags of 0 to 4 values each, and values in [-2, high + 2) with
    # the dtype's extremes among them
    lengths = rng.integers(0, 5, K_features * B)
    bounds = [0] + np.cumsum(lengths).tolist()
    values = rng.integers(-2, min(high, 1000) + 2, bounds[-1])
    if values.size >= 3:
        info = np.iinfo(dtype)
        values[rng.choice(values.size, 3, replace=False)] = [info.max, info.min, high]
    return bounds, guarded(values.astype(dtype))

PADDINGS = [-1, 2, INT64_MIN, INT64_MAX]
# (features K, bags B, table_features, num_rows, grad_row_bases)
CONFIGS = [
    (4, 3, [0, 2, 2, 4], [5, 3, 6], [0, 3, 100, 7]),  # table 1 has no features
    (4, 3, [0, 2, 2, 4], [0, 3, -4], [0, 0, 0, 0]),  # no rows, negative rows: all skipped
    (3, 1, [0, 3], [2**40], [0, 2, 9]),  # a huge table
    (2, 2, [0, 1, 2], [1, 2**20], [2**40, 5]),  # far gradient rows
    (2, 2, [0, 2], [1], [2**62, 0]),  # gradient rows that need 63 bits: a one-row table
    (2, 1, [0, 2], [2**58], [0, 1]),  # rows that need 58 bits, few positions
    (0, 3, [0], [], []),  # no features
    (2, 0, [0, 2], [5], [0, 0]),  # no bags
    (1, 1, [0, 0, 1], [4, 4], [0]),  # a table with no features first
]

for side in SIDES:
    SIDE = side
    for threads in (1, 2):
        tag = f"{side} threads={threads}"
        case(f"collection_group_by_row: values outside the tables, padding, huge tables {tag}")
        for K_features, B, table_features, num_rows, bases in CONFIGS:
            padding = [PADDINGS[f % 4] for f in range(K_features)]
            for dtype in (np.int64, np.int32):
                bounds, values = layout(K_features, B, max(num_rows, default=1), dtype)
                for one_row in (False, True):
                    for in_order in (False, True):
                        check_grouping(values, bounds, B, table_features, num_rows, padding,
                                       bases, one_row, in_order, threads)

        case(f"collection_group_by_row: arguments that do not fit {tag}")
        bounds, values = layout(4, 3, 6, np.int64)
        n = len(values)
        base = dict(values=values, bounds=I(bounds), batch_size=3,
                    table_features=I([0, 2, 2, 4]), num_rows=I([5, 3, 6]),
                    padding=I([-1, 2, -1, -1]), grad_row_bases=I([0, 3, 0, 0]),
                    one_row_per_value=False, positions_in_order=True, num_threads=threads)
        decreasing = list(bounds)
        decreasing[6] = decreasing[7] + 1
        untouched = [base[name] for name in ("values", "bounds", "table_features", "num_rows",
                                             "padding", "grad_row_bases")]

        def group_with(**changes):
            return K.collection_group_by_row(*dict(base, **changes).values())

        bad = [
            # bounds: K * B + 1 of them, from 0 to len(values), non-decreasing
            dict(bounds=I(bounds[:-1])), dict(bounds=I(bounds + [n])),
            dict(bounds=I([1] + bounds[1:])), dict(bounds=I(bounds[:-1] + [n + 1])),
            dict(bounds=I(bounds[:-1] + [n - 1])), dict(bounds=I(decreasing)),
            dict(bounds=I(bounds[:5] + [INT64_MAX] + bounds[6:])),
            dict(bounds=I(bounds[:5] + [INT64_MIN] + bounds[6:])),
            dict(bounds=I([])), dict(bounds=None),
            dict(bounds=guarded(np.array(bounds, np.int32))),
            # table_features: from 0 to K, non-decreasing, one more than tables
            dict(table_features=I([])), dict(table_features=None),
            dict(table_features=I([1, 2, 2, 4])), dict(table_features=I([0, 2, 2, 3])),
            dict(table_features=I([0, 2, 2, 5])), dict(table_features=I([0, 3, 1, 4])),
            dict(table_features=I([0, INT64_MAX, 2, 4])),
            dict(table_features=I([0, INT64_MIN, 2, 4])), dict(table_features=I([0, 2, 4])),
            # one num_rows per table, one padding and grad_row_base per feature
            dict(num_rows=I([5, 3])), dict(num_rows=I([5, 3, 6, 7])), dict(num_rows=None),
            dict(padding=I([-1, -1, -1])), dict(padding=I([-1] * 5)),
            dict(grad_row_bases=I([0, 0, 0])), dict(grad_row_bases=I([0] * 5)),
            dict(grad_row_bases=I([0, -1, 0, 0])), dict(grad_row_bases=I([INT64_MIN, 0, 0, 0])),
            # the batch size
            dict(batch_size=-1), dict(batch_size=2), dict(batch_size=4), dict(batch_size=2**40),
            dict(batch_size=INT64_MAX), dict(batch_size=INT64_MIN),
            # huge tables: a row and a position no longer fit one int64
            dict(num_rows=I([INT64_MAX, 3, 6])), dict(num_rows=I([5, 3, 2**62])),
            dict(grad_row_bases=I([2**62, 0, 0, 0])),
            # values: int32 or int64, contiguous, as many as the bounds say
            dict(values=strided(np.asarray(values))), dict(values=None),
            dict(values=guarded(np.asarray(values)[:-1])),
        ]
        for changes in bad:
            refused(lambda: group_with(**changes), untouched, what=changes)
        for values_of_another_type in (guarded(np.asarray(values), np.float64),
                                       guarded(np.asarray(values), np.uint64), list(values)):
            refused(lambda: group_with(values=values_of_another_type), untouched, (TypeError,))

        case(f"collection_group_by_row: odd thread counts {tag}")
        for thread_count in (0, -1, 7):
            check_grouping(values, bounds, 3, [0, 2, 2, 4], [5, 3, 6], [-1, 2, -1, -1],
                           [0, 3, 0, 0], True, False, thread_count)
print("ALL OK", flush=True)
"""

# --------------------------------------------------------------------------------------------
# split_columns
# --------------------------------------------------------------------------------------------

SPLIT_CASES = COLLECTION_HELPERS + r"""
def split_by_hand(grad, columns):
    grad = np.asarray(grad)
    return np.concatenate([grad[:, a:b].reshape(-1) for a, b in zip(columns, columns[1:])]
                          + [np.zeros(0, grad.dtype)])

COLUMN_SETS = [[0, 7], [0, 3, 3, 7], [0, 0, 0, 7, 7], list(range(8))]

for side in SIDES:
    SIDE = side
    for dtype in (f4, f8):
        other = f8 if dtype is f4 else f4
        for threads in (1, 2):
            tag = f"{side} {np.dtype(dtype).name} threads={threads}"
            B, C = 4, 7

            case(f"split_columns: contiguous, row-strided, reversed and broadcast grads {tag}")
            grads = [
                guarded(rng.standard_normal((B, C)), dtype),
                edge_view(guarded(rng.standard_normal((B, C + 5)), dtype), C, side),
                guarded(rng.standard_normal((B, C)), dtype)[::-1],
                np.broadcast_to(guarded(rng.standard_normal(C), dtype), (B, C)),
            ]
            for grad in grads:
                for columns in COLUMN_SETS:
                    out = guarded(np.full(B * C, 9, dtype))
                    K.split_columns(grad, I(columns), out, threads)
                    assert_same_bits(out, split_by_hand(grad, columns))
            one_column = edge_view(guarded(rng.standard_normal((B, 3)), dtype), 1, side)
            out = guarded(np.full(B, 9, dtype))
            K.split_columns(one_column, I([0, 1]), out, threads)
            assert_same_bits(out, split_by_hand(one_column, [0, 1]))

            case(f"split_columns: arguments that do not fit {tag}")
            grad = guarded(rng.standard_normal((B, C)), dtype)
            base = dict(grad=grad, columns=I([0, 3, 7]), out=guarded(np.full(B * C, 9, dtype)),
                        num_threads=threads)
            untouched = [grad, base["out"]]

            def split_with(**changes):
                return K.split_columns(*dict(base, **changes).values())

            bad = [
                # columns: from 0 to C, non-decreasing
                dict(columns=I([1, 7])), dict(columns=I([0, 6])), dict(columns=I([0, 8])),
                dict(columns=I([0, 5, 3, 7])), dict(columns=I([0, -1, 7])),
                dict(columns=I([0, INT64_MAX, 7])), dict(columns=I([0, INT64_MIN, 7])),
                dict(columns=I([INT64_MIN, 7])), dict(columns=I([0, INT64_MAX])),
                dict(columns=I([])), dict(columns=None),
                dict(columns=guarded(np.array([0, 3, 7], np.int32))),
                # out: B * C elements of grad's dtype, contiguous, writable
                dict(out=guarded(np.zeros(B * C - 1, dtype))),
                dict(out=guarded(np.zeros(B * C + 1, dtype))),
                dict(out=strided(np.zeros(B * C, dtype))),
                dict(out=readonly(np.zeros(B * C, dtype))),
                dict(out=guarded(np.zeros(B * C, other))), dict(out=None),
                # grad: each row's columns contiguous
                dict(grad=np.asfortranarray(np.asarray(grad))),
                dict(grad=guarded(np.zeros((B, 2 * C)), dtype)[:, ::2]),
                dict(grad=guarded(np.zeros((B, C)), dtype)[:, ::-1]), dict(grad=None),
            ]
            for changes in bad:
                refused(lambda: split_with(**changes), untouched, what=changes)
            for wrong_type in (np.asarray(grad).tolist(), np.asarray(grad).astype(np.float16),
                               np.asarray(grad).astype(np.int32)):
                refused(lambda: split_with(grad=wrong_type), untouched, (TypeError,))

            case(f"split_columns: no rows, no columns, odd thread counts {tag}")
            K.split_columns(guarded(np.zeros((0, C)), dtype), I([0, 3, 7]),
                            guarded(np.zeros(0, dtype)), threads)
            K.split_columns(guarded(np.zeros((B, 0)), dtype), I([0]),
                            guarded(np.zeros(0, dtype)), threads)
            K.split_columns(guarded(np.zeros((B, 0)), dtype), I([0, 0, 0]),
                            guarded(np.zeros(0, dtype)), threads)
            for thread_count in (0, -1):
                out = guarded(np.full(B * C, 9, dtype))
                K.split_columns(grad, I([0, 3, 7]), out, thread_count)
                assert_same_bits(out, split_by_hand(grad, [0, 3, 7]))
print("ALL OK", flush=True)
"""

# --------------------------------------------------------------------------------------------
# sparse_step_tables
# --------------------------------------------------------------------------------------------

STEP_TABLES_CASES = COLLECTION_HELPERS + r"""
SPECS = [(5, 3), (4, 2), (0, 3), (5, 0), (6, 4)]  # (V, D): one without rows, one without columns
R = 6  # gradient rows of each plan

def state_shapes(method, V, D):
    return {"sgd": (None, None), "adagrad": ((V, D), None), "rowwise_adagrad": ((V, 1), None),
            "adam": ((V, D), (V, D))}[method]

def plan_for(kind, D, dtype, side):
    # 7 groups over 8 order entries, some naming no position (negative, 2**40, past grad) or,
    # through the source, no grad row: the kernel skips them
    starts, order = I([0, 1, 3, 3, 5, 6, 8, 8]), I([0, 2, -1, 5, 2**40, 1, 6, 3])
    grad = guarded(rng.standard_normal((R, D)), dtype)
    if kind == 0:
        return GradientPlan(grad, starts, order)
    if kind == 1:
        return GradientPlan(grad, starts, order, source=I([0, 5, 2**40, -1, 3, 1, 6]))
    if kind == 2:
        return GradientPlan(grad, starts, order, coefficients=guarded(rng.random(R), dtype),
                            scale_by_frequency=True)
    if kind == 3:
        return GradientPlan(grad, starts, order, winners=guarded(
            rng.choice([0, 2, 3, -1], (R, D)), np.int64))
    # rows of a wider gradient (a collection's columns), against the guard page
    return GradientPlan(edge_view(guarded(rng.standard_normal((R, D + 3)), dtype), D, side),
                        starts, order)

def make_step(method, dtype, side):
    # tables, states, rows (7 groups: rows outside the table among them) and plans
    tables, states_a, states_b, rows, plans = [], [], [], [], []
    for number, (V, D) in enumerate(SPECS):
        tables.append(guarded(rng.standard_normal((V, D)), dtype))
        a, b = state_shapes(method, V, D)
        states_a.append(None if a is None else guarded(rng.random(a), dtype))
        states_b.append(None if b is None else guarded(rng.random(b), dtype))
        rows.append(I([INT64_MIN, 2, V, 0, INT64_MAX, 3, -1]))
        plans.append(plan_for(number, D, dtype, side))
    scalars = [guarded(np.array(s, np.float64)) for s in (
        [-0.5, -0.25, 0.1, -1.0, -0.3], [0.1, 0.2, 0.1, 0.1, 0.3], [0.01, 0.02, 0.1, 0.1, 0.5],
        [1e-8, 1e-6, 1e-8, 1e-8, 1e-3])]
    return tables, states_a, states_b, rows, plans, scalars

def copies(arrays):
    return [None if a is None else np.array(a) for a in arrays]

def check_step_tables(method, tables, states_a, states_b, rows, plans, scalars, maximize,
                      decay, threads):
    # each table as sparse_step steps it alone; rows outside the table unchanged
    want = [copies(tables), copies(states_a), copies(states_b)]
    for t in range(len(tables)):
        K.sparse_step(METHOD[method], want[0][t], want[1][t], want[2][t], rows[t], plans[t],
                      *(float(s[t]) for s in scalars), maximize, decay, 1)
    before = copies(tables)
    K.sparse_step_tables(METHOD[method], tables, states_a, states_b, rows, plans, *scalars,
                         maximize, decay, threads)
    for got, wanted in zip((tables, states_a, states_b), want):
        for array, expected in zip(got, wanted):
            if array is not None:
                assert_same_bits(array, expected)
    for table, old, table_rows in zip(tables, before, rows):
        changed = set(np.flatnonzero((np.asarray(table) != old).any(axis=1)).tolist())
        assert changed <= {int(r) for r in table_rows if 0 <= r < len(table)}, changed

for side in SIDES:
    SIDE = side
    for dtype in (f4, f8):
        other = f8 if dtype is f4 else f4
        for threads in (1, 2):
            tag = f"{side} {np.dtype(dtype).name} threads={threads}"
            for method in METHOD:
                case(f"sparse_step_tables: {method}, rows and plan entries outside {tag}")
                for maximize, decay in ((False, 0.0), (True, 0.01)):
                    check_step_tables(method, *make_step(method, dtype, side), maximize, decay,
                                      threads)

            for method in ("sgd", "rowwise_adagrad", "adam"):
                case(f"sparse_step_tables: {method}, arguments that do not fit {tag}")
                tables, states_a, states_b, rows, plans, scalars = make_step(method, dtype, side)
                V, D = SPECS[-1]
                grad, starts, order = plans[-1].grad, plans[-1].starts, plans[-1].order
                a_shape = state_shapes(method, V, D)[0] or (V, 1)
                untouched = [a for a in tables + states_a + states_b if a is not None]

                def last(values, value):
                    return values[:-1] + [value]

                def step_with(**changes):
                    arguments = dict(tables=tables, states_a=states_a, states_b=states_b,
                                     rows=rows, plans=plans, lrs=scalars[0],
                                     one_minus_beta1s=scalars[1], one_minus_beta2s=scalars[2],
                                     epss=scalars[3])
                    arguments.update(changes)
                    return K.sparse_step_tables(METHOD[method], *arguments.values(), False, 0.0,
                                                threads)

                def plan_with(**changes):
                    fields = dict(grad=grad, starts=starts, order=order)
                    fields.update(changes)
                    return dict(plans=last(plans, GradientPlan(**fields)))

                TYPE = (TypeError,)
                bad = [
                    # the last table's plan (every table is checked before any changes)
                    (plan_with(starts=I([0, 1, 3, 2, 5, 6, 8, 8])), None),
                    (plan_with(starts=I([0, 1, 3, 3, 5, 6, 8, 9])), None),
                    (plan_with(starts=I([-1, 1, 3, 3, 5, 6, 8, 8])), None),
                    (plan_with(starts=I([INT64_MIN, 1, 3, 3, 5, 6, 8, INT64_MAX])), None),
                    (plan_with(starts=I([0, 1, 3, 3, 5, 6, 8])), None),
                    (plan_with(starts=I([0, 1, 3, 3, 5, 6, 8, 8, 8])), None),
                    (plan_with(order=I([0, 2, 1])), None),
                    (plan_with(coefficients=guarded(np.ones(R - 1), dtype)), None),
                    (plan_with(coefficients=guarded(np.ones(R), other)), None),
                    (plan_with(winners=guarded(np.zeros((R, D + 1), np.int64))), None),
                    (plan_with(winners=guarded(np.zeros((R + 1, D), np.int64))), None),
                    (plan_with(grad=guarded(np.ones((R, D + 1)), dtype)), None),
                    (plan_with(grad=guarded(np.ones((R, D)), other)), None),
                    (plan_with(grad=guarded(np.ones((R, 2 * D)), dtype)[:, ::2]), None),
                    (plan_with(grad=guarded(np.ones((R, D)), dtype)[::-1]), None),
                    (plan_with(grad=None), None), (plan_with(starts=None), None),
                    (plan_with(order=None), None),
                    (plan_with(grad=np.ones((R, D)).tolist()), TYPE),
                    (plan_with(starts=[0, 1, 3, 3, 5, 6, 8, 8]), TYPE),
                    # the last table's state, table and rows
                    (dict(states_a=last(states_a, guarded(np.zeros((V + 1, a_shape[1])),
                                                          dtype))), None),
                    (dict(states_a=last(states_a, guarded(np.zeros(a_shape), other))), None),
                    (dict(tables=last(tables, None)), None),
                    (dict(tables=last(tables, guarded(np.zeros((V, D)), other))), None),
                    (dict(tables=last(tables, guarded(np.zeros((V, D)), np.int32))), None),
                    (dict(tables=last(tables, strided(np.zeros((V, D), dtype)))), None),
                    (dict(tables=last(tables, readonly(np.zeros((V, D), dtype)))), None),
                    # (float64 calls take None for np.dtype(None): the conversion refuses it)
                    (dict(tables=last(tables, np.zeros((V, D)).tolist())),
                     (ValueError, TypeError)),
                    (dict(rows=last(rows, None)), None),
                    (dict(rows=last(rows, guarded(np.zeros(7, np.int32)))), None),
                    (dict(rows=last(rows, I([0] * 6))), None),
                    (dict(rows=last(rows, I([0] * 7).reshape(7, 1))), (ValueError, TypeError)),
                    (dict(rows=last(rows, [0] * 7)), TYPE),
                    # one entry per table in every list and scalar array
                    (dict(states_a=states_a[:-1]), None), (dict(states_b=states_b[:-1]), None),
                    (dict(rows=rows[:-1]), None), (dict(plans=plans + plans[:1]), None),
                    (dict(lrs=I([0])), None), (dict(lrs=guarded(np.zeros(4))), None),
                    (dict(epss=guarded(np.zeros(6))), None),
                    (dict(lrs=guarded(np.zeros(5), f4)), None),
                    (dict(lrs=strided(np.zeros(5))), None),
                    (dict(lrs=None), TYPE), (dict(lrs=[0.1] * 5), TYPE),
                    (dict(tables=None), TYPE), (dict(tables=tuple(tables)), TYPE),
                    (dict(plans=None), TYPE),
                ]
                if method == "adam":
                    bad += [(dict(states_b=last(states_b, None)), None),
                            (dict(states_b=last(states_b, guarded(np.zeros((V, 1)), dtype))),
                             None)]
                if method != "sgd":
                    bad += [(dict(states_a=last(states_a, None)), None)]
                for changes, allowed in bad:
                    refused(lambda: step_with(**changes), untouched, allowed or (ValueError,),
                            what=changes)
                for unknown in (4, 7):
                    refused(lambda: K.sparse_step_tables(unknown, tables, states_a, states_b,
                                                         rows, plans, *scalars, False, 0.0,
                                                         threads), untouched)

            case(f"sparse_step_tables: no tables, odd thread counts {tag}")
            empty = guarded(np.zeros(0))
            K.sparse_step_tables(METHOD["sgd"], [], [], [], [], [], empty, empty, empty, empty,
                                 False, 0.0, threads)
            for thread_count in (0, -1):
                check_step_tables("adam", *make_step("adam", dtype, side), False, 0.0,
                                  thread_count)
print("ALL OK", flush=True)
"""


def _run(build, script):
    result = run_kernel_script(build, script)
    assert result.returncode == 0 and "ALL OK" in result.stdout, describe(result)


@pytest.mark.parametrize("build", _kernel_builds())
def test_collection_bag_reduce_given_hostile_arguments_raises_or_stays_in_bounds(build):
    """Every feature's bags with garbage bounds (backwards, past both ends, int64 extremes),
    values outside their table (int32 and int64), padding anywhere, float16/bfloat16 tables
    beside float32 ones, tables without rows or columns, rows of one and of several blocks, a
    table large enough to prefetch: the bags by hand, other columns untouched, the count of
    values outside their table; first_bags, columns and feature_tables that point outside,
    wrong lengths, dtypes, layouts and types: ValueError/TypeError with out unchanged."""
    _run(build, BAG_REDUCE_CASES)


@pytest.mark.parametrize("build", _kernel_builds())
def test_collection_gather_given_hostile_arguments_raises_or_stays_in_bounds(build):
    """Features of every table dtype, empty features among others, one of several chunks,
    values outside their table (zero rows, counted), unaligned blocks: every byte of out as by
    hand; starts/ends backwards or past the end, blocks past out, feature_tables naming no
    table, wrong lengths, dtypes, layouts and types: ValueError/TypeError, out unchanged."""
    _run(build, GATHER_CASES)


@pytest.mark.parametrize("build", _kernel_builds())
def test_collection_group_by_row_given_hostile_arguments_raises_or_stays_in_bounds(build):
    """Values outside their table (int32 and int64 extremes), padding, tables with no rows,
    negative or huge row counts (2**40, 2**58), far gradient rows, no features, no bags: every
    output as grouped by hand; bounds or table_features that are short, long, backwards or do
    not reach the end, wrong lengths, negative bases, batch sizes that do not fit, tables too
    large to group: ValueError (TypeError for values of another type)."""
    _run(build, GROUP_CASES)


@pytest.mark.parametrize("build", _kernel_builds())
def test_split_columns_given_hostile_arguments_raises_or_stays_in_bounds(build):
    """Contiguous, row-strided (against the guard page), reversed and broadcast grads, empty
    blocks: the blocks by hand; columns that do not run from 0 to C or go backwards, out of the
    wrong size, dtype or layout, grads whose rows are not contiguous: ValueError/TypeError,
    out unchanged; no rows or no columns: nothing written."""
    _run(build, SPLIT_CASES)


@pytest.mark.parametrize("build", _kernel_builds())
def test_sparse_step_tables_given_hostile_arguments_raises_or_stays_in_bounds(build):
    """Every method on five tables (one without rows, one without columns) whose rows and plans
    name rows, positions and grad rows outside: each table as sparse_step steps it alone;
    a last table whose plan, state, rows or dtype does not fit, lists of different lengths,
    scalars of the wrong size or dtype: ValueError/TypeError with no table or state changed."""
    _run(build, STEP_TABLES_CASES)


# --------------------------------------------------------------------------------------------
# Arguments whose checks once overflowed or were missing (each a crash or a wrong result until
# it was fixed). They run on the portable build (the source is the same for every build).
# --------------------------------------------------------------------------------------------

OVERFLOW_CASES = {
    "collection_bag_reduce: first_bags = INT64_MAX (first_bag + B overflows)": """
SIDE = "before"
out = guarded(np.zeros((1, 3), f4))
expect(ValueError, lambda: K.collection_bag_reduce(
    [guarded(np.ones((5, 3), f4))], I([0, 1]), I([0, 2]), I([0]), I([INT64_MAX]), I([0]),
    I([-1]), I([0]), None, out, None, 1))
""",
    "collection_bag_reduce: columns = INT64_MAX - 1 (column + D overflows)": """
SIDE = "before"
out = guarded(np.zeros((1, 3), f4))
expect(ValueError, lambda: K.collection_bag_reduce(
    [guarded(np.ones((5, 3), f4))], I([0, 1]), I([0, 2]), I([0]), I([0]), I([0]), I([-1]),
    I([INT64_MAX - 1]), None, out, None, 1))
""",
    "collection_bag_reduce: modes beyond 32 bits": """
for mode in (2**32, INT64_MIN, 2**32 + 2):
    out = guarded(np.zeros((1, 3), f4))
    expect(ValueError, lambda: K.collection_bag_reduce(
        [guarded(np.ones((5, 3), f4))], I([0, 1]), I([0, 2]), I([0]), I([0]), I([mode]),
        I([-1]), I([0]), None, out, None, 1))
""",
    "collection_bag_reduce: decreasing bounds count every value a bag reads": """
out = guarded(np.zeros((2, 3), f4))
got = K.collection_bag_reduce([guarded(np.ones((5, 3), f4))], I([0, 1, 2, 9, 4, 1]),
                              I([0, 5, 2]), I([0]), I([0]), I([0]), I([-1]), I([0]), None,
                              out, None, 1)
assert out[0].tolist() == [4.0] * 3, out
assert got == 1, f"count {got}: the skipped value 9 in bag 0 was not counted"
""",
    "collection_gather: out_offsets = INT64_MAX - 5 (the block's end overflows)": """
out = guarded(np.zeros(12, np.int8))
expect(ValueError, lambda: K.collection_gather(
    [guarded(np.ones((5, 3), f4))], I([0]), I([0]), I([0]), I([1]), out, I([INT64_MAX - 5]),
    1))
""",
    "collection_group_by_row: K * B that overflows int64": """
expect(ValueError, lambda: K.collection_group_by_row(
    I([]), I([0, 0, 0]), 6148914691236517206, I([0, 3]), I([5]), I([-1] * 3), I([0] * 3),
    False, True, 1))
""",
    "collection_group_by_row: grad_row_bases near INT64_MAX": """
try:
    source, order, rows, starts, counts = K.collection_group_by_row(
        I([0, 1, 0]), I([0, 1, 3]), 2, I([0, 1]), I([5]), I([-1]), I([INT64_MAX - 1]), False,
        False, 1)
except ValueError:
    pass
else:
    assert counts.tolist() == [2] and rows[:2].tolist() == [0, 1], (counts, rows)
    assert order.tolist() == [INT64_MAX - 1, INT64_MAX, INT64_MAX], order
""",
    "split_columns: a row stride that is not a multiple of the item size": """
records = guarded(np.zeros(3, [("g", "<f4", (2,)), ("pad", "<u2")]))
records["g"] = np.arange(6, dtype=f4).reshape(3, 2) + 1
grad = records["g"]
out = guarded(np.zeros(6, f4))
try:
    K.split_columns(grad, I([0, 1, 2]), out, 1)
except ValueError:
    pass
else:
    assert out.tolist() == [1, 3, 5, 2, 4, 6], out
""",
    "split_columns: a negative row stride that is not a multiple of the item size": """
SIDE = "before"
records = guarded(np.zeros(3, [("g", "<f4", (2,)), ("pad", "<u2")]))
records["g"] = np.arange(6, dtype=f4).reshape(3, 2) + 1
grad = records["g"][::-1]
out = guarded(np.zeros(6, f4))
try:
    K.split_columns(grad, I([0, 1, 2]), out, 1)
except ValueError:
    pass
else:
    assert out.tolist() == [5, 3, 1, 6, 4, 2], out
""",
    "sparse_step_tables: a plan that is None": """
V, D = 5, 3
plan = GradientPlan(guarded(np.ones((1, D), f4)), I([0, 1]), I([0]))
for plans in ([None], [plan, None]):
    try:
        K.sparse_step_tables(METHOD["sgd"], [guarded(np.zeros((V, D), f4))] * len(plans),
                             [None] * len(plans), [None] * len(plans), [I([0])] * len(plans),
                             plans, *[guarded(np.zeros(len(plans)))] * 4, False, 0.0, 1)
    except (ValueError, TypeError):
        pass
    except Exception as error:
        raise AssertionError(f"raised {type(error).__name__}: {error}")
    else:
        raise AssertionError("accepted a plan that is None")
""",
}


@pytest.mark.parametrize("name", list(OVERFLOW_CASES))
def test_collection_kernels_refuse_overflowing_or_missing_arguments(name):
    """Arguments whose checks could overflow or be skipped: the kernel must raise ValueError (or
    TypeError) or return the right result, without touching memory outside its arrays (each
    case runs in a child, which must print ALL OK and exit cleanly)."""
    result = run_kernel_script("_core", COLLECTION_HELPERS + OVERFLOW_CASES[name]
                               + "\nprint('ALL OK')\n")
    assert result.returncode == 0 and "ALL OK" in result.stdout, describe(result)
