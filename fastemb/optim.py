"""Lazy optimizers: each ``step()`` updates only the rows in the modules' gradients.

Every optimizer takes ``weight_decay`` (default 0): L2 weight decay, the gradient of
``weight_decay / 2 * ||w[r]||**2`` added to each updated row's gradient (``g + weight_decay *
w``) before the update, as torch's ``weight_decay`` in SGD, Adagrad and Adam and FBGEMM's
``WeightDecayMode.L2`` do. It is lazy: rows absent from the gradient do not decay.

The update runs fused with the gradient's accumulation (``_core.sparse_step_tables``, one call
for all the float32 or float64 tables of a step, e.g. every table of a collection;
``_core.sparse_step_half`` for each 16-bit table): one pass reads and writes each touched row's
weight and state once, and nothing of table size is written.
Rows absent from the gradient keep their weights and state bit for bit.

bfloat16 and float16 tables train too: their state is float32, each updated row is computed in
float32 from the row's exact float32 value, and the result is rounded to the table's dtype, to
nearest (ties to even) or, with ``stochastic_rounding=True``, up or down at random with the
probabilities that make its expected value the float32 result (so that updates smaller than
half a 16-bit step are not all lost). The draws depend on ``seed``, the table's place in the
optimizer, its step count, the row and the column only: a run is reproducible at any thread
count.

Optimizer steps on the same table must not run concurrently (they write the same rows).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ._kernels import kernels as _core
from ._config import threads_for
from ._dtypes import TABLE_DTYPES
from ._memory import aligned_full
from ._validation import as_real, check_writable_table
from .collection import table_modules
from .sparse import SparseGrad

__all__ = ["OPTIMIZERS", "Adagrad", "LazyAdam", "OptimizerInfo", "RowWiseAdagrad", "SGD"]


def __dir__():
    """``dir(fastemb.optim)`` lists the optimizers, not the module's helpers and imports."""
    return sorted(__all__)


def table_of(module):
    """(the array a module's lookups read and its optimizer updates, the low halves of a split
    table or None): a split table (see ``fastemb.modules``) is stepped through its two halves,
    not through ``module.weight``, which is a new float32 array on every read."""
    low_halves = getattr(module, "_low_halves", None)
    return (module.weight if low_halves is None else module._table), low_halves


def state_dtype(table_dtype):
    """The dtype of the optimizer state (and gradient) of a table of ``table_dtype``."""
    return TABLE_DTYPES[table_dtype].compute_dtype


def _check_range(value, name, low, high=math.inf, low_open=False):
    value = as_real(value, name)
    if not ((low < value if low_open else low <= value) and value < high):
        raise ValueError(f"Invalid {name}: {value}")
    return value


class _SparseOptimizer:
    """What every optimizer shares: its modules, per-module state, step and checkpoints.

    Subclasses name their kernel method and state arrays and compute the step's scalars.
    """

    method = None  # the kernel's StepMethod
    state_arrays = ()  # names of the per-module state arrays, in kernel order

    def __init__(self, modules, weight_decay=0.0, stochastic_rounding=False, seed=0,
                 **hyperparameters):
        modules = table_modules(modules)
        if not modules:
            raise ValueError("the optimizer needs at least one module")
        if len(set(map(id, modules))) != len(modules):
            raise ValueError("a module is listed twice")
        for module in modules:
            if not hasattr(module, "weight") or not hasattr(module, "grad"):
                raise TypeError(f"expected fastemb modules, got {type(module).__name__}")
            check_writable_table(table_of(module)[0], purpose="the optimizer")
        self.modules = list(modules)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.hyperparameters = hyperparameters | {
            "weight_decay": _check_range(weight_decay, "weight_decay value", 0.0),
            "stochastic_rounding": bool(stochastic_rounding), "seed": int(seed)}
        self.state = {module: self._initial_state(module) for module in self.modules}

    def _initial_state(self, module):
        return {"step": 0} | {name: self._new_array(module, name) for name in self.state_arrays}

    def _new_array(self, module, name, fill_value=0):
        """A state array of ``fill_value``, cache-line aligned (pages are only touched when a
        row is), in the dtype the table computes in (float32 for a 16-bit table)."""
        table = table_of(module)[0]
        return aligned_full(self.state_shape(table.shape), fill_value, state_dtype(table.dtype))

    @classmethod
    def state_shape(cls, table_shape):
        """The shape of each state array for a table of ``table_shape``."""
        return tuple(table_shape)

    def _scalars(self, step):
        """(signed lr factor, 1 - beta1, 1 - beta2, eps) for the kernel at this step."""
        raise NotImplementedError

    def step(self) -> None:
        """Update every module that has a ``.grad``; ``.grad`` is left as it is.

        >>> import numpy as np, fastemb
        >>> table = fastemb.Embedding(10, 4, seed=0)
        >>> opt = fastemb.optim.SGD(table, lr=0.1)
        >>> before = table.weight.copy()
        >>> out = table([3, 3, 7]); _ = table.backward(np.ones_like(out)); opt.step()
        >>> np.flatnonzero((table.weight != before).any(axis=1)).tolist()
        [3, 7]
        """
        self.apply_gradients({module: module.grad for module in self.modules
                              if module.grad is not None})

    def apply_gradients(self, grads: dict) -> None:
        """Update each module of ``grads`` (``{module: SparseGrad}``, modules of this
        optimizer) with its gradient, as ``step()`` does with ``.grad``: what a fused backward
        calls (e.g. ``EmbeddingBagCollection.backward(grad_output, optimizer)``).

        >>> import numpy as np, fastemb
        >>> table = fastemb.Embedding(10, 4, seed=0)
        >>> opt = fastemb.optim.SGD(table, lr=0.1)
        >>> opt.apply_gradients({table: fastemb.SparseGrad([2], np.ones((1, 4), np.float32), 10)})
        >>> table.grad is None, opt.state[table]["step"]
        (True, 1)
        """
        for module, grad in grads.items():  # check everything before any table or state changes
            if module not in self.state:
                raise ValueError(f"{module!r} is not one of this optimizer's modules")
            weight = table_of(module)[0]
            if not isinstance(grad, SparseGrad):
                raise TypeError(f"module.grad must be a SparseGrad or None, got "
                                f"{type(grad).__name__}")
            if not isinstance(weight, np.ndarray):
                raise TypeError(f"module.weight must be a NumPy array, got {type(weight).__name__}")
            if weight.dtype not in TABLE_DTYPES:
                raise TypeError(f"module.weight has dtype {weight.dtype}; the optimizers "
                                f"update float32, float64, bfloat16 and float16 tables")
            if grad.shape != weight.shape or grad.dtype != state_dtype(weight.dtype):
                raise ValueError(
                    f"the gradient {grad.shape} {grad.dtype} does not match the table "
                    f"{weight.shape} {weight.dtype}"
                )
            check_writable_table(weight, purpose="the optimizer")
            for name in self.state_arrays:
                array = self.state[module][name]
                if (array.shape != self.state_shape(weight.shape)
                        or array.dtype != state_dtype(weight.dtype)):
                    raise ValueError(f"the optimizer's {name!r} state is {array.dtype} "
                                     f"{array.shape}; it does not fit the table {weight.dtype} "
                                     f"{weight.shape} (was module.weight replaced?)")
        plain = {}  # float32 and float64 tables, by dtype: stepped in one call each
        for position, module in enumerate(self.modules):
            grad = grads.get(module)
            if grad is None:
                continue
            state = self.state[module]
            state["step"] += 1
            if grad.nnz == 0:
                continue
            arrays = [state[name] for name in self.state_arrays]
            arrays += [None] * (2 - len(arrays))
            table, low_halves = table_of(module)
            table_dtype = TABLE_DTYPES[table.dtype]
            if table_dtype.half_format is None:
                plain.setdefault(table.dtype, []).append(
                    (table, *arrays, grad.rows, grad.plan(), self._scalars(state["step"])))
                continue
            plan = grad.plan()
            _core.sparse_step_half(
                self.method, table_dtype.kernel_view(table), *arrays, grad.rows, plan,
                *self._scalars(state["step"]), self.hyperparameters.get("maximize", False),
                self.hyperparameters["weight_decay"],
                threads_for(plan.order.size * table.shape[1]), table_dtype.half_format,
                self.hyperparameters["stochastic_rounding"],
                self._rounding_key(position, state["step"]), low_halves)
        for steps in plain.values():
            tables, states_a, states_b, rows, plans, scalars = map(list, zip(*steps))
            lrs, one_minus_beta1s, one_minus_beta2s, epss = np.ascontiguousarray(
                np.array(scalars, dtype=np.float64).T)
            work = sum(plan.order.size * table.shape[1] for plan, table in zip(plans, tables))
            _core.sparse_step_tables(
                self.method, tables, states_a, states_b, rows, plans, lrs, one_minus_beta1s,
                one_minus_beta2s, epss, self.hyperparameters.get("maximize", False),
                self.hyperparameters["weight_decay"], threads_for(work))

    def _rounding_key(self, position, step):
        """The 64-bit key of a step's stochastic rounding draws for the table at ``position``
        (see the module docstring)."""
        sequence = np.random.SeedSequence([self.hyperparameters["seed"], position, step])
        return int(sequence.generate_state(1, np.uint64)[0])

    def zero_grad(self) -> None:
        """Drop every module's gradient."""
        for module in self.modules:
            module.zero_grad()

    def state_dict(self) -> dict:
        """A copy of the hyperparameters and per-module state (steps and arrays), by position.

        >>> import fastemb
        >>> opt = fastemb.optim.LazyAdam(fastemb.Embedding(3, 2))
        >>> sorted(opt.state_dict()["state"][0])
        ['exp_avg', 'exp_avg_sq', 'step']
        """
        return {
            "hyperparameters": dict(self.hyperparameters),
            "state": [
                {key: (value.copy() if isinstance(value, np.ndarray) else value)
                 for key, value in self.state[module].items()}
                for module in self.modules
            ],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict()``; checks everything first and changes nothing on error
        (ValueError)."""
        try:
            hyperparameters = dict(state_dict["hyperparameters"])
            states = list(state_dict["state"])
            fresh = type(self)(self.modules, **hyperparameters)
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a {type(self).__name__} state_dict ({error})") from None
        if len(states) != len(self.modules):
            raise ValueError(f"state for {len(states)} modules, but the optimizer has "
                             f"{len(self.modules)}")
        for position, (module, state) in enumerate(zip(self.modules, states)):
            expected = fresh.state[module]
            if not isinstance(state, dict) or set(state) != set(expected):
                found = sorted(state, key=repr) if isinstance(state, dict) else type(state).__name__
                raise ValueError(f"state[{position}] has keys {found}, expected "
                                 f"{sorted(expected)}")
            step = state["step"]
            if isinstance(step, np.ndarray):
                step = step.item()
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
                raise ValueError(f"state[{position}]['step'] must be an int >= 0, got {step!r}")
            expected["step"] = int(step)
            for name in self.state_arrays:
                array = np.asarray(state[name])
                if array.shape != expected[name].shape or array.dtype != expected[name].dtype:
                    raise ValueError(
                        f"state[{position}][{name!r}] is {array.dtype} {array.shape}, expected "
                        f"{expected[name].dtype} {expected[name].shape}"
                    )
                np.copyto(expected[name], array)  # (into the fresh, aligned array)
        self.hyperparameters, self.state = fresh.hyperparameters, fresh.state

    def __repr__(self):
        options = ", ".join(f"{key}={value}" for key, value in self.hyperparameters.items())
        return f"{type(self).__name__}({len(self.modules)} modules, {options})"


class SGD(_SparseOptimizer):
    """Plain SGD on the touched rows: ``w[r] -= lr * g[r]`` (torch's SGD without momentum).

    >>> import fastemb
    >>> fastemb.optim.SGD(fastemb.Embedding(5, 2), lr=0.5)
    SGD(1 modules, lr=0.5, weight_decay=0.0, stochastic_rounding=False, seed=0)
    """

    method = _core.StepMethod.STEP_SGD

    def __init__(self, modules, lr: float, weight_decay: float = 0.0,
                 stochastic_rounding: bool = False, seed: int = 0) -> None:
        super().__init__(modules, weight_decay, stochastic_rounding, seed,
                         lr=_check_range(lr, "learning rate", 0.0))

    def _scalars(self, step):
        return -self.hyperparameters["lr"], 0.0, 0.0, 0.0


class Adagrad(_SparseOptimizer):
    """Adagrad on the touched rows, as torch's Adagrad with sparse gradients:
    ``s[r] += g[r]**2; w[r] -= clr * g[r] / (sqrt(s[r]) + eps)``, with
    ``clr = lr / (1 + (step - 1) * lr_decay)``.

    >>> import fastemb
    >>> fastemb.optim.Adagrad(fastemb.Embedding(5, 2)).state_arrays
    ('sum',)
    """

    method = _core.StepMethod.STEP_ADAGRAD
    state_arrays = ("sum",)

    def __init__(self, modules, lr: float = 1e-2, lr_decay: float = 0.0, eps: float = 1e-10,
                 initial_accumulator_value: float = 0.0, weight_decay: float = 0.0,
                 stochastic_rounding: bool = False, seed: int = 0) -> None:
        super().__init__(
            modules,
            weight_decay,
            stochastic_rounding,
            seed,
            lr=_check_range(lr, "learning rate", 0.0),
            lr_decay=_check_range(lr_decay, "lr_decay", 0.0),
            eps=_check_range(eps, "epsilon value", 0.0),
            initial_accumulator_value=_check_range(initial_accumulator_value,
                                                   "initial_accumulator_value", 0.0),
        )

    def _new_array(self, module, name, fill_value=0):
        return super()._new_array(module, name, self.hyperparameters["initial_accumulator_value"])

    def _scalars(self, step):
        h = self.hyperparameters
        return -h["lr"] / (1 + (step - 1) * h["lr_decay"]), 0.0, 0.0, h["eps"]


class RowWiseAdagrad(_SparseOptimizer):
    """Adagrad with one accumulator per row (FBGEMM's memory-saving variant):
    ``acc[r] += mean(g[r]**2); w[r] -= lr * g[r] / (sqrt(acc[r]) + eps)``, the mean of squares in
    float64 (column j summed into partial sum j % 8, the eight sums added pairwise).

    >>> import fastemb
    >>> opt = fastemb.optim.RowWiseAdagrad(fastemb.Embedding(5, 2))
    >>> opt.state[opt.modules[0]]["sum"].shape
    (5, 1)
    """

    method = _core.StepMethod.STEP_ROWWISE_ADAGRAD
    state_arrays = ("sum",)

    def __init__(self, modules, lr: float = 1e-2, eps: float = 1e-10,
                 weight_decay: float = 0.0, stochastic_rounding: bool = False,
                 seed: int = 0) -> None:
        super().__init__(modules, weight_decay, stochastic_rounding, seed,
                         lr=_check_range(lr, "learning rate", 0.0),
                         eps=_check_range(eps, "epsilon value", 0.0))

    @classmethod
    def state_shape(cls, table_shape):
        return (table_shape[0], 1)

    def _scalars(self, step):
        return self.hyperparameters["lr"], 0.0, 0.0, self.hyperparameters["eps"]


class LazyAdam(_SparseOptimizer):
    """Lazy Adam, exactly torch's SparseAdam: only the rows in the gradient have their weight
    and both moments updated, with one step counter per table and ``eps`` added to the
    uncorrected ``sqrt(v)``. ``weight_decay`` (which SparseAdam lacks) is L2, as in torch's
    Adam: ``g + weight_decay * w`` enters both moments.

    >>> import fastemb
    >>> table = fastemb.Embedding(5, 2)
    >>> fastemb.optim.LazyAdam(table, lr=0.01, weight_decay=1e-4)  # doctest: +ELLIPSIS
    LazyAdam(1 modules, lr=0.01, betas=(0.9, 0.999), ..., weight_decay=0.0001, ...)
    """

    method = _core.StepMethod.STEP_ADAM
    state_arrays = ("exp_avg", "exp_avg_sq")

    def __init__(self, modules, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, maximize: bool = False, weight_decay: float = 0.0,
                 stochastic_rounding: bool = False, seed: int = 0) -> None:
        try:
            betas = tuple(betas)
        except TypeError:
            raise TypeError(f"betas must be a pair of numbers, got {betas!r}") from None
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair, got {betas!r}")
        betas = tuple(_check_range(beta, f"beta parameter at index {i}", 0.0, 1.0)
                      for i, beta in enumerate(betas))
        super().__init__(modules, weight_decay, stochastic_rounding, seed,
                         lr=_check_range(lr, "learning rate", 0.0, low_open=True),
                         betas=betas, eps=_check_range(eps, "epsilon value", 0.0, low_open=True),
                         maximize=bool(maximize))

    def _scalars(self, step):
        h = self.hyperparameters
        beta1, beta2 = h["betas"]
        step_size = h["lr"] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
        return -step_size, 1 - beta1, 1 - beta2, h["eps"]


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer as the command line, the bench and the tests know it."""

    name: str                # the command-line name, e.g. "lazyadam"
    cls: type                # the fastemb.optim class
    train_lr: float          # the train command's default learning rate
    torch_name: str | None   # the torch.optim class with the same update on sparse gradients

    def state_per_row(self, dim):
        """How many numbers of optimizer state a table row of ``dim`` columns carries.

        >>> OPTIMIZERS["lazyadam"].state_per_row(32)
        64
        >>> OPTIMIZERS["rowwise-adagrad"].state_per_row(32)
        1
        """
        return len(self.cls.state_arrays) * self.cls.state_shape((1, dim))[1]


# The registry: every optimizer, by command-line name. Adding an optimizer here adds it to the
# train command (--optimizer), to its torch comparison when it has a torch twin, and to the
# tests that check each registered optimizer is covered.
OPTIMIZERS = {info.name: info for info in (
    OptimizerInfo("lazyadam", LazyAdam, train_lr=0.003, torch_name="SparseAdam"),
    OptimizerInfo("sgd", SGD, train_lr=3.0, torch_name="SGD"),
    OptimizerInfo("adagrad", Adagrad, train_lr=0.1, torch_name="Adagrad"),
    OptimizerInfo("rowwise-adagrad", RowWiseAdagrad, train_lr=0.1, torch_name=None),
)}
