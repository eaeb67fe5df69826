"""Thread count control, bitwise determinism across thread counts, the OpenMP build, the
configuration report, and the doctests of the public modules."""

import doctest
import io
import os
import shutil
import subprocess

import numpy as np
import pytest
from reference import assert_same_bits, embedding_bag_ref, renorm_ref

import fastemb
import fastemb._config
import fastemb._kernels
import fastemb.functional
import fastemb.modules
from fastemb import _core

NUM_BAGS = 5000
V, D = 3000, 24


@pytest.fixture(scope="module")
def big_case():
    """5,000 bags of 0 to 24 entries over a 3,000-row table: enough work for every thread."""
    rng = np.random.default_rng(11)
    lengths = rng.integers(0, 25, size=NUM_BAGS)
    lengths[::50] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    indices = rng.integers(0, V, size=int(lengths.sum()))
    indices[::13] = 7  # padding entries
    weights = {dtype: rng.standard_normal((V, D)).astype(dtype)
               for dtype in (np.float32, np.float64)}
    psw = rng.standard_normal(indices.size)
    return indices, offsets, weights, psw


def run_all_ops(indices, offsets, weights, psw):
    """Every forward op on the big case; returns a list of result arrays."""
    results = []
    for dtype, weight in weights.items():
        results.append(fastemb.embedding(indices.reshape(-1, 1), weight))
        sample_weights = psw.astype(dtype)
        for mode in ("sum", "mean", "max"):
            for padding_idx in (None, 7):
                forward = fastemb.functional.bag_forward(indices, weight, offsets, mode=mode,
                                                         padding_idx=padding_idx)
                results.append(forward.output)
                if mode == "max":
                    results.append(forward.winners)
                else:
                    results.append(fastemb.embedding_bag(
                        indices, weight, offsets, mode=mode, padding_idx=padding_idx,
                        per_sample_weights=sample_weights))
        for norm_type in (2.0, 1.0, np.inf):
            renormed = weight.copy()
            results.append(fastemb.embedding(indices, renormed, max_norm=1.5,
                                             norm_type=norm_type))
            results.append(renormed)
    return results


@pytest.mark.skipif(not _core.has_openmp(), reason="a serial build always runs one thread")
def test_results_do_not_depend_on_the_thread_count(big_case, threads):
    with threads(1):
        assert fastemb.get_num_threads() == 1
        serial = run_all_ops(*big_case)
    for count in (2, 3):
        with threads(count):
            assert fastemb.get_num_threads() == count
            parallel = run_all_ops(*big_case)
        assert len(parallel) == len(serial)
        for number, (one, many) in enumerate(zip(serial, parallel)):
            if one.dtype.kind == "f":
                assert_same_bits(many, one, nan_payload=True)
            else:
                np.testing.assert_array_equal(many, one, err_msg=f"result {number}")


def test_parallel_results_match_the_reference(big_case, threads):
    indices, offsets, weights, psw = big_case
    weight = weights[np.float32]
    with threads(2):
        for mode in ("sum", "mean"):
            expected, _ = embedding_bag_ref(indices, weight, offsets, mode,
                                            psw.astype(np.float32), padding_idx=7)
            assert_same_bits(fastemb.embedding_bag(indices, weight, offsets, mode,
                                                   psw.astype(np.float32), padding_idx=7),
                             expected)
        forward = fastemb.functional.bag_forward(indices, weight, offsets, "max")
        expected, winners = embedding_bag_ref(indices, weight, offsets, "max")
        assert_same_bits(forward.output, expected)
        np.testing.assert_array_equal(forward.winners, winners)
        renormed = weight.copy()
        fastemb.embedding(indices, renormed, max_norm=4.0)
        assert_same_bits(renormed, renorm_ref(weight, indices, 4.0))


# --------------------------------------------------------------------------------------------
# Thread count control
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, exception", [(0, ValueError), (-1, ValueError),
                                            (1.5, TypeError), ("2", TypeError),
                                            (True, TypeError)])
def test_set_num_threads_rejects(bad, exception):
    before = fastemb.get_num_threads()
    with pytest.raises(exception):
        fastemb.set_num_threads(bad)
    assert fastemb.get_num_threads() == before


@pytest.mark.skipif(not _core.has_openmp(), reason="a serial build always runs one thread")
def test_set_num_threads(threads):
    default = fastemb.get_num_threads()
    assert default >= 1
    for count in (1, 3, np.int64(2)):
        fastemb.set_num_threads(count)
        assert fastemb.get_num_threads() == count
    fastemb.set_num_threads(None)
    assert fastemb.get_num_threads() == default


@pytest.mark.skipif(not _core.has_openmp(), reason="a serial build always runs one thread")
def test_threadpoolctl_limits_apply_without_an_explicit_count():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    fastemb.set_num_threads(None)
    default = fastemb.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1):
        assert fastemb.get_num_threads() == 1
    with threadpoolctl.threadpool_limits(limits=3, user_api="openmp"):
        assert fastemb.get_num_threads() == 3
    assert fastemb.get_num_threads() == default


def test_serial_build_runs_one_thread():
    if _core.has_openmp():
        pytest.skip("this build has OpenMP")
    fastemb.set_num_threads(4)
    assert fastemb.get_num_threads() == 1


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------

OPENMP_PROGRAM = r"""
#include <omp.h>
#include <stdio.h>
int main(void) {
    int threads = 0;
    #pragma omp parallel num_threads(2)
    {
        #pragma omp atomic
        threads += 1;
    }
    printf("%d\n", threads);
    return 0;
}
"""


def test_openmp_is_compiled_in_when_the_compiler_has_it(tmp_path):
    if os.environ.get("FASTEMB_NO_OPENMP", "").strip().lower() not in ("", "0", "false", "no"):
        # a deliberately serial build: make sure it is one (CI tests this build too)
        assert not _core.has_openmp(), "FASTEMB_NO_OPENMP is set, but the module has OpenMP"
        return
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    source = tmp_path / "omp.c"
    source.write_text(OPENMP_PROGRAM)
    program = tmp_path / "omp"
    build = subprocess.run([gcc, "-fopenmp", str(source), "-o", str(program)],
                           capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"gcc cannot build OpenMP programs: {build.stderr.strip()[:200]}")
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
    if run.returncode != 0 or run.stdout.strip() != "2":
        pytest.skip(f"OpenMP programs do not run here: {run.stdout!r} {run.stderr!r}")
    assert _core.has_openmp(), "gcc has OpenMP, but fastemb._core was built without it"
    assert "-fopenmp" in _core.compile_flags()


def test_show_config():
    buffer = io.StringIO()
    fastemb.show_config(file=buffer)
    text = buffer.getvalue()
    lowered = text.lower()
    assert fastemb.__version__ in text
    assert "openmp" in lowered and "thread" in lowered
    openmp_line = next(line for line in lowered.splitlines() if "openmp" in line)
    assert ("yes" in openmp_line) == _core.has_openmp()
    thread_line = next(line for line in lowered.splitlines() if "thread" in line
                       and "openmp" not in line)
    assert str(fastemb.get_num_threads()) in thread_line
    assert _core.compile_flags() in text


def test_show_config_reports_the_requested_thread_count(threads):
    if not _core.has_openmp():
        pytest.skip("a serial build always reports one thread")
    with threads(3):
        buffer = io.StringIO()
        fastemb.show_config(file=buffer)
    thread_line = next(line for line in buffer.getvalue().lower().splitlines()
                       if "thread" in line and "openmp" not in line)
    assert "3" in thread_line


def test_show_config_prints_to_stdout(capsys):
    fastemb.show_config()
    assert "openmp" in capsys.readouterr().out.lower()


# --------------------------------------------------------------------------------------------
# Doctests
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", [fastemb.functional, fastemb.modules, fastemb._config],
                         ids=lambda m: m.__name__)
def test_doctests(module):
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0, f"{module.__name__} has no doctests"
    assert results.failed == 0


# --------------------------------------------------------------------------------------------
# The kernel builds (portable, AVX2, AVX-512) must give the same bits.
# --------------------------------------------------------------------------------------------

def _kernel_builds():
    builds = fastemb._kernels.available_builds()
    if len(builds) < 2:
        pytest.skip("this installation or CPU has only the portable kernels")
    return list(builds.values())


# full column blocks and a tail in every build; 128 float32: AVX-512's 512-byte narrow block
@pytest.mark.parametrize("dim", [77, 128, 200, 300])
def test_vector_and_portable_kernels_agree_bitwise(dtype, dim):
    builds = _kernel_builds()
    rng = np.random.default_rng(5)
    num_rows = 500
    weight = rng.standard_normal((num_rows, dim)).astype(dtype)
    indices = rng.integers(0, num_rows, 3000)
    bounds = np.concatenate([[0], np.sort(rng.integers(0, 3000, 199)), [3000]]).astype(np.int64)
    sample_weights = rng.standard_normal(3000).astype(dtype)
    grad = rng.standard_normal((indices.size, dim)).astype(dtype)
    results = []
    for build in builds:
        outputs = []
        for mode, weights in [("sum", None), ("sum", sample_weights), ("mean", sample_weights),
                              ("mean", None), ("max", None)]:
            out = np.empty((bounds.size - 1, dim), dtype)
            winners = np.empty(out.shape, np.int64) if mode == "max" else None
            build.bag_reduce(weight, indices, bounds, build.BagMode["BAG_" + mode.upper()],
                             weights, 3, out, winners, 2)
            outputs += [out] + ([winners] if winners is not None else [])
        rows, starts, order = build.group_by_row(indices, num_rows, 3, 2)
        state = [np.full_like(weight, 0.5), np.full_like(weight, 0.25)]
        table = weight.copy()
        plan = fastemb.sparse.GradientPlan(grad, starts, order)
        build.sparse_step(build.StepMethod.STEP_ADAM, table, *state, rows, plan, -0.01, 0.1,
                          0.001, 1e-8, False, 0.0, 2)
        outputs += [table, *state]
        results.append(outputs)
    for outputs in zip(*results):
        for output in outputs[1:]:
            assert output.tobytes() == outputs[0].tobytes()


def test_version_option_and_public_names_only_in_dir_optim(capsys):
    from fastemb.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastemb {fastemb.__version__}"
    assert dir(fastemb.optim) == ["Adagrad", "LazyAdam", "OPTIMIZERS", "OptimizerInfo",
                                  "RowWiseAdagrad", "SGD"]


def test_package_ships_type_information_and_its_license():
    import importlib.resources
    import pathlib

    assert importlib.resources.files("fastemb").joinpath("py.typed").is_file()
    root = pathlib.Path(__file__).resolve().parents[1]
    assert "BSD 3-Clause" in (root / "LICENSE").read_text()
    assert 'license = "BSD-3-Clause"' in (root / "pyproject.toml").read_text()
    hints = fastemb.embedding_bag.__annotations__
    assert hints["return"] == "np.ndarray" and "weight" in hints


def test_importing_the_unbuilt_source_folder_says_how_to_build_it(tmp_path):
    """The source folder without its compiled modules (a fresh clone, run from its root)."""
    import pathlib
    import sys

    source = pathlib.Path(fastemb.__file__).parent
    shutil.copytree(source, tmp_path / "fastemb", ignore=shutil.ignore_patterns("*.so", "*.c"))
    # (an editable install's import hook would find the built checkout first: drop it)
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
            "str(getattr(f, '__module__', ''))]; import fastemb")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert "pip install -e ." in result.stderr and "not built" in result.stderr, result.stderr
