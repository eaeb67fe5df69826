"""Checkpoints of sharded tables: every shard of every table in one file, in fastemb's
checkpoint format (entry i is shard s of table t, in order), written atomically; a load checks
the whole file, and every shard's part of it on the shard, before any shard changes."""

from __future__ import annotations

from ..checkpoint import (checked_tables, checkpoint_arrays, optimizer_state_dict,
                          read_checkpoint, write_atomically)
from ..optim import OPTIMIZERS


def sharded_tables(tables):
    """``tables`` (a sharded table, a sharded collection, or a list of them) as a flat list of
    sharded tables: a collection stands for its tables, in config order."""
    tables = list(tables) if isinstance(tables, (list, tuple)) else [tables]
    flat = []
    for table in tables:
        flat += list(table.tables.values()) if isinstance(getattr(table, "tables", None),
                                                          dict) else [table]
    return flat


def _optimizer_class(tables):
    """The optimizer class every table's shards use; ValueError when they differ."""
    names = {table.optimizer for table in tables}
    if len(names) != 1:
        raise ValueError(f"one checkpoint holds tables of one optimizer, got {sorted(names)}")
    return OPTIMIZERS[names.pop()].cls


def save(path, tables, metadata=None):
    """Write every shard of ``tables`` (a sharded table, a sharded collection, or a list of
    them, all with one optimizer) to the checkpoint file ``path``: each shard's rows and
    optimizer state, each table's shards all after the same step; atomically (a crash
    mid-write leaves the previous file). Each table then recovers from this file should one of
    its shards die.

    >>> import os, tempfile, fastemb, fastemb.distributed
    >>> tables = fastemb.distributed.ShardedEmbeddingBagCollection(
    ...     [fastemb.EmbeddingBagConfig("a", 10, 2), fastemb.EmbeddingBagConfig("b", 7, 3)],
    ...     num_shards=2, seed=0)
    >>> path = os.path.join(tempfile.mkdtemp(), "tables.npz")
    >>> fastemb.distributed.save(path, tables)
    >>> fastemb.distributed.load(path, tables)
    """
    tables = sharded_tables(tables)
    optimizer_class = _optimizer_class(tables)
    weights, states, hyperparameters, steps = [], [], None, []
    for table in tables:
        shard_states = table.engine.call("state", [()] * table.num_shards)
        table_steps = {state["optimizer"]["state"][0]["step"] for state in shard_states}
        if len(table_steps) > 1:  # (cannot happen: every backward steps every shard)
            raise RuntimeError(f"a table's shards are at different steps {sorted(table_steps)}; "
                               f"not saved")
        steps.append(table_steps.pop())
        weights += [state["weight"] for state in shard_states]
        states += [state["optimizer"]["state"][0] for state in shard_states]
        hyperparameters = shard_states[0]["optimizer"]["hyperparameters"]
    write_atomically(path, checkpoint_arrays(
        weights, optimizer_class.__name__, {"hyperparameters": hyperparameters, "state": states},
        optimizer_class.state_arrays, metadata,
        {"sharded": [table._layout() for table in tables]}))
    for table, step in zip(tables, steps):
        table.last_checkpoint = (path, step, tables)


def load(path, tables):
    """Restore every shard of ``tables`` (as ``save`` takes them) from the checkpoint ``path``
    that ``save`` wrote for tables like these (same sizes, shard counts and optimizer).
    Everything is checked, on every shard, before any shard changes; ValueError otherwise."""
    tables = sharded_tables(tables)
    optimizer_class = _optimizer_class(tables)
    arrays, metadata = read_checkpoint(path)
    layouts = [table._layout() for table in tables]
    if metadata.get("sharded") != layouts:
        raise ValueError(f"{path} holds {metadata.get('sharded') or 'no sharded tables'}; "
                         f"these tables are {layouts}")
    weights = checked_tables(path, arrays, metadata,
                             [layout for table in tables for layout in table._shard_layouts()])
    state_dict = optimizer_state_dict(path, arrays, metadata, optimizer_class.__name__)
    if len(state_dict["state"]) != len(weights):
        raise ValueError(f"{path} does not hold one optimizer state per shard")
    per_table, first = [], 0
    for table in tables:
        states = state_dict["state"][first:first + table.num_shards]
        if len({state["step"] for state in states}) > 1:
            raise ValueError(f"{path} holds a table whose shards are at different steps")
        per_table.append([({"weight": weight, "optimizer": {
            "hyperparameters": state_dict["hyperparameters"], "state": [state]}},)
            for weight, state in zip(weights[first:first + table.num_shards], states)])
        first += table.num_shards
    for table, arguments in zip(tables, per_table):
        table.engine.call("check_state", arguments)
    for table, arguments in zip(tables, per_table):
        table.engine.call("load_state", arguments)
        table._steps = arguments[0][0]["optimizer"]["state"][0]["step"]
