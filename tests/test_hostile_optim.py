"""Hostile input to the optimizers: construction, step, load_state_dict (the machinery is in
``hostile.py``)."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hostile import (
    FLOATS, assert_same_optimizer, examples, hostile_targets, is_real, place, random_table,
    run_case, seeds, snapshot_optimizer,
)
from reference import assert_same_bits
from reference_training import (adagrad_step_ref, bag_grad_ref, embedding_grad_ref,
                                lazy_adam_step_ref, rowwise_adagrad_step_ref, sgd_step_ref)

import fastemb


# --------------------------------------------------------------------------------------------
# Optimizers: construction, step, load_state_dict
# --------------------------------------------------------------------------------------------

OPTIMIZERS = {  # name: (class, {hyperparameter: (valid values, hostile values)})
    "SGD": (fastemb.optim.SGD, dict(lr=([0.1, 0.5, 0, np.float32(0.25)],
                                        [-0.1, float("nan"), float("inf"), "0.1", True, None]))),
    "LazyAdam": (fastemb.optim.LazyAdam, dict(
        lr=([1e-3, 0.05], [0, -1.0, float("nan"), "x"]),
        betas=([(0.9, 0.999), [0.5, 0.9], (0.0, 0.0), np.array([0.8, 0.9])],
               [(1.0, 0.9), (0.9, -0.1), (0.9,), None, 3, "ab", (float("nan"), 0.9)]),
        eps=([1e-8, 1e-3], [0.0, -1e-8, float("nan")]),
        maximize=([False, True], []))),
    "Adagrad": (fastemb.optim.Adagrad, dict(
        lr=([1e-2, 0.3, 0.0], [-0.1, float("inf")]),
        lr_decay=([0.0, 0.05], [-0.1, float("nan")]),
        eps=([1e-10, 0.0], [-1.0]),
        initial_accumulator_value=([0.0, 0.1], [-0.1, "0"]))),
    "RowWiseAdagrad": (fastemb.optim.RowWiseAdagrad, dict(
        lr=([1e-2, 0.3], [-1, None]), eps=([1e-10, 0.0], [-1e-10, float("inf")]))),
}


def draw_hyperparameters(data, choices, hostile):
    """Valid values for every hyperparameter, or hostile ones for one or two of them."""
    bad_keys = set()
    if hostile:
        candidates = sorted(key for key, (_, bad) in choices.items() if bad)
        bad_keys = data.draw(st.sets(st.sampled_from(candidates), min_size=1, max_size=2))
    return {key: data.draw(st.sampled_from(bad if key in bad_keys else valid), label=key)
            for key, (valid, bad) in choices.items()}


def hyperparameter_errors(name, values):
    """torch's rules: a real number (bools rejected) in the documented range, else
    TypeError/ValueError."""
    errors = set()

    def real(value, low, low_open=False, high=math.inf):
        if not is_real(value):
            errors.add(TypeError)
            return
        value = float(value)
        if not ((low < value if low_open else low <= value) and value < high):
            errors.add(ValueError)

    if name == "LazyAdam":
        real(values["lr"], 0.0, low_open=True)
        real(values["eps"], 0.0, low_open=True)
        betas = values["betas"]
        try:
            betas = tuple(betas)
        except TypeError:
            errors.add(TypeError)
        else:
            if len(betas) != 2:
                errors.add(ValueError)
            for beta in betas:
                real(beta, 0.0, high=1.0)
    else:
        for key, value in values.items():
            real(value, 0.0)
    return errors


def make_table_module(data, rng, scratch, dtype, hostile=False):
    """A trainable module; with ``hostile`` its table is unfit for an optimizer (read-only,
    Fortran-ordered, strided, a read-only memory map)."""
    num_embeddings, dim = data.draw(st.integers(2, 7)), data.draw(st.integers(2, 4))
    table = random_table(rng, num_embeddings, dim, dtype, "normal")
    layout = data.draw(st.sampled_from(["fortran", "readonly", "strided", "memmap_r"] if hostile
                                       else ["C", "C", "memmap_rw"]), label="layout")
    module_class = data.draw(st.sampled_from([fastemb.Embedding, fastemb.EmbeddingBag]))
    module = module_class.from_pretrained(place(table, layout, scratch), freeze=False,
                                          **({"mode": "sum"} if module_class is
                                             fastemb.EmbeddingBag else {}))
    writable = module.weight.flags.c_contiguous and module.weight.flags.writeable
    return module, writable


def reference_step(name, hyperparameters, weight, state, rows, g, step):
    if name == "SGD":
        sgd_step_ref(weight, rows, g, hyperparameters["lr"])
    elif name == "Adagrad":
        adagrad_step_ref(weight, state["sum"], rows, g, step, hyperparameters["lr"],
                         hyperparameters["lr_decay"], hyperparameters["eps"])
    elif name == "RowWiseAdagrad":
        rowwise_adagrad_step_ref(weight, state["sum"], rows, g, hyperparameters["lr"],
                                 hyperparameters["eps"])
    else:
        lazy_adam_step_ref(weight, state["exp_avg"], state["exp_avg_sq"], rows, g, step,
                           hyperparameters["lr"], hyperparameters["betas"],
                           hyperparameters["eps"], hyperparameters["maximize"])


def other_float(dtype):
    return np.dtype(np.float64) if dtype == np.float32 else np.dtype(np.float32)


def draw_step_gradient(data, rng, module, hostile=False):
    """Give ``module`` a gradient for the next step; returns (errors, expected (rows, values)
    or None). The expected gradient comes from the reference, not from ``grad.values``, so that
    the step runs its fused accumulate-and-update path on a gradient nobody has read yet."""
    num_embeddings, dim = module.weight.shape
    dtype = module.weight.dtype
    kind = data.draw(st.sampled_from(["other shape", "other dtype", "ndarray", "replaced table"]
                                     if hostile else ["backward"] * 3 + ["handmade", "none",
                                                                         "empty"]),
                     label="grad")
    module.grad = None
    if kind == "backward":
        indices = rng.integers(0, num_embeddings, size=(3, 2))
        out = module(indices)
        g = rng.standard_normal(out.shape).astype(dtype)
        if data.draw(st.integers(0, 4)) == 0:
            g.reshape(-1)[0] = np.inf
        module.backward(g)
        if isinstance(module, fastemb.EmbeddingBag):
            return set(), bag_grad_ref(module.weight, indices, g, mode="sum")
        return set(), embedding_grad_ref(indices, g, num_embeddings)
    if kind == "none":
        return set(), None
    if kind == "ndarray":
        module.grad = np.zeros(module.weight.shape, dtype)
        return {TypeError}, None
    if kind == "replaced table":  # same shape, other dtype: a state array no longer fits
        module.weight = module.weight.astype(other_float(dtype))
        rows, values = np.array([0]), np.ones((1, dim), module.weight.dtype)
        module.grad = fastemb.SparseGrad(rows, values, num_embeddings)
        return set(), (rows, values)  # (the step adds ValueError where there is state)
    rows = np.arange(0, num_embeddings, 2) if kind != "empty" else np.zeros(0, np.int64)
    values = rng.standard_normal((rows.size, dim)).astype(
        other_float(dtype) if kind == "other dtype" else dtype)
    module.grad = fastemb.SparseGrad(rows, values, num_embeddings + (kind == "other shape"))
    return ({ValueError} if kind in ("other shape", "other dtype") else set()), (rows, values)


@settings(max_examples=examples(5))
@given(data=st.data(), seed=seeds)
def test_optimizer_fuzz(scratch, data, seed):
    """Construct an optimizer from hostile modules and hyperparameters, then step with hostile
    gradients: each step equals the reference, or raises changing no table and no state."""
    rng = np.random.default_rng(seed)
    name = data.draw(st.sampled_from(sorted(OPTIMIZERS)), label="optimizer")
    cls, choices = OPTIMIZERS[name]
    hostile = hostile_targets(data, ["hyperparameters", "modules", "table"])
    hyperparameters = draw_hyperparameters(data, choices, "hyperparameters" in hostile)
    dtype = data.draw(st.sampled_from(FLOATS))
    count = data.draw(st.integers(1, 3))
    unfit = data.draw(st.integers(0, count - 1)) if "table" in hostile else -1
    made = [make_table_module(data, rng, scratch, dtype, i == unfit) for i in range(count)]
    modules = [module for module, _ in made]
    errors = hyperparameter_errors(name, hyperparameters)
    argument = data.draw(st.sampled_from(["empty", "twice", "none", "object"]
                                         if "modules" in hostile else
                                         ["list", "list", "single", "tuple"]),
                         label="modules argument")
    if argument == "single":
        modules = modules[:1]
        argument_value = modules[0]
    else:
        argument_value = {"list": modules, "tuple": tuple(modules), "empty": [],
                          "twice": modules + modules[:1], "none": None,
                          "object": modules + [object()]}[argument]
        errors |= {"empty": {ValueError}, "twice": {ValueError}, "none": {TypeError},
                   "object": {TypeError}}.get(argument, set())
    if argument not in ("none", "empty") and not all(writable for (module, writable) in made
                                      if module in modules):
        errors.add(ValueError)
    optimizer = run_case(f"{name} construction", errors,
                         lambda: cls(argument_value, **hyperparameters),
                         [m.weight for m in modules], lambda optimizer: None)
    if optimizer is None:
        return
    for _ in range(data.draw(st.integers(1, 3), label="steps")):
        errors, gradients = set(), []
        hostile_module = data.draw(st.sampled_from([None] * 2 + modules), label="hostile grad")
        for module in modules:
            grad_errors, gradient = draw_step_gradient(data, rng, module,
                                                       module is hostile_module)
            errors |= grad_errors
            if cls.state_arrays and module.weight.dtype != dtype:
                errors.add(ValueError)  # a replaced table does not fit the state
            gradients.append(gradient)
        saved = snapshot_optimizer(optimizer)
        expected = snapshot_optimizer(optimizer)
        for module, (weight, state), gradient in zip(modules, expected, gradients):
            if gradient is None:
                continue
            state["step"] += 1
            rows, values = gradient
            if rows.size:
                with np.errstate(all="ignore"):
                    reference_step(name, optimizer.hyperparameters, weight, state, rows, values,
                                   state["step"])

        def check(_):
            for module, (weight, state) in zip(modules, expected):
                assert_same_bits(module.weight, weight)
                for key, value in state.items():
                    if isinstance(value, np.ndarray):
                        assert_same_bits(optimizer.state[module][key], value)
                    else:
                        assert optimizer.state[module][key] == value

        if run_case(f"{name} step", errors, lambda: optimizer.step() or "stepped", [],
                    check) is None:
            assert_same_optimizer(optimizer, saved, f"{name} step")
            for module in modules:  # repair, then go on
                if module.weight.dtype != dtype:
                    module.weight = module.weight.astype(dtype)
                module.grad = None


def mutate_state_dict(data, rng, state_dict):
    """A copy of ``state_dict`` with one hostile change; returns (copy, errors)."""
    import copy
    mutated = copy.deepcopy(state_dict)
    states = mutated["state"]
    arrays = [k for k in states[0] if k != "step"]
    choices = ["none", "valid", "valid numpy step", "valid 0-d step", "missing key",
               "extra key", "negative step", "float step", "bool step", "array step",
               "states not a list", "state not a dict", "too few states", "too many states",
               "mixed keys", "hyperparameters missing", "hyperparameters none",
               "unknown hyperparameter", "bad hyperparameter", "not a dict"]
    if arrays:
        choices += ["wrong shape", "wrong dtype", "list array", "none array", "str array",
                    "nan array", "fortran array"]
    valid = {"valid", "valid numpy step", "valid 0-d step", "nan array", "fortran array"}
    hostile = data.draw(st.booleans(), label="hostile state_dict")
    choice = data.draw(st.sampled_from([c for c in choices if (c in valid) != hostile]),
                       label="state_dict change")
    key = data.draw(st.sampled_from(arrays)) if arrays else None
    if choice == "none":
        return None, {ValueError}
    if choice == "not a dict":
        return data.draw(st.sampled_from([[], "state", 3])), {ValueError}
    if choice == "valid":
        states[0]["step"] = int(rng.integers(0, 50))
        for name in arrays:
            states[0][name] = rng.random(states[0][name].shape).astype(states[0][name].dtype)
    elif choice == "valid numpy step":
        states[0]["step"] = np.int64(7)
    elif choice == "valid 0-d step":
        states[0]["step"] = np.array(4)
    elif choice == "missing key":
        del states[0]["step"]
    elif choice == "extra key":
        states[0]["extra"] = 1
    elif choice == "negative step":
        states[0]["step"] = -1
    elif choice == "float step":
        states[0]["step"] = 1.5
    elif choice == "bool step":
        states[0]["step"] = True
    elif choice == "array step":
        states[0]["step"] = np.array([1, 2])
    elif choice == "states not a list":
        mutated["state"] = 5
    elif choice == "state not a dict":
        states[0] = None
    elif choice == "too few states":
        mutated["state"] = states[:-1]
    elif choice == "too many states":
        mutated["state"] = states + states[:1]
    elif choice == "mixed keys":
        states[0][1] = 2
    elif choice == "hyperparameters missing":
        del mutated["hyperparameters"]
    elif choice == "hyperparameters none":
        mutated["hyperparameters"] = None
    elif choice == "unknown hyperparameter":
        mutated["hyperparameters"]["momentum"] = 0.9
    elif choice == "bad hyperparameter":
        mutated["hyperparameters"]["lr"] = data.draw(st.sampled_from([-1.0, "x", None]))
    elif choice == "wrong shape":
        states[0][key] = states[0][key][:-1]
    elif choice == "wrong dtype":
        states[0][key] = states[0][key].astype(np.float16)
    elif choice == "list array":
        states[0][key] = states[0][key].tolist()  # Python floats: float64
        if states[0][key] and np.asarray(states[0][key]).dtype == state_dict["state"][0][
                key].dtype:
            valid.add(choice)
    elif choice == "none array":
        states[0][key] = None
    elif choice == "str array":
        states[0][key] = "zeros"
    elif choice == "nan array":
        states[0][key] = np.full_like(states[0][key], np.nan)
    elif choice == "fortran array":
        states[0][key] = np.asfortranarray(rng.random(states[0][key].shape).astype(
            states[0][key].dtype))
    return mutated, (set() if choice in valid else {ValueError})


@settings(max_examples=examples(3))
@given(data=st.data(), seed=seeds)
def test_load_state_dict_fuzz(scratch, data, seed):
    rng = np.random.default_rng(seed)
    name = data.draw(st.sampled_from(sorted(OPTIMIZERS)), label="optimizer")
    dtype = data.draw(st.sampled_from(FLOATS))
    modules = [fastemb.Embedding(int(rng.integers(2, 6)), int(rng.integers(1, 4)), seed=i,
                                 dtype=dtype) for i in range(data.draw(st.integers(1, 2)))]
    optimizer = OPTIMIZERS[name][0](modules, **({"lr": 0.1} if name == "SGD" else {}))
    for module in modules:  # some state worth keeping
        module.backward(np.ones_like(module([0, 1])))
    optimizer.step()
    state_dict, errors = mutate_state_dict(data, rng, optimizer.state_dict())
    saved = snapshot_optimizer(optimizer)
    hyperparameters = dict(optimizer.hyperparameters)

    def check(_):
        for module, state in zip(modules, state_dict["state"]):
            for key, value in state.items():
                now = optimizer.state[module][key]
                if key == "step":
                    assert now == int(np.asarray(value)) and isinstance(now, int)
                else:
                    assert now.flags.c_contiguous and now is not value
                    assert_same_bits(now, np.asarray(value))
        assert optimizer.hyperparameters == hyperparameters

    if run_case(f"{name} load_state_dict", errors,
                lambda: optimizer.load_state_dict(state_dict) or "loaded", [state_dict],
                check) is None:
        assert_same_optimizer(optimizer, saved, "load_state_dict")
        assert optimizer.hyperparameters == hyperparameters
