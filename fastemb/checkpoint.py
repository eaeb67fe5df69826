"""Checkpoints: every table and the optimizer state in one ``.npz`` file.

A save writes a temporary file in the same folder, flushes it to disk and renames it over the
target, so a crash mid-write leaves the previous checkpoint in place. A load checks the whole
file against the modules and optimizer before it changes anything.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib

import numpy as np

from ._dtypes import TABLE_DTYPES
from .collection import table_modules

FORMAT = "fastemb-checkpoint"
VERSION = 1


def _module_list(modules):
    module_list = table_modules(modules)
    for module in module_list:
        if not isinstance(getattr(module, "weight", None), np.ndarray):
            raise TypeError(f"expected fastemb modules, got {type(module).__name__}")
    return module_list


def _stored(table):
    """A table as the .npz format can hold it: a dtype NumPy has no format for (bfloat16) as
    its bits (unsigned integers of its size); the header records the dtype's name."""
    return table.view(f"u{table.dtype.itemsize}") if table.dtype.kind == "V" else table


def _restored(stored, dtype_name):
    """The table ``_stored`` wrote, in the dtype named by the header (when it is one of the
    table dtypes and the stored bits have its size); as it was stored otherwise."""
    dtype = next((dtype for dtype in TABLE_DTYPES if dtype.name == dtype_name), None)
    if (dtype is not None and stored.dtype != dtype and stored.dtype.kind == "u"
            and stored.dtype.itemsize == dtype.itemsize):
        return stored.view(dtype)
    return stored


def save(path: str | os.PathLike, modules, optimizer=None,
         metadata: dict | None = None) -> None:
    """Save the tables of ``modules`` (a module, a collection, or a list of them) and
    ``optimizer``'s state to ``path``;
    ``metadata`` (a JSON-serialisable dict) is stored beside them (see ``read_metadata``).

    >>> import os, tempfile, fastemb
    >>> table = fastemb.Embedding(4, 2, seed=0)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.npz")
    >>> fastemb.save(path, table, fastemb.optim.SGD(table, lr=0.1))
    >>> fastemb.load(path, fastemb.Embedding(4, 2, seed=1)).weight.tolist() == table.weight.tolist()
    True
    """
    weights = [module.weight for module in _module_list(modules)]
    if optimizer is None:
        write_atomically(path, checkpoint_arrays(weights, None, None, (), metadata))
    else:
        write_atomically(path, checkpoint_arrays(weights, type(optimizer).__name__,
                                                 optimizer.state_dict(),
                                                 optimizer.state_arrays, metadata))


def checkpoint_arrays(weights, optimizer_class, state_dict, state_arrays, metadata=None,
                      extra_header=None):
    """What a checkpoint file holds, as ``{name: array}``: the tables ``weights``, the state
    (``state_dict``, one entry per table; arrays named ``state_arrays``) of an optimizer of
    class ``optimizer_class`` (a name, or None for no optimizer), the user's ``metadata`` and,
    in the header, ``extra_header``'s entries."""
    arrays = {f"table_{i}": _stored(weight) for i, weight in enumerate(weights)}
    header = {"format": FORMAT, "version": VERSION, "num_tables": len(weights),
              "table_dtypes": [weight.dtype.name for weight in weights],
              "optimizer": None, "user": metadata or {}} | (extra_header or {})
    if optimizer_class is not None:
        header["optimizer"] = {
            "class": optimizer_class,
            "hyperparameters": state_dict["hyperparameters"],
            "steps": [state["step"] for state in state_dict["state"]],
            "arrays": list(state_arrays),
        }
        for i, state in enumerate(state_dict["state"]):
            for name in state_arrays:
                arrays[f"optimizer_{i}_{name}"] = state[name]
    arrays["metadata"] = np.array(json.dumps(header))
    return arrays


def write_atomically(path, arrays):
    """Write ``arrays`` (``{name: array}``) to the ``.npz`` file ``path``: to a temporary file
    in the same folder, flushed to disk, then renamed over ``path``, so that a crash mid-write
    leaves the previous file in place."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".fastemb-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    directory_handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_handle)
    finally:
        os.close(directory_handle)


def read_checkpoint(path, with_arrays=True):
    """A checkpoint's arrays (unless with_arrays is False) and its header; ValueError if the
    file is not a readable checkpoint."""
    try:
        # (opened here: np.load leaves its own file open when the zip directory is damaged)
        with open(path, "rb") as file, np.load(file, allow_pickle=False) as archive:
            names = archive.files if with_arrays else ["metadata"]
            arrays = {name: archive[name] for name in names}
        metadata = json.loads(str(arrays.pop("metadata")))
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error,
            NotImplementedError, RuntimeError, MemoryError) as error:
        # (TypeError: a plain .npy file loads as an array, which is no archive; a damaged zip
        # directory gives NotImplementedError (unknown method or version) or RuntimeError
        # ("encrypted"); a forged .npy header can claim an array too big to allocate)
        raise ValueError(f"{path} is not a readable fastemb checkpoint ({error})") from error
    if (not isinstance(metadata, dict) or metadata.get("format") != FORMAT
            or not {"num_tables", "optimizer", "user"} <= set(metadata)):
        raise ValueError(f"{path} is not a fastemb checkpoint")
    if metadata.get("version") != VERSION:
        raise ValueError(f"{path} has checkpoint version {metadata.get('version')}; this "
                         f"fastemb reads version {VERSION}")
    return arrays, metadata


def checked_tables(path, arrays, metadata, weights):
    """The tables of a checkpoint read from ``path`` (``arrays`` and ``metadata`` as
    ``read_checkpoint`` returns them); ValueError unless they are as many as ``weights`` and
    each has its weight's shape and dtype."""
    if metadata["num_tables"] != len(weights):
        raise ValueError(f"{path} holds {metadata['num_tables']} tables, but "
                         f"{len(weights)} modules were given")
    dtype_names = metadata.get("table_dtypes")  # (absent from checkpoints of float tables)
    if dtype_names is not None and (not isinstance(dtype_names, list)
                                    or len(dtype_names) != len(weights)):
        raise ValueError(f"{path} has a damaged list of table dtypes: {dtype_names!r}")
    tables = []
    for i, weight in enumerate(weights):
        table = arrays.get(f"table_{i}")
        if table is not None and dtype_names is not None:
            table = _restored(table, dtype_names[i])
        if table is None or table.shape != weight.shape or table.dtype != weight.dtype:
            found = "nothing" if table is None else f"{table.dtype} {table.shape}"
            raise ValueError(f"table {i} in {path} is {found}, but the module's weight is "
                             f"{weight.dtype} {weight.shape}")
        tables.append(table)
    return tables


def optimizer_state_dict(path, arrays, metadata, optimizer_class):
    """The ``state_dict`` of the optimizer of class ``optimizer_class`` (a name) that a
    checkpoint read from ``path`` holds; ValueError when it holds another's or none, or its
    state is damaged."""
    saved = metadata["optimizer"]
    if not isinstance(saved, dict) or saved.get("class") != optimizer_class:
        found = saved.get("class") if isinstance(saved, dict) else "no optimizer"
        raise ValueError(f"{path} holds {found} state, not {optimizer_class}")
    try:
        state = [
            {"step": step} | {name: arrays[f"optimizer_{i}_{name}"] for name in saved["arrays"]}
            for i, step in enumerate(saved["steps"])
        ]
        return {"hyperparameters": saved["hyperparameters"], "state": state}
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} has damaged optimizer state ({error!r})") from None


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``metadata`` dict a checkpoint was saved with (empty if none)."""
    return read_checkpoint(path, with_arrays=False)[1]["user"]


def load(path: str | os.PathLike, modules, optimizer=None) -> None:
    """Load a checkpoint written by ``save`` into ``modules`` (their weights are overwritten in
    place) and, if given, ``optimizer``. Raises ValueError, changing nothing, when the file does
    not match them. Returns ``modules`` as given.
    """
    module_list = _module_list(modules)
    arrays, metadata = read_checkpoint(path)
    weights = [module.weight for module in module_list]  # (once: a split table's is new)
    tables = checked_tables(path, arrays, metadata, weights)
    for i, weight in enumerate(weights):
        if not weight.flags.writeable:
            raise ValueError(f"module {i}'s weight is read-only; cannot load into it")
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state_dict(path, arrays, metadata,
                                                       type(optimizer).__name__))
    for module, table in zip(module_list, tables):
        if getattr(module, "split", False):  # (its weight is a new array: set both halves)
            module.weight = table
        else:
            np.copyto(module.weight, table)
    return modules
