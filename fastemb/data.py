"""Ratings for the ``train`` command: files people have, MovieLens 100k, or a synthetic set.

``load_ratings("ml-100k")`` finds the MovieLens 100k ratings that recbole's wheel ships
(``pip install --no-deps recbole==1.2.1``, about 2 MB; recbole is located, never imported, so
torch is not needed). ``read_ratings(path)`` reads MovieLens ``u.data`` (tab-separated),
``ratings.dat`` (``::``), ``ratings.csv`` (``userId,movieId,rating,timestamp``), recbole's
``.inter`` files, and any CSV whose columns ``columns=`` names. The bytes are parsed by
``fastemb._text`` in one compiled pass (a 20,000,000-line file in a few seconds); every bad
line raises ``ValueError`` naming the file and the line.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass

import numpy as np

from ._text import parse_ratings

# A rating beyond this magnitude is refused as absurd (it would also swamp float32 sums).
RATING_LIMIT = 1e6

# Datasets known by name: (package that ships the file, path inside it, how to install it).
DATASETS = {
    "ml-100k": ("recbole", "dataset_example/ml-100k/ml-100k.inter",
                "pip install --no-deps recbole==1.2.1"),
}

# Header names recognised for each column, compared lower-case without "_", "-", spaces and
# recbole's ":type" suffix (so "userId", "user_id:token" and "User ID" all read "userid").
COLUMN_NAMES = {
    "user": ("user", "userid", "users", "uid", "customerid", "readerid"),
    "item": ("item", "itemid", "items", "iid", "movie", "movieid", "product", "productid",
             "book", "bookid", "isbn", "song", "songid", "trackid"),
    "rating": ("rating", "ratings", "score", "stars", "bookrating", "value"),
}
ROLES = ("user", "item", "rating")
SEPARATORS = (b"::", b"\t", b",", b";", b" ")
STRING_ID_ROWS_PER_CHUNK = 1 << 20


@dataclass
class Ratings:
    """Ratings as parallel arrays; users and items are 0-based rows.

    >>> data = Ratings(np.array([0, 1]), np.array([2, 0]), np.array([4.0, 3.5], np.float32),
    ...                num_users=2, num_items=3)
    >>> len(data), data.subset([1]).items.tolist()
    (2, [0])
    """

    users: np.ndarray    # int64
    items: np.ndarray    # int64
    ratings: np.ndarray  # float32
    num_users: int
    num_items: int

    def __len__(self):
        return self.ratings.size

    def subset(self, selection):
        """The ratings at ``selection`` (indices or a mask), with the same tables."""
        return Ratings(self.users[selection], self.items[selection], self.ratings[selection],
                       self.num_users, self.num_items)

    def split(self, holdout_fraction, seed):
        """(train, held-out) split of the ratings, at random but deterministic in ``seed``.

        >>> train, test = synthetic_ratings(100, 50, 1000).split(0.1, seed=0)
        >>> len(train), len(test)
        (900, 100)
        """
        order = np.random.default_rng([seed, 1]).permutation(len(self))
        cut = len(self) - int(round(len(self) * holdout_fraction))
        return self.subset(np.sort(order[:cut])), self.subset(np.sort(order[cut:]))


def _skewed_choice(rng, count, size, exponent):
    """``size`` draws from ``range(count)`` where the k-th most popular id has probability
    proportional to ``k ** -exponent``; which ids are popular is a random permutation."""
    weights = np.arange(1, count + 1, dtype=np.float64) ** -exponent
    cumulative = np.cumsum(weights / weights.sum())
    ranks = np.minimum(np.searchsorted(cumulative, rng.random(size)), count - 1)
    return rng.permutation(count)[ranks]


def synthetic_ratings(num_users=100_000, num_items=50_000, num_ratings=5_000_000, rank=8,
                      noise=0.5, seed=0):
    """A deterministic ratings set with a realistic shape: Zipf-skewed item popularity, skewed
    user activity, ratings 1..5 from a planted low-rank model plus biases and Gaussian noise.

    >>> data = synthetic_ratings(1000, 500, 20_000, seed=0)
    >>> len(data), int(data.ratings.min()), int(data.ratings.max())
    (20000, 1, 5)
    """
    rng = np.random.default_rng(seed)
    users = _skewed_choice(rng, num_users, num_ratings, exponent=0.5)
    items = _skewed_choice(rng, num_items, num_ratings, exponent=1.0)
    user_factors = rng.standard_normal((num_users, rank)) / rank ** 0.25
    item_factors = rng.standard_normal((num_items, rank)) / rank ** 0.25
    user_bias = rng.normal(0.0, 0.4, num_users)
    item_bias = rng.normal(0.0, 0.6, num_items)
    affinity = np.einsum("ij,ij->i", user_factors[users], item_factors[items])
    scores = 3.4 + user_bias[users] + item_bias[items] + affinity
    scores += rng.normal(0.0, noise, num_ratings)
    ratings = np.clip(np.rint(scores), 1, 5).astype(np.float32)
    return Ratings(users.astype(np.int64), items.astype(np.int64), ratings, num_users, num_items)


def dataset_path(name: str) -> str:
    """The path of a dataset known by name (``DATASETS``), from the package that ships it.

    The package is located with importlib, not imported. Raises FileNotFoundError saying how to
    install it when it is absent.
    """
    package, inside, install = DATASETS[name]
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, inside)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{name}: the MovieLens 100k ratings come with the {package} package, which is not "
        f"installed here: run `{install}` (about 2 MB, no other packages), or pass the path "
        f"of a ratings file such as MovieLens u.data or ratings.csv"
    )


def load_ratings(source: str | os.PathLike, columns=None) -> Ratings:
    """Ratings from a dataset name (``"ml-100k"``) or a file path (see ``read_ratings``)."""
    if source in DATASETS and not os.path.exists(source):
        return read_ratings(dataset_path(source), columns)
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such file (nor a dataset name: "
                                f"{', '.join(DATASETS)})")
    return read_ratings(source, columns)


def _normalised(name):
    return re.sub(r"[\s_\-]", "", name.split(":")[0]).lower()


def _parse_columns(columns):
    """``columns`` as three names or three 0-based positions (a sequence, or a comma-separated
    string such as ``"userId,movieId,rating"`` or ``"0,1,2"``)."""
    if isinstance(columns, str):
        columns = [part.strip() for part in columns.split(",")]
    columns = list(columns)
    if len(columns) != 3 or any(isinstance(c, str) and not c for c in columns):
        raise ValueError(f"columns must name the user, item and rating columns (three names "
                         f"or 0-based positions, e.g. userId,movieId,rating or 0,1,2), got "
                         f"{columns!r}")
    if all(isinstance(c, (int, np.integer)) or str(c).isdigit() for c in columns):
        return [int(c) for c in columns], None
    return None, [str(c) for c in columns]


def _first_line(raw, path):
    """(text of the first non-blank line, its number, its byte offset)."""
    offset, number = 0, 1
    while offset < len(raw):
        end = raw.find(b"\n", offset)
        end = len(raw) if end < 0 else end
        if raw[offset:end].strip():
            return _decoded_line(raw[offset:end], path, number), number, offset
        offset, number = end + 1, number + 1
    raise ValueError(f"{path}: no ratings found (the file is empty)")


def _decoded_line(line, path, number):
    try:
        return line.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}:{number}: the line is not UTF-8 text ({error.reason} at "
                         f"byte {error.start + 1}): {line[:120]!r}") from None


def _line_at(raw, number, first_number, first_offset):
    """The bytes of line ``number``, counting lines from ``first_offset`` (line first_number)."""
    text = np.frombuffer(raw, dtype=np.uint8)[first_offset:]
    ends = np.flatnonzero(text == ord("\n")) + first_offset
    k = number - first_number
    start = first_offset if k == 0 else int(ends[k - 1]) + 1
    return raw[start:int(ends[k]) if k < ends.size else len(raw)]


def _column_positions(header, names, positions, path, number):
    """0-based positions of the user, item and rating columns."""
    if positions is not None:
        return positions
    if header is None:
        if names is not None:
            raise ValueError(f"{path}: columns are named ({', '.join(names)}) but the file has "
                             f"no header line; give 0-based positions instead")
        return [0, 1, 2]
    found = [_normalised(field) for field in header]
    chosen = []
    for role, wanted in zip(ROLES, names or [None] * 3):
        candidates = [_normalised(wanted)] if wanted else COLUMN_NAMES[role]
        matches = [found.index(c) for c in candidates if c in found]
        if not matches:
            raise ValueError(
                f"{path}:{number}: no {role} column in the header {header!r}; name the "
                f"columns with --columns USER,ITEM,RATING (e.g. userId,movieId,rating)"
            )
        chosen.append(matches[0])
    return chosen


def _rows_of_integer_ids(ids):
    """(rows 0..k-1 in id order, k): a direct table when the ids are small, else a sort."""
    if ids.size and int(ids.max()) < 4 * ids.size + (1 << 20):
        present = np.zeros(int(ids.max()) + 1, dtype=bool)
        present[ids] = True
        rank = np.cumsum(present, dtype=np.int64) - 1
        return rank[ids], int(rank[-1]) + 1
    unique, rows = np.unique(ids, return_inverse=True)
    return rows.astype(np.int64), unique.size


def _rows_of_string_ids(raw, spans, path):
    """(rows 0..k-1 in id order, k) for ids given as (start, length) byte spans of ``raw``."""
    width = max(int(spans[:, 1].max(initial=1)), 1)
    text = np.frombuffer(raw, dtype=np.uint8)
    keys = np.empty(len(spans), dtype=f"S{width}")
    for first in range(0, len(spans), STRING_ID_ROWS_PER_CHUNK):
        chunk = spans[first:first + STRING_ID_ROWS_PER_CHUNK]
        columns = np.arange(width)
        inside = columns < chunk[:, 1:2]
        gathered = text[np.where(inside, chunk[:, 0:1] + columns, 0)] * inside
        keys[first:first + len(chunk)] = gathered.astype(np.uint8).view(f"S{width}")[:, 0]
    unique, rows = np.unique(keys, return_inverse=True)
    for key in unique:
        try:
            key.decode("utf-8")
        except UnicodeDecodeError:
            start = int(spans[np.flatnonzero(keys == key)[0], 0])
            number = raw.count(b"\n", 0, start) + 1
            _decoded_line(_line_at(raw, number, 1, 0), path, number)
    return rows.astype(np.int64), unique.size


def read_ratings(path: str | os.PathLike, columns=None) -> Ratings:
    """Read a ratings file: one rating per line, fields split by ``::``, a tab, ``,``, ``;``
    or a space (whichever the first line has), an optional header line.

    Without ``columns``, a header's user, item and rating columns are found by name
    (``userId``, ``movieId``, ``rating``, recbole's ``user_id:token``, ...); a file without a
    header has them first (``u.data``, ``ratings.dat``). ``columns`` picks them: three header
    names or three 0-based positions, in the order user, item, rating. Ids may be any strings
    or numbers; each distinct id becomes a row, in sorted order. Raises ValueError naming the
    file and line of anything malformed: too few fields, a rating that is not a finite number
    within +-1e6, text that is not UTF-8.

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "ratings.csv")
    ...     _ = open(path, "w").write("userId,movieId,rating,timestamp\\n7,30,4.5,0\\n9,30,2,0\\n")
    ...     data = read_ratings(path)
    >>> data.users.tolist(), data.items.tolist(), data.ratings.tolist(), data.num_users
    ([0, 1], [0, 0], [4.5, 2.0], 2)
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        raw = file.read()
    if raw.startswith(b"\xef\xbb\xbf"):  # spreadsheets write a UTF-8 byte order mark
        raw = raw[3:]
    positions, names = _parse_columns(columns) if columns is not None else (None, None)
    first, first_number, first_offset = _first_line(raw, path)
    separator = next((s for s in SEPARATORS if s.decode() in first), None)
    if separator is None:
        raise ValueError(f"{path}:{first_number}: cannot tell how the fields are separated "
                         f"(no '::', tab, ',', ';' or space): {first[:120]!r}")
    fields = [field.strip() for field in first.split(separator.decode())]
    known = {name for role in ROLES for name in COLUMN_NAMES[role]}
    wanted = {_normalised(name) for name in names or []}
    is_header = any(_normalised(field) in known | wanted for field in fields)
    user_column, item_column, rating_column = _column_positions(
        fields if is_header else None, names, positions, path, first_number)
    body_offset = first_offset
    body_number = first_number
    if is_header:
        end = raw.find(b"\n", first_offset)
        body_offset, body_number = (len(raw) if end < 0 else end + 1), first_number + 1
    body = memoryview(raw)[body_offset:]

    def parse(ids_as_integers):
        return parse_ratings(body, separator, user_column, item_column, rating_column,
                             ids_as_integers, RATING_LIMIT, body_number)

    users, items, ratings, problem, number = parse(True)
    if problem == "an id is not a non-negative integer":
        users, items, ratings, problem, number = parse(False)
        if problem is None:
            users, num_users = _rows_of_string_ids(raw, users + [body_offset, 0], path)
            items, num_items = _rows_of_string_ids(raw, items + [body_offset, 0], path)
    elif problem is None:
        users, num_users = _rows_of_integer_ids(users)
        items, num_items = _rows_of_integer_ids(items)
    if problem is not None:
        line = _line_at(raw, number, first_number, first_offset)
        _decoded_line(line, path, number)  # a line that is not UTF-8 says so first
        raise ValueError(f"{path}:{number}: {problem}: {line[:120].decode()!r}")
    if ratings.size == 0:
        raise ValueError(f"{path}: no ratings found (only a header)")
    return Ratings(users, items, ratings.astype(np.float32), num_users, num_items)
