# cython: language_level=3
"""fastemb._core: the entry to fastemb's compute kernels, in typed Cython with OpenMP.

The kernels live in modules by concern, sharing declarations and inline helpers through
``_common.pxd`` and C through ``_core.h``: ``_lookup`` (gather, bag reductions, a collection's
bags and rows in one call, max_norm, the lookups' index checks), ``_grouping`` (the radix sort
by row, of one table or of a collection's tables), ``_training`` (sparse gradients, the fused
optimizer steps of one table or of many in one call), ``_quantized`` (quantized tables: quantization and their
lookups) and ``_allocator`` (the block cache). This module gives their
functions in one place, with the build information; ``_core_avx2`` and ``_core_avx512`` are the
same entry over the kernels compiled with -mavx2 (``_lookup_avx2``, ...) and with AVX-512
(``_lookup_avx512``, ...), and ``fastemb/_kernels.py`` picks one.

Rules every kernel follows:

- It is called by the Python layer (``fastemb/functional.py`` and friends) after all validation;
  the ``def`` wrapper only checks that the arrays fit together, with the GIL held, and then runs
  the loop with the GIL released. Two entries check their arguments themselves:
  ``bag_forward_common`` and ``quantized_bag_forward_common``, embedding_bag's common case in
  one call (float and quantized tables; their parsing is ``_bag_call.pxi``), which decline
  (return None) anything they do not fully check, for the Python layer to convert or explain.
- It is parallel over *output rows* with ``prange``: each output row is written by exactly one
  iteration (owner computes), in a fixed order, so the result is bitwise identical for any
  thread count and schedule. The schedule is dynamic where the work per iteration varies (the
  gradient sums and updates over unique rows, by thousands of times; chunks of bags, and the
  tables of a collection) or a core of a shared machine may lag, static elsewhere.
- It is memory safe whatever it is handed: a row index outside ``[0, V)`` is skipped (treated like
  padding) and bag bounds are clamped into ``[0, n]``. The Python layer rejects such input before
  any kernel writes memory the caller holds (a lookup, whose output is fresh, counts the bad
  indices as it reads them and the Python layer raises afterwards), so these guards never change
  a validated result.

Notation: ``V`` rows and ``D`` columns in the table (weight), ``n`` looked-up indices, ``B`` bags.
"""

import importlib

from fastemb._common cimport (FASTEMB_COMPILE_FLAGS, FASTEMB_HAVE_OPENMP, fastemb_cpu_has_avx2,
                              fastemb_cpu_has_avx512, omp_get_max_threads)

from fastemb._common import BagMode, HalfFormat, StepMethod

# --------------------------------------------------------------------------------------------
# Build and runtime information
# --------------------------------------------------------------------------------------------

def has_openmp():
    """True when this module was compiled with OpenMP (parallel kernels)."""
    return bool(FASTEMB_HAVE_OPENMP)


def openmp_max_threads():
    """``omp_get_max_threads()``: OMP_NUM_THREADS, the CPU count, or a threadpoolctl limit."""
    return omp_get_max_threads()


def cpu_has_avx2():
    """True when the CPU running this process has AVX2, F16C and FMA (so _core_avx2 may be
    used)."""
    return bool(fastemb_cpu_has_avx2())


def cpu_has_avx512():
    """True when the CPU running this process has AVX-512 F, BW, VL and DQ (so _core_avx512 may
    be used)."""
    return bool(fastemb_cpu_has_avx512())


def compile_flags():
    """The C compiler flags this module was built with."""
    return FASTEMB_COMPILE_FLAGS.decode()


# --------------------------------------------------------------------------------------------
# The kernels of this build (portable, AVX2 for _core_avx2, AVX-512 for _core_avx512), from
# their modules
# --------------------------------------------------------------------------------------------

VARIANT_SUFFIX = next((suffix for suffix in ("_avx2", "_avx512") if __name__.endswith(suffix)), "")
KERNEL_MODULES = tuple(importlib.import_module(f"fastemb.{name}{VARIANT_SUFFIX}")
                       for name in ("_lookup", "_grouping", "_training", "_quantized"))
KERNEL_MODULES += (importlib.import_module("fastemb._allocator"),)
for _module in KERNEL_MODULES:
    globals().update({name: getattr(_module, name) for name in _module.__all__})
