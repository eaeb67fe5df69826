"""Training steps for the sharded-table tests: a sharded table or collection and its twin
(on another engine, or in-process) take the same batches and must end with the same bits."""

import pytest
from reference import assert_same_bits


def step(module, batch):
    """One training step of ``module`` on ``batch`` (its input, the gradient of its output);
    returns the output."""
    output = module(batch[0])
    module.backward(batch[1])
    return output


def steps_alike(module, twin, batches):
    """Each batch's step on ``module``, then on ``twin``."""
    for batch in batches:
        step(module, batch)
        step(twin, batch)


def recovers_then_steps_alike(table, twin, batches, warning):
    """The first batch's step on ``table`` recovers a lost shard, warning ``warning`` (a
    pattern); from there both tables take every batch and end with the same rows."""
    with pytest.warns(RuntimeWarning, match=warning):
        step(table, batches[0])
    step(twin, batches[0])
    steps_alike(table, twin, batches[1:])
    assert_same_bits(table.weight, twin.weight)
