"""Build fastemb's compiled modules (the kernels, ``fastemb._core`` and the modules it gathers,
and the ratings parser ``fastemb._text``) with OpenMP when the compiler has it.

Environment variables (all optional):

- ``FASTEMB_NO_OPENMP=1``: build without OpenMP (every kernel then runs serially).
- ``FASTEMB_DEBUG=1``: Cython bounds checks and ``-O0 -g``, for hunting memory errors.
- ``FASTEMB_EXTRA_CFLAGS="-march=native ..."``: extra compiler flags, appended last.

The kernels are built three times from one source: ``fastemb._core`` with ``_lookup``,
``_grouping``, ``_training`` and ``_quantized`` (portable x86-64) and, where the compiler accepts the flags,
``fastemb._core_avx2`` with ``_lookup_avx2``, ... (``-mavx2``: 256-bit vectors) and
``fastemb._core_avx512`` with ``_lookup_avx512``, ... (AVX-512: 512-bit vectors);
``fastemb/_kernels.py`` picks the widest the CPU has at import time. All give the same results
bit for bit: ``-ffp-contract=off`` forbids the compiler to fuse a multiply and an add (the
quantized tables' fused multiply-add is explicit, and correctly rounded in every build)
and nothing reassociates.
``_common`` (the kernels' enums) and ``_allocator`` (the block cache) are built once.

OpenMP is detected the way scikit-learn's setuptools build did it: a tiny OpenMP program is
compiled, linked and *run* with the compiler setuptools will use; only if it prints one line per
thread is OpenMP enabled. Otherwise the build goes on, serial, with a visible warning.
"""

import os
import shlex
import subprocess
import tempfile
import textwrap
import warnings

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_FLAG = "-fopenmp"
# -ffp-contract=off: a*b+c is never fused unless the code says so (the quantized tables'
# values, correctly rounded in every build), so results do not depend on the target CPU's FMA.
# -fno-math-errno: sqrt need not set errno, so it vectorises (results are unchanged).
BASE_FLAGS = ["-ffp-contract=off", "-fno-math-errno"]
OPTIMISE_FLAGS = ["-O3"]
DEBUG_FLAGS = ["-O0", "-g"]

# The kernel builds besides the portable one: module-name suffix -> compiler flags.
VARIANT_FLAGS = {
    # (F16C: float16 conversions; FMA: the quantized tables' fused multiply-add, explicit only;
    # every AVX2 CPU has both, as x86-64-v3 says)
    "_avx2": ["-mavx2", "-mf16c", "-mfma"],
    "_avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mf16c", "-mfma"],  # v4
}
KERNEL_MODULES = ("_core", "_lookup", "_grouping", "_training", "_quantized")
TRIVIAL_PROGRAM = "int main(void) { return 0; }\n"

OPENMP_TEST_PROGRAM = textwrap.dedent(
    """\
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        #pragma omp parallel
        printf("nthreads=%d\\n", omp_get_num_threads());
        return 0;
    }
    """
)


def env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def compiler_accepts(compiler, flags):
    """True if the compiler builds a trivial program with ``flags`` (a list)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "test_flag.c")
        with open(source, "w") as handle:
            handle.write(TRIVIAL_PROGRAM)
        try:
            compiler.compile([source], output_dir=tmp, extra_postargs=flags)
        except Exception:  # a flag is unknown to this compiler (or this architecture)
            return False
    return True


def compiler_runs_openmp(compiler):
    """Compile, link and run a small OpenMP program; True if every thread reported in."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "test_openmp.c")
        with open(source, "w") as handle:
            handle.write(OPENMP_TEST_PROGRAM)
        try:
            objects = compiler.compile([source], output_dir=tmp, extra_postargs=[OPENMP_FLAG])
            executable = os.path.join(tmp, "test_openmp")
            compiler.link_executable(objects, executable, extra_postargs=[OPENMP_FLAG])
            output = subprocess.run(
                [executable], capture_output=True, text=True, check=True, timeout=60
            ).stdout.splitlines()
        except Exception:  # any compile, link or run failure means "no usable OpenMP"
            return False
    if not output or not output[0].startswith("nthreads="):
        return False
    return len(output) == int(output[0].split("=")[1])


class BuildExtWithOpenMP(build_ext):
    """build_ext that probes OpenMP and records the flags it used inside the module."""

    def build_extensions(self):
        if env_flag("FASTEMB_NO_OPENMP"):
            use_openmp = False
            print("fastemb: FASTEMB_NO_OPENMP is set, building without OpenMP (serial kernels)")
        else:
            use_openmp = compiler_runs_openmp(self.compiler)
            if not use_openmp:
                warnings.warn(
                    "fastemb: the C compiler cannot build and run OpenMP programs; building "
                    "WITHOUT OpenMP. Every kernel will run on one thread. Install an OpenMP "
                    "runtime (e.g. libgomp with gcc) and rebuild for parallel kernels.",
                    stacklevel=1,
                )
        compile_flags = BASE_FLAGS + (DEBUG_FLAGS if env_flag("FASTEMB_DEBUG") else OPTIMISE_FLAGS)
        link_flags = []
        if use_openmp:
            compile_flags.append(OPENMP_FLAG)
            link_flags.append(OPENMP_FLAG)
        compile_flags += shlex.split(os.environ.get("FASTEMB_EXTRA_CFLAGS", ""))
        variant_flags = {}
        for suffix, flags in VARIANT_FLAGS.items():
            if compiler_accepts(self.compiler, flags):
                variant_flags[suffix] = flags
            else:
                print(f"fastemb: the compiler does not accept {' '.join(flags)}; "
                      f"not building the {suffix[1:]} kernels")
                self.extensions = [ext for ext in self.extensions if not ext.name.endswith(suffix)]
        for ext in self.extensions:
            suffix = next((s for s in VARIANT_FLAGS if ext.name.endswith(s)), None)
            flags = compile_flags + variant_flags.get(suffix, [])
            recorded = " ".join(flags).replace("\\", "\\\\").replace('"', '\\"')
            ext.extra_compile_args = flags
            ext.extra_link_args = link_flags
            ext.define_macros.append(("FASTEMB_COMPILE_FLAGS", f'"{recorded}"'))
        self.parallel = self.parallel or len(self.extensions)  # compile the modules side by side
        super().build_extensions()


debug_build = env_flag("FASTEMB_DEBUG")
extensions = cythonize(
    [
        # numpy's headers: the modules install a NumPy allocator (PyDataMem_Handler)
        Extension(name, [source], include_dirs=[numpy.get_include()],
                  define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")])
        for name, source in [(f"fastemb.{module}", f"fastemb/{module}.pyx") for module in (
            [kernels + suffix for kernels in KERNEL_MODULES for suffix in ("", *VARIANT_FLAGS)]
            + ["_common", "_allocator", "_text"])]
    ],
    compiler_directives={
        "language_level": 3,
        "boundscheck": debug_build,
        "wraparound": False,
        "initializedcheck": debug_build,
        "cdivision": True,
        "nonecheck": False,
        "embedsignature": True,
    },
    # A debug build must not reuse C generated without bounds checks, and vice versa.
    force=True,
    quiet=True,
    nthreads=2,
)

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExtWithOpenMP})
