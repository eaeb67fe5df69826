"""The speed-of-light reference: plain C loops (``speed_of_light.c``, compiled with gcc at
run time, with the flags of fastemb's own kernels) that move only the table bytes an operation
cannot avoid. A kernel's time relative to it is how close the kernel is to what memory allows.
"""

import ctypes
import functools
import pathlib
import shlex
import shutil
import subprocess
import tempfile

import numpy as np

from .._config import get_num_threads
from .._kernels import kernels as _core
from .._dtypes import bfloat16_dtype
from .._memory import aligned_full
from .workloads import (FORWARD_OPERATIONS, REDUCED_PRECISION_OPERATIONS,
                        REDUCED_PRECISION_STEP_OPERATIONS, aligned_copy, step_state_arrays,
                        table_format, trained_table)

SPEED_OF_LIGHT_SOURCE = pathlib.Path(__file__).with_name("speed_of_light.c")
SPEED_OF_LIGHT_SINK_WORDS = 17  # LANES + 1 in the C source




def compile_c_library(source):
    """Compile C ``source`` (text) into a shared library and load it with ctypes; None when
    gcc is not installed.

    It is built with the flags fastemb's kernels were built with (as ``fastemb.show_config()``
    reports them; by default the portable ``-O3 -ffp-contract=off -fopenmp``), so comparisons
    with it are between loops, not compiler settings.
    """
    compiler = shutil.which("gcc")
    if compiler is None:
        return None
    flags = shlex.split(_core.compile_flags()) + ["-shared", "-fPIC"]
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory) / "library.so"
        subprocess.run([compiler, *flags, "-o", str(path), "-x", "c", "-"], input=source,
                       text=True, check=True, capture_output=True)
        return ctypes.CDLL(str(path))  # the loaded library outlives its file


@functools.cache
def speed_of_light_library():
    """The compiled ``speed_of_light.c`` with its argument types set (built once per process),
    or None when gcc is not installed."""
    library = compile_c_library(SPEED_OF_LIGHT_SOURCE.read_text())
    if library is None:
        return None
    i64, pointer, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    library.sol_read.argtypes = [pointer, i64, pointer, i64, pointer, c_int]
    library.sol_copy.argtypes = [pointer, i64, pointer, i64, pointer, c_int]
    library.sol_update.argtypes = [pointer, pointer, c_int, pointer, i64, c_int]
    for function in (library.sol_read, library.sol_copy, library.sol_update):
        function.restype = None
    return library


def speed_of_light_callable(operation, data):
    """The speed-of-light reference for ``operation``: plain parallel C loops (on fastemb's
    thread count) that move only the table-sized bytes the operation cannot avoid.

    - ``gather``: copy the looked-up rows into a preallocated buffer;
    - the bag reductions: read the looked-up rows (of the 16-bit or quantized table, for the
      reduced-precision bag sums);
    - ``forward_backward``: read the looked-up rows, then write one row of ``grad_output`` per
      unique index into a preallocated gradient;
    - the training steps: read the looked-up rows of a private copy of the table, then read and
      write once each unique row of that copy and of the optimizer's state arrays; a table
      trained in reduced precision is stored as its step stores it (16-bit rows; a split
      table's bfloat16 high halves, which the forward reads, and its low halves). Each call
      adds 1 to every 32-bit word of those rows and returns the arrays.

    Small reads (offsets, per-sample weights, ``grad_output``) and the work of finding the
    unique rows are not counted. Its result is not checked. Raises RuntimeError without gcc.
    """
    library = speed_of_light_library()
    if library is None:
        raise RuntimeError("the speed-of-light reference needs gcc, which is not installed")
    indices, dim = data.indices, data.workload.dim
    sink = np.zeros(SPEED_OF_LIGHT_SINK_WORDS, dtype=np.uint32)

    def read(table):
        # (a 16-bit or quantized table's rows as as many bytes of float32: the bench's dims make
        # a quantized row, D + 8 or D / 2 + 4 bytes, whole words)
        words = table.view(np.float32)
        library.sol_read(words.ctypes.data, words.shape[1], indices.ctypes.data, indices.size,
                         sink.ctypes.data, get_num_threads())

    if operation == "gather":
        out = np.empty((indices.size, dim), dtype=np.float32)

        def copy_rows():
            library.sol_copy(data.table.ctypes.data, dim, indices.ctypes.data, indices.size,
                             out.ctypes.data, get_num_threads())
            return out

        return copy_rows
    if operation in FORWARD_OPERATIONS:
        return lambda: read(data.table)
    if operation in REDUCED_PRECISION_OPERATIONS:  # (a quantized table: its prepacked bytes)
        table = data.table_for(operation)
        return lambda: read(table.data if table_format(operation).quantized else table)
    rows, first = np.unique(indices, return_index=True)
    if operation == "forward_backward":
        source_bags = np.searchsorted(data.offsets, first, side="right") - 1
        values = np.empty((rows.size, dim), dtype=np.float32)

        def forward_backward():
            read(data.table)
            library.sol_copy(data.grad_output.ctypes.data, dim, source_bags.ctypes.data,
                             rows.size, values.ctypes.data, get_num_threads())
            return values

        return forward_backward
    arrays = step_table_arrays(operation, data)
    arrays += [aligned_full(data.table.shape, 0, data.table.dtype)
               for _ in range(step_state_arrays(operation))]
    pointers = (ctypes.c_void_p * len(arrays))(*(array.ctypes.data for array in arrays))
    row_words = np.array([array.shape[1] * array.itemsize // 4 for array in arrays])

    def step():
        read(arrays[0])
        library.sol_update(pointers, row_words.ctypes.data, len(arrays), rows.ctypes.data,
                           rows.size, get_num_threads())
        return arrays

    return step


def step_table_arrays(operation, data):
    """A training step's table as the step stores it, in fresh arrays on cache lines: the
    float32 table, the 16-bit one, or a split one's bfloat16 high halves (what the forward
    reads, first) and low halves."""
    if operation not in REDUCED_PRECISION_STEP_OPERATIONS:
        return [aligned_copy(data.table)]
    dtype, split = trained_table(operation)
    if split:
        return [aligned_copy(data.table.astype(bfloat16_dtype())),
                aligned_full(data.table.shape, 0, np.uint16)]
    return [aligned_copy(data.table.astype(dtype))]
