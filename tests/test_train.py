"""The main job: ``fastemb.train`` (data, rating models, training loop) and ``python -m fastemb
train`` (the command line: options, data files, checkpoints, the torch comparison).

Everything runs on small data sets so that the whole file takes a few seconds on 2 cores. A user
error on the command line must end in a clean exit (SystemExit with a message), never in an
uncaught exception (which would print a traceback).
"""

import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from reference import assert_same_bits

import fastemb
from fastemb import data as ratings_data
from fastemb import train as training
from fastemb.__main__ import DEFAULT_LR, TABLE_CHOICES, build_parser, main

TINY = ["train", "--users", "500", "--items", "300", "--ratings", "20000", "--dim", "8",
        "--quiet", "--threads", "1"]
MEAN_LINE = re.compile(r"held-out RMSE of predicting the mean: (\S+)$", re.M)
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+): train RMSE (\S+), held-out RMSE (\S+) "
                        r"\(mean predictor (\S+)\)", re.M)


# ---------------------------------------------------------------- helpers

def run_cli(args, capsys):
    """Run ``python -m fastemb ARGS`` in-process; returns its stdout. It must succeed."""
    rc = main([str(a) for a in args])
    out, _ = capsys.readouterr()
    assert rc == 0, out
    return out


def cli_error(args, capsys):
    """Run the command, which must refuse cleanly: SystemExit with a non-zero code (argparse's
    usage error, or ``raise SystemExit(message)``). Returns the message (stderr + exit text)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        out, err = capsys.readouterr()
        assert exit_.code not in (0, None), f"exited with success for {args}: {out}"
        return err + (exit_.code if isinstance(exit_.code, str) else "")
    except Exception as error:  # noqa: BLE001 - any other exception is a traceback for the user
        pytest.fail(f"`python -m fastemb {' '.join(map(str, args))}` ends in a traceback "
                    f"({type(error).__name__}: {error}) instead of a clean error message")
    pytest.fail(f"`python -m fastemb {' '.join(map(str, args))}` was accepted")


def parse_run(out):
    """(mean predictor RMSE from the header, [(epoch, epochs, train, held-out, mean), ...])."""
    means = MEAN_LINE.findall(out)
    assert len(means) == 1, out
    epochs = [(int(e), int(n), float(a), float(b), float(c))
              for e, n, a, b, c in EPOCH_LINE.findall(out)]
    return float(means[0]), epochs


def mean_rmse(data, holdout=0.1, seed=0):
    train, test = data.split(holdout, seed)
    return float(np.sqrt(np.mean((test.ratings.astype(np.float64)
                                  - float(train.ratings.mean())) ** 2)))


def build_model(data, kind, dim, seed=0, holdout=0.1, y_range=None, dtype="float32"):
    train, test = data.split(holdout, seed)
    bags = training.UserBags(train, seed) if kind == "bag" else None
    model = training.RatingModel(data.num_users, data.num_items, dim, seed,
                                 float(train.ratings.mean()), kind=kind, bags=bags,
                                 y_range=y_range, dtype=TABLE_CHOICES[dtype][0],
                                 split=TABLE_CHOICES[dtype][1])
    return model, train, test


def load_tables(path):
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def write(path, text):
    path.write_text(text, encoding="utf-8", newline="")
    return path


def assert_ids_remapped(ratings, user_ids, item_ids, values):
    """``ratings`` holds the k-th line's (user, item, rating) as rows: one row per distinct id,
    the same row for the same id, rows exactly 0..n-1."""
    assert ratings.users.dtype == np.int64 and ratings.items.dtype == np.int64
    assert ratings.ratings.dtype == np.float32
    assert len(ratings) == len(values)
    np.testing.assert_array_equal(ratings.ratings, np.array(values, dtype=np.float32))
    for rows, ids, count in ((ratings.users, user_ids, ratings.num_users),
                             (ratings.items, item_ids, ratings.num_items)):
        assert count == len(set(ids))
        assert sorted(set(rows.tolist())) == list(range(count))
        mapping = {}
        for row, name in zip(rows.tolist(), ids):
            assert mapping.setdefault(name, row) == row, f"id {name!r} got two rows"
        assert len(set(mapping.values())) == len(mapping), "two ids share a row"


@pytest.fixture(scope="module")
def ratings60k():
    return ratings_data.synthetic_ratings(2000, 1000, 60_000, seed=0)


# ---------------------------------------------------------------- synthetic data and the split

def test_synthetic_ratings_are_deterministic_in_seed():
    a = ratings_data.synthetic_ratings(300, 200, 5000, seed=7)
    b = ratings_data.synthetic_ratings(300, 200, 5000, seed=7)
    c = ratings_data.synthetic_ratings(300, 200, 5000, seed=8)
    for name in ("users", "items", "ratings"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not (np.array_equal(a.users, c.users) and np.array_equal(a.items, c.items)
                and np.array_equal(a.ratings, c.ratings))


def test_synthetic_ratings_shape_and_values(ratings60k):
    data = ratings60k
    assert len(data) == 60_000 and (data.num_users, data.num_items) == (2000, 1000)
    assert data.users.dtype == np.int64 and data.items.dtype == np.int64
    assert data.ratings.dtype == np.float32
    assert 0 <= data.users.min() and data.users.max() < 2000
    assert 0 <= data.items.min() and data.items.max() < 1000
    np.testing.assert_array_equal(data.ratings, np.rint(data.ratings))
    assert set(np.unique(data.ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    # not degenerate: no single rating value dominates
    assert np.bincount(data.ratings.astype(np.int64)).max() < 0.6 * len(data)


def test_synthetic_popularity_is_skewed(ratings60k):
    data = ratings60k
    item_counts = np.sort(np.bincount(data.items, minlength=data.num_items))[::-1]
    top_share = item_counts[: data.num_items // 100].sum() / len(data)
    assert top_share >= 0.25, f"top 1% of items get only {top_share:.1%} of the ratings"
    user_counts = np.sort(np.bincount(data.users, minlength=data.num_users))[::-1]
    assert user_counts[: data.num_users // 100].sum() / len(data) >= 0.04  # uniform: 1%


def test_split_is_a_deterministic_partition(ratings60k):
    train, test = ratings60k.split(0.1, seed=0)
    assert (len(train), len(test)) == (54_000, 6_000)
    pairs = Counter(zip(ratings60k.users.tolist(), ratings60k.items.tolist(),
                        ratings60k.ratings.tolist()))
    parts = Counter(zip(train.users.tolist(), train.items.tolist(), train.ratings.tolist()))
    parts.update(zip(test.users.tolist(), test.items.tolist(), test.ratings.tolist()))
    assert parts == pairs
    again, _ = ratings60k.split(0.1, seed=0)
    other, _ = ratings60k.split(0.1, seed=1)
    np.testing.assert_array_equal(again.users, train.users)
    assert not np.array_equal(other.users, train.users)


# ---------------------------------------------------------------- the training loop

def test_batches_partition_each_epoch_and_reshuffle_between_epochs():
    first = training.batches(1000, 300, seed=4, epoch=0)
    assert [b.size for b in first] == [300, 300, 300, 100]
    np.testing.assert_array_equal(np.sort(np.concatenate(first)), np.arange(1000))
    again = training.batches(1000, 300, seed=4, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    second = training.batches(1000, 300, seed=4, epoch=1)
    other_seed = training.batches(1000, 300, seed=5, epoch=0)
    np.testing.assert_array_equal(np.sort(np.concatenate(second)), np.arange(1000))
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other_seed))


@pytest.mark.parametrize("kind, optimizer", [
    ("dot", "lazyadam"), ("dot", "adagrad"), ("dot", "rowwise-adagrad"),
    ("bag", "lazyadam"), ("bag", "adagrad"),
])
def test_training_beats_the_mean_predictor(ratings60k, kind, optimizer):
    model, train, test = build_model(ratings60k, kind, dim=16)
    opt = training.make_optimizer(optimizer, model.modules, DEFAULT_LR[optimizer])
    baseline = mean_rmse(ratings60k)
    history = []
    for epoch in range(3):
        train_rmse, seconds = training.train_epoch(model, opt, train, 1024, 0, epoch)
        assert np.isfinite(train_rmse) and seconds >= 0
        history.append(training.rmse(model, test))
    assert history[-1] <= 0.90 * baseline, (history, baseline)
    assert history[-1] < history[0], history


def test_sgd_at_its_default_lr_does_not_diverge(capsys):
    """`--optimizer sgd` with the command's default learning rate must train, not blow up."""
    out = run_cli(["train", "--users", "2000", "--items", "1000", "--ratings", "60000",
                   "--epochs", "3", "--optimizer", "sgd", "--quiet", "--threads", "1"], capsys)
    baseline, epochs = parse_run(out)
    final = epochs[-1][3]
    assert np.isfinite(final), f"sgd at lr {DEFAULT_LR['sgd']} diverged:\n{out}"
    assert final < baseline, out


@pytest.mark.parametrize("y_range", [None, (0.0, 5.5)])
@pytest.mark.parametrize("kind", ["dot", "bag"])
def test_train_step_is_one_sgd_step_on_the_squared_error(kind, y_range):
    """Check the model's hand-written backward against a float64 NumPy derivation."""
    data = ratings_data.synthetic_ratings(40, 30, 600, seed=5)
    model, train, _ = build_model(data, kind, dim=3, seed=2, y_range=y_range)
    for module in model.modules:  # make the weights large enough to matter
        module.weight *= 30
    before = [m.weight.astype(np.float64) for m in model.modules]
    users = np.array([0, 3, 3, 7, 1, 0, 39])
    items = np.array([2, 2, 5, 0, 29, 2, 4])
    ratings = np.array([5, 1, 3, 4, 2, 5, 1], dtype=np.float32)
    lr = 0.5
    opt = fastemb.optim.SGD(model.modules, lr=lr)
    U, V, bu, bi = before
    if kind == "dot":
        user_vectors = U[users]
    else:
        indices, offsets, weights = model.bags.batch(users)
        bounds = np.append(offsets, indices.size)
        user_vectors = np.zeros((users.size, 3))
        for b in range(users.size):
            w = weights[bounds[b]:bounds[b + 1]].astype(np.float64)
            if w.sum() != 0:
                user_vectors[b] = w @ U[indices[bounds[b]:bounds[b + 1]]] / w.sum()
    score = (float(model.offset) + np.sum(user_vectors * V[items], axis=1)
             + bu[users, 0] + bi[items, 0])
    if y_range is None:
        prediction, slope = score, 1.0
    else:
        low, high = y_range
        squashed = 1 / (1 + np.exp(-score))
        prediction = low + (high - low) * squashed
        slope = (high - low) * squashed * (1 - squashed)
    error = prediction - ratings
    d = 2.0 / users.size * error * slope
    gU, gV, gbu, gbi = (np.zeros_like(x) for x in before)
    if kind == "dot":
        np.add.at(gU, users, d[:, None] * V[items])
    else:
        for b in range(users.size):
            w = weights[bounds[b]:bounds[b + 1]].astype(np.float64)
            if w.sum() != 0:
                np.add.at(gU, indices[bounds[b]:bounds[b + 1]],
                          (w / w.sum())[:, None] * (d[b] * V[items[b]])[None, :])
    np.add.at(gV, items, d[:, None] * user_vectors)
    np.add.at(gbu, users, d[:, None])
    np.add.at(gbi, items, d[:, None])

    sse = model.train_step(users, items, ratings, opt)

    assert sse == pytest.approx(float(error @ error), rel=1e-5)
    for module, old, grad in zip(model.modules, before, (gU, gV, gbu, gbi)):
        np.testing.assert_allclose(module.weight, old - lr * grad, rtol=1e-5, atol=1e-4)


def test_user_bags_hold_each_users_training_ratings(ratings60k):
    train, _ = ratings60k.split(0.1, seed=0)
    # one more user, who has no training ratings: an empty bag
    train = ratings_data.Ratings(train.users, train.items, train.ratings, train.num_users + 1,
                             train.num_items)
    bags = training.UserBags(train, seed=0)
    counts = np.bincount(train.users, minlength=train.num_users)
    busy = int(np.argmax(counts))
    assert counts[busy] > training.MAX_BAG_ITEMS  # the cap is exercised
    idle = np.flatnonzero(counts == 0)
    assert idle.size > 0                          # so is the empty bag
    users = np.array([busy, idle[0], 5, busy, 17])
    indices, offsets, weights = bags.batch(users)
    bounds = np.append(offsets, indices.size)
    for b, user in enumerate(users):
        got = Counter(zip(indices[bounds[b]:bounds[b + 1]].tolist(),
                          weights[bounds[b]:bounds[b + 1]].tolist()))
        mine = train.users == user
        have = Counter(zip(train.items[mine].tolist(), train.ratings[mine].tolist()))
        assert sum(got.values()) == min(counts[user], training.MAX_BAG_ITEMS)
        assert not got - have, f"user {user}'s bag holds ratings they did not give"


# ---------------------------------------------------------------- read_ratings

@pytest.mark.parametrize("with_timestamp", [True, False])
def test_read_movielens_u_data(tmp_path, with_timestamp):
    lines = [("196", "242", 3), ("186", "302", 3), ("22", "377", 1), ("196", "51", 2),
             ("7", "242", 5)]
    text = "".join(f"{u}\t{i}\t{r}" + ("\t881250949" if with_timestamp else "") + "\n"
                   for u, i, r in lines)
    data = ratings_data.read_ratings(write(tmp_path / "u.data", text))
    assert_ids_remapped(data, [u for u, _, _ in lines], [i for _, i, _ in lines],
                        [r for _, _, r in lines])


def test_read_csv_with_header_in_another_order_and_string_ids(tmp_path):
    rows = [("alice", "m-10", 4.5), ("bob", "m-3", 2), ("alice", "m-3", 1),
            ("zoe", "m-999", 5), ("bob", "m-10", 3.5)]
    text = "rating,timestamp,item,user\r\n" + "".join(
        f"{r},12345,{i},{u}\r\n" for u, i, r in rows)
    data = ratings_data.read_ratings(write(tmp_path / "ratings.csv", text))
    assert_ids_remapped(data, [u for u, _, _ in rows], [i for _, i, _ in rows],
                        [r for _, _, r in rows])
    assert (data.num_users, data.num_items) == (3, 3)


def test_read_csv_with_a_byte_order_mark(tmp_path):
    """Spreadsheet programs write UTF-8 CSVs with a BOM; the header still names the columns."""
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfuser,item,rating\n1,2,3\n4,2,5\n")
    data = ratings_data.read_ratings(path)
    assert (len(data), data.num_users, data.num_items) == (2, 2, 1)


@pytest.mark.parametrize("name, text", [
    ("u.data", "1\t2\t3\t0\n2\t3\t4\t0\n3\t4\n4\t5\t1\t0\n"),           # too few fields
    ("u.data", "1\t2\t3\t0\n2\t3\t4\t0\n3\t4\tfive\t0\n"),              # rating not a number
    ("u.data", "1\t2\t3\t0\n2\t3\t4\t0\n3\t4\tnan\t0\n"),               # rating not finite
    ("u.data", "1\t2\t3\n\n3,4,5\n"),                                    # wrong separator, after a blank line
    ("r.csv", "user,item,rating\n1,2,3\n1,3\n"),                        # CSV row too short
    ("r.csv", "item,user,rating\n1,2,3\n1,3,x\n"),                      # CSV rating not a number
])
def test_read_malformed_line_names_file_and_line(tmp_path, name, text):
    path = write(tmp_path / name, text)
    with pytest.raises(ValueError, match=re.escape(f"{path}:3:")):
        ratings_data.read_ratings(path)


def test_read_csv_header_lacking_a_column(tmp_path):
    path = write(tmp_path / "r.csv", "user,item,grade\n1,2,3\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1:") + ".*rating"):
        ratings_data.read_ratings(path)
    path = write(tmp_path / "s.csv", "item,rating,customer\n1,2,3\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1")):
        ratings_data.read_ratings(path)


def test_read_empty_file(tmp_path):
    path = write(tmp_path / "empty.csv", "\n\n")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        ratings_data.read_ratings(path)


# ---------------------------------------------------------------- the command line

def test_help_documents_every_command_and_option():
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastemb.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    top = subprocess.run([sys.executable, "-m", "fastemb", "--help"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert top.returncode == 0, top.stderr
    for command in ("train", "config"):
        assert re.search(rf"^\s+{command}\s+\S", top.stdout, re.M), top.stdout
    result = subprocess.run([sys.executable, "-m", "fastemb", "train", "--help"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    subparsers = next(a for a in build_parser()._actions if a.choices and "train" in a.choices)
    options = [a for a in subparsers.choices["train"]._actions if a.option_strings]
    assert {"--data", "--model", "--epochs", "--dim", "--batch-size", "--optimizer", "--lr",
            "--threads", "--seed", "--holdout", "--save", "--resume", "--compare-torch",
            "--quiet", "--users", "--items", "--ratings"} <= {a.option_strings[0] for a in options}
    for action in options:
        assert action.help, f"{action.option_strings} has no help"
        for option in action.option_strings:
            assert re.search(rf"(^|[\s\[,]){re.escape(option)}\b", result.stdout, re.M), option
        # the help text shows up in the output (argparse rewraps it)
        assert " ".join(action.help.split())[:30] in help_text, action.option_strings
    for name, lr in DEFAULT_LR.items():
        assert f"{name} {lr}" in help_text


def test_tiny_run_prints_each_epochs_rmse_and_the_mean_predictor(capsys, tmp_path):
    out = run_cli(TINY + ["--epochs", "2", "--save", tmp_path / "a.npz"], capsys)
    assert "20,000 ratings, 500 users, 300 items; 18,000 to train, 2,000 held out" in out
    baseline, epochs = parse_run(out)
    data = ratings_data.synthetic_ratings(500, 300, 20000, seed=0)
    assert baseline == pytest.approx(mean_rmse(data), abs=1e-4)
    assert [(e, n) for e, n, *_ in epochs] == [(1, 2), (2, 2)]
    for _, _, train_rmse, held_out, mean in epochs:
        assert np.isfinite(train_rmse) and 0 < train_rmse < 3
        assert mean == baseline
    assert epochs[1][3] < epochs[0][3] < baseline
    # the printed held-out RMSE is that of the saved model (the best epoch's)
    model, _, test = build_model(data, "dot", dim=8, y_range=(0.0, 5.5))
    fastemb.load(tmp_path / "a.npz", model.modules)
    assert training.rmse(model, test) == pytest.approx(epochs[-1][3], abs=1e-4)


def test_runs_are_deterministic_and_thread_count_independent(capsys, tmp_path):
    run_cli(TINY + ["--epochs", "1", "--model", "bag", "--save", tmp_path / "one.npz"], capsys)
    args = TINY[:-1] + ["2", "--epochs", "1", "--model", "bag", "--save", tmp_path / "two.npz"]
    run_cli(args, capsys)
    one, two = load_tables(tmp_path / "one.npz"), load_tables(tmp_path / "two.npz")
    assert one.keys() == two.keys()
    for name in one:
        if name != "metadata":
            np.testing.assert_array_equal(one[name], two[name], err_msg=name)


@pytest.mark.parametrize("kind", ["udata", "csv"])
def test_data_file(capsys, tmp_path, kind):
    data = ratings_data.synthetic_ratings(60, 40, 800, seed=1)
    if kind == "udata":
        path = tmp_path / "u.data"
        text = "".join(f"{100 + 3 * u}\t{7 * i}\t{int(r)}\t881250949\n"
                       for u, i, r in zip(data.users, data.items, data.ratings))
    else:
        path = tmp_path / "ratings.csv"
        text = "item,rating,user\n" + "".join(
            f"film{i},{int(r)},u{u}\n" for u, i, r in zip(data.users, data.items, data.ratings))
    write(path, text)
    users, items = np.unique(data.users).size, np.unique(data.items).size
    out = run_cli(["train", "--data", path, "--epochs", "2", "--dim", "4", "--batch-size", "64",
                   "--quiet", "--threads", "1"], capsys)
    assert f"data: {path}: 800 ratings, {users} users, {items} items; 720 to train, 80 held out" \
        in out, out
    baseline, epochs = parse_run(out)
    assert len(epochs) == 2 and np.isfinite(baseline)
    assert all(np.isfinite(e[3]) for e in epochs)


@pytest.mark.parametrize("args, option", [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-2"], "--epochs"),
    (["--epochs", "two"], "--epochs"),
    (["--dim", "0"], "--dim"),
    (["--batch-size", "0"], "--batch-size"),
    (["--optimizer", "nope"], "--optimizer"),
    (["--model", "deep"], "--model"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--threads", "0"], "--threads"),
    (["--no-such-option"], "--no-such-option"),
])
def test_bad_options_are_usage_errors(capsys, args, option):
    message = cli_error(TINY + args, capsys)
    assert option in message, message


@pytest.mark.parametrize("holdout", ["-0.1", "1.0", "1.5"])
def test_bad_holdout_is_refused(capsys, holdout):
    message = cli_error(TINY + ["--epochs", "1", "--holdout", holdout], capsys)
    assert "holdout" in message, message


def test_negative_seed_is_not_a_traceback(capsys):
    message = cli_error(TINY + ["--epochs", "1", "--seed", "-1"], capsys)
    assert "seed" in message, message


def test_missing_data_file_is_a_clean_error(capsys, tmp_path):
    path = tmp_path / "missing-file.data"
    message = cli_error(["train", "--data", path, "--quiet"], capsys)
    assert str(path) in message, message


def test_malformed_data_file_is_a_clean_error(capsys, tmp_path):
    path = write(tmp_path / "bad.csv", "user,item,rating\n1,2,3\n1,3\n")
    message = cli_error(["train", "--data", path, "--quiet"], capsys)
    assert f"{path}:3" in message, message


def test_data_file_too_small_for_a_held_out_set(capsys, tmp_path):
    """5 ratings and --holdout 0.1 hold none out: refuse, or at least never report NaN."""
    path = write(tmp_path / "u.data", "a\tx\t4\nb\ty\t3\na\ty\t5\nc\tx\t2\nb\tx\t1\n")
    capsys.readouterr()
    try:
        rc = main(["train", "--data", str(path), "--epochs", "1", "--dim", "2", "--quiet",
                   "--threads", "1"])
    except SystemExit as exit_:
        assert exit_.code not in (0, None)
        return
    out, _ = capsys.readouterr()
    assert rc == 0 and "nan" not in out.lower(), out


# ---------------------------------------------------------------- save and resume

@pytest.mark.parametrize("model, optimizer", [("dot", "lazyadam"), ("bag", "rowwise-adagrad")])
def test_resume_continues_exactly_like_an_uninterrupted_run(capsys, tmp_path, model, optimizer):
    base = TINY + ["--model", model, "--optimizer", optimizer, "--batch-size", "2048"]
    a, b, c = (tmp_path / f"{name}.npz" for name in "abc")
    run_cli(base + ["--epochs", "2", "--save", a], capsys)
    resumed = run_cli(base + ["--epochs", "3", "--resume", a, "--save", b], capsys)
    straight = run_cli(base + ["--epochs", "3", "--save", c], capsys)
    assert f"resumed from {a} after epoch 2" in resumed
    _, resumed_epochs = parse_run(resumed)
    _, straight_epochs = parse_run(straight)
    assert [e[0] for e in resumed_epochs] == [3]
    assert resumed_epochs[0] == straight_epochs[-1]
    tables_b, tables_c = load_tables(b), load_tables(c)
    assert tables_b.keys() == tables_c.keys() and "table_0" in tables_b
    for name in tables_b:
        np.testing.assert_array_equal(tables_b[name], tables_c[name], err_msg=name)
    # and the 2-epoch checkpoint really differs from the 3-epoch one
    assert not np.array_equal(load_tables(a)["table_1"], tables_c["table_1"])
    assert fastemb.checkpoint.read_metadata(b)["epoch"] == 3


@pytest.mark.parametrize("dtype, rounding", [
    ("float16", []), ("float16", ["--stochastic-rounding"]),
    *(pytest.param(dtype, rounding, marks=pytest.mark.skipif(
        importlib.util.find_spec("ml_dtypes") is None, reason=f"{dtype} needs ml_dtypes"))
      for dtype, rounding in [("bfloat16", ["--stochastic-rounding"]), ("split", [])])])
def test_reduced_precision_tables_train_save_and_resume_exactly(capsys, tmp_path, dtype, rounding):
    """--dtype trains tables of that dtype (or split float32 ones; held-out RMSE below the
    mean predictor's), the checkpoint keeps them, and a resumed run equals an uninterrupted one
    bit for bit (the stochastic rounding's draws included)."""
    base = TINY + ["--model", "bag", "--dtype", dtype, *rounding]
    a, b, c = (tmp_path / f"{name}.npz" for name in "abc")
    out = run_cli(base + ["--epochs", "2", "--save", a], capsys)
    assert f"{dtype} tables" in out
    baseline, epochs = parse_run(out)
    assert epochs[-1][3] < baseline
    run_cli(base + ["--epochs", "3", "--resume", a, "--save", b], capsys)
    run_cli(base + ["--epochs", "3", "--save", c], capsys)
    data = ratings_data.synthetic_ratings(500, 300, 20000, seed=0)
    resumed, _, _ = build_model(data, "bag", dim=8, dtype=dtype)
    straight, _, _ = build_model(data, "bag", dim=8, dtype=dtype)
    fastemb.load(b, resumed.modules)
    fastemb.load(c, straight.modules)
    for resumed_module, straight_module in zip(resumed.modules, straight.modules):
        assert resumed_module.weight.dtype == TABLE_CHOICES[dtype][0]
        assert_same_bits(resumed_module.weight, straight_module.weight)
    message = cli_error(TINY + ["--model", "bag", "--epochs", "3", "--resume", a], capsys)
    assert "dtype" in message


def test_stochastic_rounding_of_float32_tables_is_refused(capsys):
    message = cli_error(TINY + ["--stochastic-rounding"], capsys)
    assert "16-bit" in message


def test_resume_with_different_options_is_refused(capsys, tmp_path):
    a = tmp_path / "a.npz"
    run_cli(TINY + ["--epochs", "1", "--save", a], capsys)
    saved = a.read_bytes()
    problems = []
    for changed, word in [(["--dim", "4"], "dim"), (["--optimizer", "sgd"], "optimizer"),
                          (["--model", "bag"], "model"), (["--seed", "1"], "seed"),
                          (["--users", "400"], "")]:
        try:
            message = cli_error(TINY + ["--epochs", "2", "--resume", a] + changed, capsys)
        except pytest.fail.Exception as failure:
            problems.append(f"{changed}: {failure}")
            continue
        if word not in message or str(a) not in message:
            problems.append(f"{changed}: unclear message {message!r}")
    assert a.read_bytes() == saved
    assert not problems, "\n".join(problems)


def test_resume_from_a_missing_checkpoint_is_a_clean_error(capsys, tmp_path):
    path = tmp_path / "nothing.npz"
    message = cli_error(TINY + ["--epochs", "2", "--resume", path], capsys)
    assert str(path) in message, message


# ---------------------------------------------------------------- the torch comparison

@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("optimizer, lr", [("lazyadam", 0.01), ("sgd", 1.0), ("adagrad", 0.1)])
@pytest.mark.parametrize("y_range, weight_decay", [(None, 0.0), ((0.0, 5.5), 0.05)])
def test_train_with_torch_matches_fastemb(optimizer, lr, y_range, weight_decay):
    pytest.importorskip("torch")
    data = ratings_data.synthetic_ratings(300, 200, 5000, seed=3)
    model, train, test = build_model(data, "dot", dim=6, y_range=y_range)
    initial = [m.weight.copy() for m in model.modules]
    opt = training.make_optimizer(optimizer, model.modules, lr, weight_decay)
    args = SimpleNamespace(threads=1, optimizer=optimizer, lr=lr, epochs=1, batch_size=256,
                           seed=0, y_range=y_range, weight_decay=weight_decay)
    training.train_epoch(model, opt, train, args.batch_size, args.seed, 0)
    seconds, torch_rmse, tables = training.train_with_torch(
        [w.copy() for w in initial], train, test, args, float(model.global_mean))
    assert len(seconds) == 1
    moved = max(float(np.max(np.abs(m.weight - w))) for m, w in zip(model.modules, initial))
    assert moved > 1e-3  # the comparison is not between two untrained models
    for module, theirs in zip(model.modules, tables):
        assert theirs.shape == module.weight.shape
        assert float(np.max(np.abs(module.weight - theirs))) < 1e-4
    assert torch_rmse == pytest.approx(training.rmse(model, test), abs=1e-4)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_cli_compare_torch(capsys):
    pytest.importorskip("torch")
    out = run_cli(TINY + ["--epochs", "2", "--batch-size", "1024", "--compare-torch"], capsys)
    timings = re.findall(r"^epoch (\d): fastemb (\S+) s, torch (\S+) s, fastemb is (\S+)x "
                         r"(faster|slower)$", out, re.M)
    assert [t[0] for t in timings] == ["1", "2"], out
    for _, ours, theirs, times, verdict in timings:  # "slower" where it is slower
        assert float(times) >= 1.0, out  # (the ratio is always the larger time over the other)
        if float(theirs) != float(ours):  # (times equal to the printed 0.01 s say nothing)
            assert verdict == ("faster" if float(theirs) > float(ours) else "slower"), out
    final = re.search(r"final held-out RMSE: fastemb (\S+), torch (\S+); "
                      r"largest weight difference (\S+)$", out, re.M)
    assert final, out
    ours, theirs, difference = (float(x) for x in final.groups())
    assert ours == pytest.approx(parse_run(out)[1][-1][3], abs=1e-4)
    assert abs(ours - theirs) <= 2e-4 and difference < 1e-4, out


def test_cli_compare_torch_without_threads_option(capsys):
    """--threads is optional; --compare-torch must work with the default thread count."""
    pytest.importorskip("torch")
    import torch

    torch_threads = torch.get_num_threads()
    try:
        args = [a for a in TINY if a not in ("--threads", "1")]
        out = run_cli(args + ["--epochs", "1", "--compare-torch"], capsys)
    finally:
        torch.set_num_threads(torch_threads)
    assert "final held-out RMSE: fastemb" in out


@pytest.mark.parametrize("args", [["--model", "bag"], ["--optimizer", "rowwise-adagrad"]])
def test_compare_torch_refuses_what_torch_cannot_train(capsys, args):
    message = cli_error(TINY + ["--compare-torch"] + args, capsys)
    assert "--compare-torch" in message and "dot" in message, message


# ---------------------------------------------------------------- MovieLens 100k, the main job

BEST_LINE = re.compile(r"^best: epoch (\d+), held-out RMSE (\S+) \(mean predictor (\S+)\); "
                       r"(\d+) epoch\(s\) of training took (\S+) s$", re.M)


@pytest.mark.skipif(importlib.util.find_spec("recbole") is None,
                    reason="recbole is not installed (pip install --no-deps recbole==1.2.1)")
def test_movielens_100k_beats_the_mean_and_keeps_the_best_epoch(capsys, tmp_path):
    best_path = tmp_path / "best.npz"
    out = run_cli(["train", "--data", "ml-100k", "--epochs", "12", "--quiet", "--threads", "1",
                   "--save", best_path], capsys)
    baseline, epochs = parse_run(out)
    best = BEST_LINE.search(out)
    assert best, out
    best_epoch, best_rmse = int(best.group(1)), float(best.group(2))
    held_out = [e[3] for e in epochs]
    assert len(held_out) == 12 and best_rmse == min(held_out)
    assert held_out[best_epoch - 1] == best_rmse
    assert best_rmse <= 0.90 < baseline, out  # the fastai book's model reaches about 0.906
    assert held_out[-1] <= best_rmse + 0.01, out  # weight decay: more epochs do little harm
    # the checkpoint holds the best epoch
    assert fastemb.checkpoint.read_metadata(best_path)["epoch"] == best_epoch
    data = ratings_data.load_ratings("ml-100k")
    model, _, test = build_model(data, "dot", dim=32,
                                 y_range=training.default_y_range(data.ratings))
    fastemb.load(best_path, model.modules)
    assert training.rmse(model, test) == pytest.approx(best_rmse, abs=1e-4)


# ---------------------------------------------------------------- friendly failures

def test_save_to_a_path_that_cannot_be_written_is_refused_before_training(capsys, tmp_path):
    for path in (tmp_path / "no-such-folder" / "model.npz", tmp_path):
        message = cli_error(TINY + ["--save", path], capsys)
        assert str(path) in message and "\n" not in message.strip(), message
    (tmp_path / "file").write_text("x")
    message = cli_error(TINY + ["--save", tmp_path / "file" / "model.npz"], capsys)
    assert str(tmp_path / "file" / "model.npz") in message


def test_tables_that_do_not_fit_are_refused_before_allocating(capsys):
    message = cli_error(["train", "--users", str(10**12), "--items", "10", "--ratings", "10",
                         "--quiet"], capsys)
    assert re.search(r"need [\d,.]+ GB, but only [\d,.]+ GB of memory is available", message), \
        message


def test_threads_above_the_cores_warn(capsys):
    main(TINY[:-1] + [str((os.cpu_count() or 1) + 1), "--epochs", "1"])
    _, err = capsys.readouterr()
    assert "warning: --threads" in err and "cores" in err


@pytest.mark.parametrize("text, line", [("1,2,3\n1,3,1e30\n", 2), ("1,2,3\n\n1,3,nan\n", 3),
                                        (b"1,2,3\n2,3,\xe9\n", 2)])
def test_bad_ratings_in_a_file_are_one_line_errors(capsys, tmp_path, text, line):
    path = tmp_path / "r.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    message = cli_error(["train", "--data", path, "--quiet"], capsys)
    assert f"{path}:{line}:" in message and len(message.strip().splitlines()) == 1, message


def test_rating_mean_outside_the_output_range_is_refused(capsys):
    message = cli_error(TINY + ["--y-range", "4.5", "6"], capsys)
    assert "--y-range" in message, message


@pytest.mark.parametrize("model", ["dot", "bag"])
def test_sharded_tables_train_as_one_process_does_and_resume_exactly(capsys, tmp_path, model):
    """--shards N: every table on N in-process shards; the epochs' RMSEs equal the unsharded
    run's, and a resumed sharded run equals an uninterrupted one."""
    def rmses(out):  # (epoch, train RMSE, held-out RMSE) of each epoch
        return [(epoch, train, held_out) for epoch, _, train, held_out, _ in parse_run(out)[1]]

    base = TINY + ["--model", model]
    plain = rmses(run_cli(base + ["--epochs", "3"], capsys))
    a = tmp_path / "a.npz"
    sharded_out = run_cli(base + ["--epochs", "2", "--shards", "3", "--save", a], capsys)
    assert "every table on 3 local shards" in sharded_out
    assert rmses(sharded_out) == plain[:2]
    resumed = run_cli(base + ["--epochs", "3", "--shards", "3", "--resume", a], capsys)
    assert rmses(resumed) == plain[2:]
    message = cli_error(base + ["--epochs", "3", "--shards", "2", "--resume", a], capsys)
    assert "shards" in message


@pytest.mark.parametrize("args", [["--dtype", "float16"], ["--compare-torch"]])
def test_shards_refuse_what_they_cannot_train(capsys, args):
    message = cli_error(TINY + ["--shards", "2", *args], capsys)
    assert "--shards trains float32 tables" in message
