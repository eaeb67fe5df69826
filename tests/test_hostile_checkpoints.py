"""Damaged and foreign checkpoint files: ValueError, nothing changed, never a wrong table."""

import collections
import io
import json
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hostile import COUNTS, assert_same_optimizer, examples, snapshot_optimizer
from reference import assert_same_bits

import fastemb


# --------------------------------------------------------------------------------------------
# fastemb.load on damaged and foreign files
# --------------------------------------------------------------------------------------------


def _checkpoint_targets(seed=1):
    modules = [fastemb.Embedding(9, 3, seed=seed),
               fastemb.EmbeddingBag(5, 2, mode="sum", dtype=np.float64, seed=seed + 1)]
    return modules, fastemb.optim.LazyAdam(modules, lr=0.01)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    """A real checkpoint (two tables, LazyAdam state after two steps), plain and compressed."""
    modules, optimizer = _checkpoint_targets(seed=10)
    for _ in range(2):
        for module in modules:
            out = module(np.array([[0, 1], [1, 4]]))
            module.backward(np.ones_like(out))
        optimizer.step()
    folder = tmp_path_factory.mktemp("checkpoints")
    path = folder / "good.npz"
    fastemb.save(path, modules, optimizer)
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    compressed = folder / "compressed.npz"
    np.savez_compressed(compressed, **arrays)
    return {"plain": path.read_bytes(), "compressed": compressed.read_bytes(),
            "tables": [m.weight.copy() for m in modules],
            "state": snapshot_optimizer(optimizer)}


def try_load(path, good):
    """Load ``path`` into fresh targets: either ValueError with nothing changed, or a load
    that restored exactly the saved tables and state (the damage was in bytes that do not
    matter, e.g. a zip timestamp). Returns "rejected" or "loaded"."""
    modules, optimizer = _checkpoint_targets()
    before = snapshot_optimizer(optimizer)
    try:
        fastemb.load(path, modules, optimizer)
    except ValueError:
        assert_same_optimizer(optimizer, before, f"load({path.name})")
        return "rejected"
    for module, table in zip(modules, good["tables"]):
        assert_same_bits(module.weight, table)
    assert_same_optimizer(optimizer, good["state"], "a damaged checkpoint that loaded")
    return "loaded"


@settings(max_examples=examples(3))
@given(data=st.data())
def test_load_damaged_checkpoint_fuzz(good_checkpoint, scratch, data):
    """Random damage to a real checkpoint (plain or compressed): truncation, bit flips,
    overwritten or inserted bytes, a forged .npy header; never a crash, never a wrong table."""
    raw = bytearray(good_checkpoint[data.draw(st.sampled_from(["plain", "compressed"]))])
    for _ in range(data.draw(st.integers(1, 3), label="damages")):
        damage = data.draw(st.sampled_from(["truncate", "flip", "overwrite", "insert",
                                            "delete"]), label="damage")
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)), label="at")
        if damage == "truncate":
            del raw[at:]
        elif damage == "flip" and raw:
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif damage == "overwrite":
            chunk = data.draw(st.binary(min_size=1, max_size=16))
            raw[at:at + len(chunk)] = chunk
        elif damage == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif damage == "delete":
            del raw[at:at + data.draw(st.integers(1, 16))]
    path = scratch(".npz")
    path.write_bytes(bytes(raw))
    COUNTS["load", "matched" if try_load(path, good_checkpoint) == "loaded"
           else "rejected"] += 1


def _forged_header_checkpoint(good, shape, path):
    """The good checkpoint with table_0's .npy header claiming ``shape``."""
    with zipfile.ZipFile(io.BytesIO(good["plain"])) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        for name, member in members.items():
            archive.writestr(name, header.getvalue() + b"\0" * 64 if name == "table_0.npy"
                             else member)
    return path


def test_truncated_checkpoints_at_many_lengths_raise_value_error(good_checkpoint, tmp_path):
    """Every 7th cut of a plain and a compressed checkpoint, and every cut of the last 64
    bytes (the zip directory), raises ValueError and changes nothing."""
    cases = 0
    for kind in ("plain", "compressed"):
        raw = good_checkpoint[kind]
        cuts = sorted(set(range(0, len(raw), 7)) | set(range(max(len(raw) - 64, 0), len(raw))))
        for cut in cuts:
            path = tmp_path / f"{kind}{cut}.npz"
            path.write_bytes(raw[:cut])
            assert try_load(path, good_checkpoint) == "rejected", f"{kind} cut at {cut}"
            path.unlink()
            cases += 1
    COUNTS["load (truncated)", "rejected"] += cases
    assert cases > 300


def _write_zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, member in members.items():
            archive.writestr(name, member)


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


FOREIGN_FILES = {
    "empty": lambda path: path.write_bytes(b""),
    "random bytes": lambda path: path.write_bytes(np.random.default_rng(0).bytes(4096)),
    "zip magic then garbage": lambda path: path.write_bytes(b"PK\x03\x04" + b"\xff" * 200),
    "text": lambda path: path.write_text("table_0,table_1\n1,2\n"),
    "foreign npz": lambda path: np.savez(path, table_0=np.zeros((9, 3), np.float32),
                                         table_1=np.zeros((5, 2))),
    "npz with pickled metadata": lambda path: np.savez(
        path, table_0=np.zeros((9, 3), np.float32), metadata=np.array([{"format": 1}], object)),
    "npz with numeric metadata": lambda path: np.savez(
        path, table_0=np.zeros((9, 3), np.float32), metadata=np.arange(3)),
    "npz with deeply nested metadata": lambda path: np.savez(
        path, metadata=np.array("[" * 100000 + "]" * 100000)),
    "npy": lambda path: np.save(path, np.zeros((9, 3), np.float32)),
    "pickle": lambda path: path.write_bytes(__import__("pickle").dumps({"table_0": [1.0]})),
    "a folder": lambda path: path.mkdir(),
    "zip of other files": lambda path: _write_zip(path, {"x.txt": b"hi"}),
    "zip with an npy of the wrong name": lambda path: _write_zip(
        path, {"weights.npy": _npy_bytes(np.zeros((9, 3), np.float32))}),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN_FILES))
def test_foreign_files_raise_value_error(good_checkpoint, tmp_path, kind):
    path = tmp_path / "foreign.npz"
    FOREIGN_FILES[kind](path)
    if kind == "npy":
        path = tmp_path / "foreign.npz.npy"  # np.save appends .npy
    assert try_load(path, good_checkpoint) == "rejected"
    COUNTS["load (foreign)", "rejected"] += 1


@pytest.mark.parametrize("shape", [(10**6, 10**6), (2**40, 3), (9, 3), (0,), (-1, 3)],
                         ids=str)
def test_forged_array_header_raises_value_error(good_checkpoint, tmp_path, shape):
    """A table header claiming terabytes (MemoryError inside NumPy) is no checkpoint either."""
    try:
        path = _forged_header_checkpoint(good_checkpoint, shape, tmp_path / "forged.npz")
    except ValueError:  # NumPy refuses to write a negative shape
        pytest.skip("NumPy cannot write this header")
    assert try_load(path, good_checkpoint) == "rejected"


@pytest.mark.parametrize("kind", ["plain", "compressed"])
def test_every_single_byte_flip_is_caught_or_harmless(good_checkpoint, tmp_path, kind):
    """Flip one bit in every byte: each load raises ValueError or restores exactly the saved
    data (the zip CRC catches damaged table bytes), and never crashes or loads a wrong table."""
    raw = good_checkpoint[kind]
    outcomes = collections.Counter()
    path = tmp_path / "flipped.npz"
    modules, optimizer = _checkpoint_targets()
    for at in range(len(raw)):
        damaged = bytearray(raw)
        damaged[at] ^= 0x10 if at % 2 else 0x01
        path.write_bytes(bytes(damaged))
        outcomes[try_load(path, good_checkpoint)] += 1
    assert outcomes["rejected"] > len(raw) // 2
    COUNTS["load (bit flips)", "rejected"] += outcomes["rejected"]
    COUNTS["load (bit flips)", "matched"] += outcomes["loaded"]


def test_load_and_save_reject_things_that_are_not_modules(good_checkpoint, tmp_path):
    path = tmp_path / "good.npz"
    path.write_bytes(good_checkpoint["plain"])
    for modules in (None, [None, None], "modules", [np.zeros((9, 3), np.float32)]):
        with pytest.raises(TypeError):
            fastemb.load(path, modules)
        with pytest.raises(TypeError):
            fastemb.save(tmp_path / "other.npz", modules)
    assert not (tmp_path / "other.npz").exists()


def test_a_failed_load_leaves_an_optimizer_and_tables_intact(good_checkpoint, tmp_path):
    """The table matches but the optimizer state is damaged: nothing at all is loaded."""
    path = tmp_path / "damaged_state.npz"
    with zipfile.ZipFile(io.BytesIO(good_checkpoint["plain"])) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    metadata = json.loads(str(np.load(io.BytesIO(members["metadata.npy"]))))
    metadata["optimizer"]["steps"] = [2, "two"]
    buffer = io.BytesIO()
    np.save(buffer, np.array(json.dumps(metadata)))
    members["metadata.npy"] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, member in members.items():
            archive.writestr(name, member)
    assert try_load(path, good_checkpoint) == "rejected"
