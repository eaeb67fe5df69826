"""Checkpoints: fastemb.save / fastemb.load of tables and optimizer state.

Round trips continue training bit for bit; every mismatch or unreadable file is a ValueError
that changes nothing; an interrupted save leaves the previous checkpoint in place.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import fastemb

from reference_training import assert_bitwise

OPTIMIZERS = {
    "sgd": lambda m: fastemb.optim.SGD(m, lr=0.3),
    "adagrad": lambda m: fastemb.optim.Adagrad(m, lr=0.2, lr_decay=0.05,
                                               initial_accumulator_value=0.1),
    "rowwise": lambda m: fastemb.optim.RowWiseAdagrad(m, lr=0.2),
    "adam": lambda m: fastemb.optim.LazyAdam(m, lr=0.05, betas=(0.8, 0.99), maximize=True),
}


def make_modules(seed=0):
    return [fastemb.Embedding(30, 4, padding_idx=0, seed=seed),
            fastemb.EmbeddingBag(20, 3, mode="mean", dtype=np.float64, seed=seed + 1)]


def train(modules, opt, seed, steps=3):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        emb, bag = modules
        emb(rng.integers(0, 30, (3, 4)))
        emb.backward(rng.standard_normal((3, 4, 4)).astype(np.float32))
        bag(rng.integers(0, 20, 9), offsets=[0, 4, 4], per_sample_weights=rng.uniform(0, 1, 9))
        bag.backward(rng.standard_normal((3, 3)))
        opt.step()
        opt.zero_grad()


def snapshot(modules, opt=None):
    weights = [m.weight.copy() for m in modules]
    if opt is None:
        return weights, None
    state = [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in opt.state[m].items()}
             for m in opt.modules]
    return weights, (state, dict(opt.hyperparameters))


def assert_same(a, b):
    (wa, sa), (wb, sb) = a, b
    for x, y in zip(wa, wb, strict=True):
        assert_bitwise(x, y, "weight")
    assert (sa is None) == (sb is None)
    if sa is not None:
        (state_a, hyper_a), (state_b, hyper_b) = sa, sb
        assert hyper_a == hyper_b
        for x, y in zip(state_a, state_b, strict=True):
            assert x.keys() == y.keys()
            for key in x:
                if isinstance(x[key], np.ndarray):
                    assert_bitwise(x[key], y[key], key)
                else:
                    assert x[key] == y[key], key


def leftovers(directory, keep):
    return sorted(set(os.listdir(directory)) - set(keep))


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_round_trip_continues_identically(name, tmp_path):
    path = tmp_path / "model.npz"
    modules = make_modules()
    opt = OPTIMIZERS[name](modules)
    train(modules, opt, seed=1)
    fastemb.save(path, modules, opt)
    assert leftovers(tmp_path, ["model.npz"]) == []
    train(modules, opt, seed=2)

    restored = make_modules(seed=10)  # different initial weights
    restored_opt = OPTIMIZERS[name](restored)
    train(restored, restored_opt, seed=3, steps=1)  # different state, different step count
    result = fastemb.load(path, restored, restored_opt)
    assert result is restored
    train(restored, restored_opt, seed=2)
    assert_same(snapshot(restored, restored_opt), snapshot(modules, opt))


def test_round_trip_restores_hyperparameters_and_steps(tmp_path):
    path = str(tmp_path / "ckpt")  # no extension: used as given
    modules = make_modules()
    opt = fastemb.optim.LazyAdam(modules, lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    train(modules, opt, seed=1, steps=4)
    fastemb.save(path, modules, opt)
    assert os.listdir(tmp_path) == ["ckpt"]
    other = make_modules(seed=5)
    other_opt = fastemb.optim.LazyAdam(other, lr=0.5)
    fastemb.load(path, other, other_opt)
    assert other_opt.hyperparameters["lr"] == 0.05
    assert tuple(other_opt.hyperparameters["betas"]) == (0.8, 0.99)
    assert [other_opt.state[m]["step"] for m in other] == [4, 4]
    assert_same(snapshot(other, other_opt), snapshot(modules, opt))


def test_tables_only_and_single_module(tmp_path):
    path = tmp_path / "t.npz"
    m = fastemb.Embedding(7, 3, seed=0)
    fastemb.save(path, m)
    other = fastemb.Embedding(7, 3, seed=1)
    weight = other.weight
    assert fastemb.load(path, other) is other
    assert other.weight is weight  # loaded in place
    assert_bitwise(other.weight, m.weight)


def test_save_overwrites_an_existing_checkpoint(tmp_path):
    path = tmp_path / "m.npz"
    m = fastemb.Embedding(5, 2, seed=0)
    fastemb.save(path, m)
    m.weight[...] = 7
    fastemb.save(path, m)
    other = fastemb.Embedding(5, 2, seed=1)
    fastemb.load(path, other)
    assert (other.weight == 7).all()
    assert leftovers(tmp_path, ["m.npz"]) == []


# --------------------------------------------------------------------------------------------
# Mismatches: ValueError, nothing changed
# --------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of two modules trained with LazyAdam; returns its path."""
    modules = make_modules()
    opt = fastemb.optim.LazyAdam(modules, lr=0.05)
    train(modules, opt, seed=1)
    path = tmp_path / "good.npz"
    fastemb.save(path, modules, opt)
    return path


def _targets():
    modules = make_modules(seed=20)
    opt = fastemb.optim.LazyAdam(modules, lr=0.01)
    train(modules, opt, seed=9, steps=2)
    return modules, opt


MISMATCHES = {
    "table shape": lambda: [fastemb.Embedding(31, 4, seed=0),
                            fastemb.EmbeddingBag(20, 3, dtype=np.float64, seed=0)],
    "table dim": lambda: [fastemb.Embedding(30, 5, seed=0),
                          fastemb.EmbeddingBag(20, 3, dtype=np.float64, seed=0)],
    "table dtype": lambda: [fastemb.Embedding(30, 4, seed=0),
                            fastemb.EmbeddingBag(20, 3, dtype=np.float32, seed=0)],
    "too few modules": lambda: [fastemb.Embedding(30, 4, seed=0)],
    "too many modules": lambda: make_modules() + [fastemb.Embedding(2, 2, seed=0)],
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
@pytest.mark.parametrize("with_optimizer", [False, True])
def test_mismatched_modules_raise_and_change_nothing(saved, case, with_optimizer):
    modules = MISMATCHES[case]()
    opt = fastemb.optim.LazyAdam(modules, lr=0.01) if with_optimizer else None
    if opt is not None:
        train_any(modules, opt)
    before = snapshot(modules, opt)
    with pytest.raises(ValueError):
        fastemb.load(saved, modules, opt)
    assert_same(before, snapshot(modules, opt))


def train_any(modules, opt):
    rng = np.random.default_rng(0)
    for m in modules:
        if isinstance(m, fastemb.EmbeddingBag):
            m(rng.integers(0, m.num_embeddings, (2, 2)))
            m.backward(np.ones((2, m.embedding_dim), m.weight.dtype))
        else:
            m(rng.integers(0, m.num_embeddings, 3))
            m.backward(np.ones((3, m.embedding_dim), m.weight.dtype))
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("other", ["sgd", "adagrad", "rowwise"])
def test_wrong_optimizer_class_raises_and_changes_nothing(saved, other):
    modules = make_modules(seed=20)
    opt = OPTIMIZERS[other](modules)
    train(modules, opt, seed=9, steps=2)
    before = snapshot(modules, opt)
    with pytest.raises(ValueError):
        fastemb.load(saved, modules, opt)
    assert_same(before, snapshot(modules, opt))


def test_optimizer_over_other_module_count_raises(saved):
    modules = make_modules(seed=20)
    opt = fastemb.optim.LazyAdam(modules[:1], lr=0.01)
    before = snapshot(modules, opt)
    with pytest.raises(ValueError):
        fastemb.load(saved, modules, opt)
    assert_same(before, snapshot(modules, opt))


def test_optimizer_requested_but_not_saved(tmp_path):
    path = tmp_path / "tables.npz"
    fastemb.save(path, make_modules())
    modules, opt = _targets()
    before = snapshot(modules, opt)
    with pytest.raises(ValueError):
        fastemb.load(path, modules, opt)
    assert_same(before, snapshot(modules, opt))
    fastemb.load(path, modules)  # the tables alone load fine


def test_read_only_weight_raises_and_changes_nothing(saved):
    modules = make_modules(seed=20)
    modules[1].weight.flags.writeable = False
    before = snapshot(modules)
    with pytest.raises(ValueError):
        fastemb.load(saved, modules)
    assert_same(before, snapshot(modules))


# --------------------------------------------------------------------------------------------
# Unreadable files
# --------------------------------------------------------------------------------------------


def _write(path, data):
    with open(path, "wb") as file:
        file.write(data)
    return path


def _bad_files(saved, directory):
    good = saved.read_bytes()
    files = {
        "empty": _write(directory / "empty.npz", b""),
        "garbage": _write(directory / "garbage.npz",
                          np.random.default_rng(0).bytes(5000)),
        "text": _write(directory / "text.npz", b"hello, I am not a checkpoint\n" * 10),
    }
    for cut in (10, 200, len(good) // 2, len(good) - 30, len(good) - 1):
        files[f"truncated at {cut}"] = _write(directory / f"cut{cut}.npz", good[:cut])
    np.savez(directory / "plain.npz", table_0=np.zeros((30, 4), np.float32),
             table_1=np.zeros((20, 3)))
    files["plain npz"] = directory / "plain.npz"
    np.save(directory / "array.npy", np.zeros((30, 4), np.float32))
    files["npy file"] = directory / "array.npy"
    for name, metadata in {
        "foreign metadata": {"format": "something-else", "version": 1},
        "metadata not a dict": [1, 2, 3],
        "future version": {"format": "fastemb-checkpoint", "version": 99, "num_tables": 2,
                           "optimizer": None, "user": {}},
    }.items():
        path = directory / f"{name.replace(' ', '_')}.npz"
        np.savez(path, table_0=np.zeros((30, 4), np.float32), table_1=np.zeros((20, 3)),
                 metadata=np.array(json.dumps(metadata)))
        files[name] = path
    path = directory / "bad_json.npz"
    np.savez(path, table_0=np.zeros((30, 4), np.float32), metadata=np.array("{not json"))
    files["bad json"] = path
    return files


BAD_FILE_CASES = ["empty", "garbage", "text", "truncated at 10", "truncated at 200",
                  "plain npz", "npy file", "foreign metadata", "metadata not a dict",
                  "future version", "bad json"]


@pytest.mark.parametrize("case", BAD_FILE_CASES + ["truncated half", "truncated end"])
def test_unreadable_files_raise_value_error_and_change_nothing(saved, tmp_path, case):
    files = _bad_files(saved, tmp_path)
    good = saved.read_bytes()
    if case == "truncated half":
        case = f"truncated at {len(good) // 2}"
    elif case == "truncated end":
        case = f"truncated at {len(good) - 30}"
    modules, opt = _targets()
    before = snapshot(modules, opt)
    with pytest.raises(ValueError):
        fastemb.load(files[case], modules, opt)
    with pytest.raises(ValueError):
        fastemb.load(files[case], modules)
    assert_same(before, snapshot(modules, opt))


def _header(saved):
    with np.load(saved) as archive:
        return json.loads(str(archive["metadata"])), {n: archive[n] for n in archive.files}


CORRUPT_HEADERS = {
    "optimizer without hyperparameters": lambda h: h["optimizer"].pop("hyperparameters"),
    "optimizer not a dict": lambda h: h.__setitem__("optimizer", "LazyAdam"),
    "steps not a list": lambda h: h["optimizer"].__setitem__("steps", 3),
    "unknown hyperparameter": lambda h: h["optimizer"]["hyperparameters"].__setitem__("foo", 1),
    "invalid hyperparameter": lambda h: h["optimizer"]["hyperparameters"].__setitem__("lr", -1),
    "num_tables not an int": lambda h: h.__setitem__("num_tables", "2"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_HEADERS))
def test_corrupt_header_raises_value_error_and_changes_nothing(saved, tmp_path, case):
    """A file whose arrays are right but whose JSON header was damaged is not a checkpoint
    that matches: ValueError (not KeyError/TypeError), nothing changed."""
    header, arrays = _header(saved)
    CORRUPT_HEADERS[case](header)
    arrays["metadata"] = np.array(json.dumps(header))
    path = tmp_path / "corrupt.npz"
    np.savez(path, **arrays)
    modules, opt = _targets()
    before = snapshot(modules, opt)
    with pytest.raises(ValueError):
        fastemb.load(path, modules, opt)
    assert_same(before, snapshot(modules, opt))


def test_missing_optimizer_array_raises(saved, tmp_path):
    with zipfile.ZipFile(saved) as archive:
        names = archive.namelist()
        contents = {n: archive.read(n) for n in names}
    dropped = [n for n in names if n.startswith("optimizer_1_")][0]
    path = tmp_path / "partial.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for n in names:
            if n != dropped:
                archive.writestr(n, contents[n])
    modules, opt = _targets()
    before = snapshot(modules, opt)
    with pytest.raises(ValueError):
        fastemb.load(path, modules, opt)
    assert_same(before, snapshot(modules, opt))


def test_missing_file_raises(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError)):
        fastemb.load(tmp_path / "nothing.npz", make_modules())


# --------------------------------------------------------------------------------------------
# Interrupted saves
# --------------------------------------------------------------------------------------------


def test_failing_save_keeps_old_checkpoint_and_removes_temporary(saved, monkeypatch):
    old_bytes = saved.read_bytes()
    modules, opt = _targets()  # different weights and state from what `saved` holds

    def broken_savez(file, *args, **kwargs):
        file.write(b"PK\x03\x04 partial checkpoint bytes" * 1000)
        file.flush()
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="simulated"):
        fastemb.save(saved, modules, opt)
    monkeypatch.undo()
    assert saved.read_bytes() == old_bytes
    assert leftovers(saved.parent, [saved.name]) == []
    reference = make_modules(seed=30)
    reference_opt = fastemb.optim.LazyAdam(reference, lr=0.05)
    fastemb.load(saved, reference, reference_opt)  # still a good checkpoint


def test_save_killed_mid_write_keeps_old_checkpoint(saved):
    """A process SIGKILLed while writing (nothing can clean up) leaves the old file intact."""
    old_bytes = saved.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        import fastemb

        def dying_savez(file, *args, **kwargs):
            file.write(b"PK\\x03\\x04" + b"x" * 1_000_000)
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        np.savez = dying_savez
        table = fastemb.Embedding(30, 4, seed=99)
        fastemb.save({str(saved)!r}, [table, fastemb.EmbeddingBag(20, 3, dtype=np.float64)])
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastemb.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    assert saved.read_bytes() == old_bytes
    # whatever was left behind is a hidden temporary file, not the checkpoint's name
    for name in leftovers(saved.parent, [saved.name]):
        assert name.startswith(".") and name.endswith(".tmp"), name
    modules, opt = _targets()
    fastemb.load(saved, modules, opt)
    expected = make_modules()
    expected_opt = fastemb.optim.LazyAdam(expected, lr=0.05)
    train(expected, expected_opt, seed=1)
    assert_same(snapshot(modules, opt), snapshot(expected, expected_opt))
