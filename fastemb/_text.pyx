# cython: language_level=3
"""fastemb._text: the ratings-file parser behind ``fastemb.data.read_ratings``.

One pass over the file's bytes, with the GIL released, turns each non-blank line into a record
``(user, item, rating)`` taken from three of its fields. A 20,000,000-line MovieLens
``ratings.csv`` (about 530 MB) goes through in a couple of seconds, where a Python loop per
line takes minutes and ``np.loadtxt`` tens of seconds.

- Lines end in ``\\n``; a ``\\r`` before it and spaces around a field are ignored; a line of
  only whitespace is skipped. Fields are split by a separator of one or two bytes
  (``"\\t"``, ``","``, ``";"``, ``" "``, ``"::"``); extra fields (a timestamp) are ignored.
- Ids are read either as non-negative decimal integers (``ids_as_integers``), or as byte spans
  (start, length) into the text, spaces trimmed, that the caller turns into strings.
- A rating is a decimal number (``3``, ``3.5``, ``-1``, ``4e-1``). Digit strings whose value is
  an integer below 2**53 with a power of ten up to 10**22 are converted exactly here (one
  correctly rounded division, Clinger's fast path); anything else goes to CPython's own,
  locale-independent ``PyOS_string_to_double``, so every rating is the double that ``float()``
  gives. A rating whose magnitude exceeds ``rating_limit`` (or that overflows) is refused.

The parse stops at the first bad line and says which line and why; nothing is guessed.
"""

from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memcpy

import numpy as np

from cpython.object cimport PyObject

cdef extern from "Python.h":
    # overflow_exception NULL: an overflowing number gives +-inf instead of raising
    double PyOS_string_to_double(const char *s, char **endptr,
                                 PyObject *overflow_exception) except? -1.0

# What went wrong on the line the parse stopped at (the order of PROBLEMS below).
cdef enum:
    FINE = 0
    TOO_FEW_FIELDS = 1
    ID_NOT_AN_INTEGER = 2
    RATING_NOT_A_NUMBER = 3
    RATING_OUT_OF_RANGE = 4
    EMPTY_ID = 5

PROBLEMS = (
    None,
    "too few fields",
    "an id is not a non-negative integer",
    "the rating is not a number",
    "the rating is not finite or out of range",
    "an id is empty",
)

cdef int MAX_ID_DIGITS = 18            # below 2**63
cdef int MAX_NUMBER_BYTES = 63         # longest rating text handed to PyOS_string_to_double
cdef double EXACT_POWERS_OF_TEN[23]
for _power in range(23):
    EXACT_POWERS_OF_TEN[_power] = 10.0 ** _power


cdef inline bint is_space(unsigned char c) noexcept nogil:
    return c == b' ' or c == b'\t' or c == b'\r'


cdef inline Py_ssize_t next_field_end(const unsigned char *text, Py_ssize_t position,
                                      Py_ssize_t line_end, const unsigned char *separator,
                                      Py_ssize_t separator_length) noexcept nogil:
    """Where the field starting at ``position`` ends: the next separator, or the line's end."""
    while position < line_end:
        if text[position] == separator[0] and (
                separator_length == 1
                or (position + 1 < line_end and text[position + 1] == separator[1])):
            return position
        position += 1
    return line_end


cdef inline void trim(const unsigned char *text, Py_ssize_t *start,
                      Py_ssize_t *end) noexcept nogil:
    """Move [start, end) inward past spaces, tabs and carriage returns."""
    while start[0] < end[0] and is_space(text[start[0]]):
        start[0] += 1
    while end[0] > start[0] and is_space(text[end[0] - 1]):
        end[0] -= 1


cdef inline bint parse_id(const unsigned char *text, Py_ssize_t start, Py_ssize_t end,
                          int64_t *value) noexcept nogil:
    """A non-negative decimal integer of at most MAX_ID_DIGITS digits, spaces trimmed."""
    cdef int64_t total = 0
    trim(text, &start, &end)
    if start == end or end - start > MAX_ID_DIGITS:
        return False
    while start < end:
        if not (b'0' <= text[start] <= b'9'):
            return False
        total = total * 10 + (text[start] - c'0')
        start += 1
    value[0] = total
    return True


cdef inline bint parse_rating_exactly(const unsigned char *text, Py_ssize_t start,
                                      Py_ssize_t end, double *value) noexcept nogil:
    """``[-+]digits[.digits]`` whose digits form an integer below 2**53 with at most 22
    decimals: the correctly rounded double (an exact integer over an exact power of ten)."""
    cdef bint negative = False, seen_digit = False, after_point = False
    cdef uint64_t mantissa = 0
    cdef int decimals = 0
    if start < end and (text[start] == b'-' or text[start] == b'+'):
        negative = text[start] == b'-'
        start += 1
    while start < end:
        if b'0' <= text[start] <= b'9':
            if mantissa >= (<uint64_t>1 << 53) // 10:
                return False
            mantissa = mantissa * 10 + (text[start] - c'0')
            seen_digit = True
            decimals += after_point
        elif text[start] == b'.' and not after_point:
            after_point = True
        else:
            return False
        start += 1
    if not seen_digit or decimals > 22:
        return False
    value[0] = <double>mantissa / EXACT_POWERS_OF_TEN[decimals]
    if negative:
        value[0] = -value[0]
    return True


cdef bint parse_rating(const unsigned char *text, Py_ssize_t start, Py_ssize_t end,
                       double *value) noexcept nogil:
    """A decimal number, spaces trimmed: the fast path, else CPython's parser."""
    cdef char buffer[64]
    cdef char *parsed_end
    cdef double result
    cdef Py_ssize_t position
    trim(text, &start, &end)
    if start == end:
        return False
    if parse_rating_exactly(text, start, end, value):
        return True
    if end - start > MAX_NUMBER_BYTES:
        return False
    for position in range(start, end):  # only the characters of decimal notation
        if not (b'0' <= text[position] <= b'9' or text[position] == b'+'
                or text[position] == b'-' or text[position] == b'.'
                or text[position] == b'e' or text[position] == b'E'):
            return False
    memcpy(buffer, text + start, end - start)
    buffer[end - start] = 0
    with gil:
        try:
            result = PyOS_string_to_double(buffer, &parsed_end, NULL)
        except ValueError:
            return False
    if parsed_end != buffer + (end - start):
        return False
    value[0] = result
    return True


def parse_ratings(const unsigned char[::1] text not None, bytes separator not None,
                  Py_ssize_t user_column, Py_ssize_t item_column, Py_ssize_t rating_column,
                  bint ids_as_integers, double rating_limit, Py_ssize_t first_line_number=1):
    """Parse the ratings of ``text`` (see the module docstring).

    Returns ``(users, items, ratings, problem, line_number)``: the records parsed (up to the
    bad line, if any); ``problem`` is None, or what is wrong with line
    ``line_number`` (counted from ``first_line_number``), where the parse stopped. With
    ``ids_as_integers`` the ids are int64 values; otherwise ``users`` and ``items`` are
    ``(count, 2)`` int64 arrays of (start, length) byte spans into ``text``.

    >>> users, items, ratings, problem, line = parse_ratings(
    ...     b"1,10,4.5\\n\\n2,11,3\\n", b",", 0, 1, 2, True, 1e6)
    >>> users.tolist(), items.tolist(), ratings.tolist(), problem
    ([1, 2], [10, 11], [4.5, 3.0], None)
    """
    cdef Py_ssize_t size = text.shape[0]
    cdef Py_ssize_t separator_length = len(separator)
    if not 1 <= separator_length <= 2:
        raise ValueError("the separator must be one or two bytes")
    if min(user_column, item_column, rating_column) < 0:
        raise ValueError("column positions must be >= 0")
    cdef const unsigned char *separator_bytes = separator
    cdef const unsigned char *data = &text[0] if size else <const unsigned char *>b""
    cdef Py_ssize_t capacity = 1
    cdef Py_ssize_t position
    for position in range(size):
        capacity += data[position] == b'\n'
    cdef Py_ssize_t id_width = 1 if ids_as_integers else 2
    users_array = np.empty((capacity, id_width), dtype=np.int64)
    items_array = np.empty((capacity, id_width), dtype=np.int64)
    ratings_array = np.empty(capacity, dtype=np.float64)
    cdef int64_t[::1] user_ids = users_array.reshape(-1)
    cdef int64_t[::1] item_ids = items_array.reshape(-1)
    cdef double[::1] ratings = ratings_array
    cdef Py_ssize_t last_column = max(user_column, item_column, rating_column)
    cdef Py_ssize_t count = 0, line_number = first_line_number - 1
    cdef Py_ssize_t line_start = 0, line_end, field_start, field_end, column, blank
    cdef Py_ssize_t id_start, id_end
    cdef int problem = FINE
    cdef int64_t value
    cdef double rating
    with nogil:
        while line_start < size and problem == FINE:
            line_number += 1
            line_end = line_start
            while line_end < size and data[line_end] != b'\n':
                line_end += 1
            blank = line_start
            while blank < line_end and is_space(data[blank]):
                blank += 1
            if blank < line_end:
                field_start = line_start
                column = 0
                while column <= last_column:
                    if field_start > line_end:
                        problem = TOO_FEW_FIELDS
                        break
                    field_end = next_field_end(data, field_start, line_end, separator_bytes,
                                               separator_length)
                    if column == user_column or column == item_column:
                        if ids_as_integers:
                            if not parse_id(data, field_start, field_end, &value):
                                problem = ID_NOT_AN_INTEGER
                                break
                            if column == user_column:
                                user_ids[count] = value
                            if column == item_column:
                                item_ids[count] = value
                        else:
                            id_start, id_end = field_start, field_end
                            trim(data, &id_start, &id_end)
                            if id_start == id_end:
                                problem = EMPTY_ID
                                break
                            if column == user_column:
                                user_ids[2 * count] = id_start
                                user_ids[2 * count + 1] = id_end - id_start
                            if column == item_column:
                                item_ids[2 * count] = id_start
                                item_ids[2 * count + 1] = id_end - id_start
                    if column == rating_column:
                        if not parse_rating(data, field_start, field_end, &rating):
                            problem = RATING_NOT_A_NUMBER
                            break
                        if not (-rating_limit <= rating <= rating_limit):
                            problem = RATING_OUT_OF_RANGE
                            break
                        ratings[count] = rating
                    field_start = field_end + separator_length
                    column += 1
                if problem == FINE:
                    count += 1
            line_start = line_end + 1
    if ids_as_integers:
        users_array, items_array = users_array[:, 0], items_array[:, 0]
    return (users_array[:count], items_array[:count], ratings_array[:count], PROBLEMS[problem],
            line_number if problem != FINE else None)
