"""Ratings files (fastemb.data and its compiled parser fastemb._text): each real format,
ids and ratings exactly as Python reads them, every malformed file refused naming the file and
the line, and MovieLens 100k from recbole's wheel (CI installs recbole==1.2.1 --no-deps)."""

import importlib.util
import re

import numpy as np
import pytest

from fastemb import data as ratings_data
from fastemb._text import parse_ratings

needs_recbole = pytest.mark.skipif(importlib.util.find_spec("recbole") is None,
                                   reason="recbole is not installed (pip install --no-deps "
                                          "recbole==1.2.1)")


def write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def reference_read(lines, user_column, item_column, rating_column, separator):
    """(user ids, item ids, ratings) of non-blank lines, the slow and obvious way."""
    records = [line.split(separator) for line in lines if line.strip()]
    return ([r[user_column].strip() for r in records], [r[item_column].strip() for r in records],
            [float(r[rating_column]) for r in records])


def assert_rows_follow_ids(rows, ids, count):
    """Rows are 0..count-1, one per distinct id, in sorted id order."""
    numeric = all(identity.isdigit() for identity in ids)
    unique = sorted(set(ids), key=int if numeric else lambda x: x.encode())
    assert count == len(unique)
    expected = {identity: row for row, identity in enumerate(unique)}
    assert rows.tolist() == [expected[identity] for identity in ids]


# ---------------------------------------------------------------- each real format

REAL_FORMATS = {
    "u.data": ("196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"
               "196\t377\t4\t881250950\n", (0, 1, 2), "\t"),
    "ratings.dat": ("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n",
                    (0, 1, 2), "::"),
    "ratings.csv": ("userId,movieId,rating,timestamp\n1,307,3.5,1256677221\n1,481,3.5,1256677456"
                    "\n2,307,0.5,1256677471\n", (0, 1, 2), ","),
    "ml-100k.inter": ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                      "196\t242\t3\t881250949\n186\t302\t3\t891717742\n", (0, 1, 2), "\t"),
    "books.csv": ("ISBN;User-ID;Book-Rating\n034545104X;276725;0\n0155061224;276726;5\n"
                  "034545104X;276727;10\n", (1, 0, 2), ";"),
}


@pytest.mark.parametrize("name", sorted(REAL_FORMATS))
def test_real_formats(tmp_path, name):
    text, (user_column, item_column, rating_column), separator = REAL_FORMATS[name]
    loaded = ratings_data.read_ratings(write(tmp_path / name, text))
    lines = text.splitlines()
    if not lines[0][0].isdigit():
        lines = lines[1:]
    users, items, ratings = reference_read(lines, user_column, item_column, rating_column,
                                           separator)
    assert loaded.ratings.dtype == np.float32 and loaded.users.dtype == np.int64
    np.testing.assert_array_equal(loaded.ratings, np.array(ratings, np.float32))
    assert_rows_follow_ids(loaded.users, users, loaded.num_users)
    assert_rows_follow_ids(loaded.items, items, loaded.num_items)


@pytest.mark.parametrize("columns", ["stars,who,what", ["stars", "who", "what"], "3,1,0",
                                     (3, 1, 0)])
def test_columns_pick_the_user_item_and_rating(tmp_path, columns):
    text = "what,who,note,stars\nfilm,ann,x,4\nbook,bob,y,2.5\nfilm,bob,z,1\n"
    if not str(columns[0]).startswith("s"):  # positions: the column order is reversed on purpose
        columns = (1, 0, 3)
    else:
        columns = "who,what,stars" if isinstance(columns, str) else ["who", "what", "stars"]
    loaded = ratings_data.read_ratings(write(tmp_path / "r.csv", text), columns=columns)
    assert loaded.ratings.tolist() == [4.0, 2.5, 1.0]
    assert loaded.users.tolist() == [0, 1, 1] and loaded.items.tolist() == [1, 0, 1]


def test_positions_on_a_file_without_header(tmp_path):
    loaded = ratings_data.read_ratings(write(tmp_path / "r.tsv", "5\t0\t9\t1\n5\t1\t7\t2\n"),
                                       columns="3,2,1")
    assert loaded.ratings.tolist() == [0.0, 1.0]
    assert (loaded.num_users, loaded.num_items) == (2, 2)


def test_bom_crlf_blank_lines_and_spaces(tmp_path):
    text = b"\xef\xbb\xbfuser, item, rating\r\n\r\n 1 , 2 , 4.5 \r\n  \r\n3,2,1\r\n"
    loaded = ratings_data.read_ratings(write(tmp_path / "r.csv", text))
    assert loaded.ratings.tolist() == [4.5, 1.0]
    assert loaded.users.tolist() == [0, 1] and loaded.items.tolist() == [0, 0]


def test_string_ids_including_utf8(tmp_path):
    text = "user,item,rating\nzoë,Amélie,5\nadam,Amélie,3\nzoë,Up,4\n"
    loaded = ratings_data.read_ratings(write(tmp_path / "r.csv", text))
    assert_rows_follow_ids(loaded.users, ["zoë", "adam", "zoë"], loaded.num_users)
    assert loaded.items.tolist() == [0, 0, 1]


def test_large_sparse_integer_ids_are_remapped(tmp_path):
    text = "".join(f"{u},{i},1\n" for u, i in [(10**15, 7), (3, 10**17), (10**15, 10**17)])
    loaded = ratings_data.read_ratings(write(tmp_path / "r.csv", text))
    assert loaded.users.tolist() == [1, 0, 1] and loaded.items.tolist() == [0, 1, 1]


@pytest.mark.parametrize("ids_as_integers", [True, False])
def test_parser_agrees_with_python_on_random_files(rng, ids_as_integers):
    """Random ids and ratings in many spellings: the compiled parser reads what float() and
    int() read, and counts lines as they are."""
    spellings = ["{:d}", "{:.1f}", "{:.3f}", "{:e}", "{:.17g}", "{:+.2f}", "{:.25f}", "{:.1f}e0"]
    lines, expected = [], []
    for k in range(3000):
        user, item = int(rng.integers(0, 10**12)), int(rng.integers(0, 50))
        value = float(rng.normal(3, 20)) if k % 3 else float(rng.integers(-5, 6))
        text = spellings[k % len(spellings)]
        rating = text.format(int(value)) if text == "{:d}" else text.format(value)
        lines.append(f"{user}\t{item}\t{rating}\t99")
        expected.append((user, item, float(rating)))
        if k % 97 == 0:
            lines.append("   ")
    blob = ("\n".join(lines) + "\n").encode()
    users, items, ratings, problem, line = parse_ratings(blob, b"\t", 0, 1, 2, ids_as_integers,
                                                         1e6)
    assert problem is None and line is None
    assert ratings.tolist() == [r for _, _, r in expected]  # bit for bit, as float() reads
    if ids_as_integers:
        assert users.tolist() == [u for u, _, _ in expected]
        assert items.tolist() == [i for _, i, _ in expected]
    else:
        spans = [blob[s:s + n].decode() for s, n in users]
        assert spans == [str(u) for u, _, _ in expected]


# ---------------------------------------------------------------- broken files

BROKEN = [
    ("too few fields", "1\t2\t3\n2\t3\t4\n3\t4\n", 3, "too few fields"),
    ("rating not a number", "1,2,3\n2,3,4\n3,4,five\n", 3, "not a number"),
    ("rating nan", "1,2,3\n2,3,4\n3,4,nan\n", 3, "not a number"),
    ("rating inf", "1,2,3\n2,3,4\n3,4,inf\n", 3, "not a number"),
    ("rating overflows", "1,2,3\n2,3,4\n3,4,1e400\n", 3, "not finite or out of range"),
    ("absurd rating", "1,2,3\n2,3,4\n3,4,-2e6\n", 3, "not finite or out of range"),
    ("empty rating", "1,2,3\n2,3,4\n3,4,\n", 3, "not a number"),
    ("empty id", "1,2,3\n2,3,4\n3,,5\n", 3, "an id is empty"),
    ("blank id", "1,2,3\n2,3,4\n3, ,5\n", 3, "an id is empty"),
    ("after a header and blank lines", "userId,movieId,rating\n\n1,2,3\n1,2,x\n", 4,
     "not a number"),
    ("two ratings in one field", "1,2,3\n2,3,4 5\n", 2, "not a number"),
    ("hex rating", "1,2,3\n2,3,0x10\n", 2, "not a number"),
]


@pytest.mark.parametrize("what, text, line, message", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_files_name_the_file_and_the_line(tmp_path, what, text, line, message):
    path = write(tmp_path / "r.csv", text)
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: ") + f".*({message})"):
        ratings_data.read_ratings(path)


@pytest.mark.parametrize("text, line", [
    (b"1,2,3\n2,3,4\n3,4,\xff\n", 3),           # in a rating
    (b"user,item,rating\n1,2,3\n\xe9t\xe9,4,5\n", 3),  # in a string id (Latin-1)
    (b"us\xe9r,item,rating\n1,2,3\n", 1),         # in the header
])
def test_text_that_is_not_utf8_names_the_line(tmp_path, text, line):
    path = write(tmp_path / "r.csv", text)
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: the line is not UTF-8")):
        ratings_data.read_ratings(path)


@pytest.mark.parametrize("text, message", [
    ("", "no ratings found"),
    ("\n  \n", "no ratings found"),
    ("user,item,rating\n", "no ratings found"),
    ("user|item|rating\n1|2|3\n", "cannot tell how the fields are separated"),
    ("a,b,c\n1,2,3\n", "not a number"),
])
def test_files_without_ratings(tmp_path, text, message):
    path = write(tmp_path / "r.csv", text)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        ratings_data.read_ratings(path)


@pytest.mark.parametrize("columns, message", [
    ("userId,movieId", "three names"),
    ("a,b,c,d", "three names"),
    ("user,,rating", "three names"),
    ("userId,filmId,rating", "no item column"),
])
def test_bad_columns(tmp_path, columns, message):
    path = write(tmp_path / "r.csv", "userId,movieId,rating\n1,2,3\n")
    with pytest.raises(ValueError, match=message):
        ratings_data.read_ratings(path, columns=columns)


def test_column_names_on_a_file_without_header(tmp_path):
    path = write(tmp_path / "u.data", "1\t2\t3\n")
    with pytest.raises(ValueError, match="no header line"):
        ratings_data.read_ratings(path, columns="userId,movieId,rating")


# ---------------------------------------------------------------- MovieLens 100k

def test_missing_dataset_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps recbole==1.2.1")):
        ratings_data.load_ratings("ml-100k")


def test_missing_file_is_named():
    with pytest.raises(FileNotFoundError, match="nothing.csv: no such file"):
        ratings_data.load_ratings("nothing.csv")


@needs_recbole
def test_movielens_100k_from_recbole_without_importing_it():
    import sys

    loaded = ratings_data.load_ratings("ml-100k")
    assert "recbole" not in sys.modules  # located, not imported (it would import torch)
    assert (len(loaded), loaded.num_users, loaded.num_items) == (100_000, 943, 1682)
    assert sorted(np.unique(loaded.ratings).tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert float(loaded.ratings.mean()) == pytest.approx(3.52986, abs=1e-5)
    assert np.bincount(loaded.users).min() >= 20  # every ML-100k user rated 20 movies or more
