"""Thread count and build information."""

from __future__ import annotations

import platform
import sys

import numpy as np

from ._kernels import kernels as _core
from ._kernels import variant

__version__ = "0.1.0"


def set_num_threads(n: int | None) -> None:
    """Set how many OpenMP threads fastemb's kernels use; ``None`` restores the default.

    The default is what OpenMP would use: ``OMP_NUM_THREADS``, else the CPU count, and a
    ``threadpoolctl.threadpool_limits`` in force lowers it. Results are bitwise identical for
    any thread count. A build without OpenMP always runs one thread.

    >>> import fastemb
    >>> fastemb.set_num_threads(1)
    >>> fastemb.get_num_threads()
    1
    >>> fastemb.set_num_threads(None)
    """
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"num_threads must be an int or None, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"num_threads must be >= 1, got {n}")
        n = int(n)
    _core.set_requested_threads(0 if n is None else n)  # (the kernels' module keeps it)


def get_num_threads() -> int:
    """The number of threads the next kernel call will use.

    >>> import fastemb
    >>> fastemb.get_num_threads() >= 1
    True
    """
    return _core.get_num_threads()


# Threads for a kernel call that touches about ``work`` table elements: get_num_threads(), or
# one for a call too small to gain from more.
threads_for = _core.threads_for


def show_config(file=None) -> None:
    """Print the version, whether OpenMP is compiled in, the thread count and compiler flags.

    >>> import fastemb
    >>> fastemb.show_config()  # doctest: +ELLIPSIS
    fastemb ...
    """
    kept_blocks, kept_bytes, _ = _core.block_cache_state()
    lines = [
        f"fastemb {__version__}",
        f"python {platform.python_version()}, numpy {np.__version__}",
        f"openmp: {'yes' if _core.has_openmp() else 'no (kernels run serially)'}",
        f"kernels: {variant} ({_core.__name__})",
        f"threads: {get_num_threads()}",
        f"compiler flags: {_core.compile_flags()}",
        f"memory kept for reuse: {kept_blocks} blocks, {kept_bytes / 2**20:.1f} MB",
    ]
    print("\n".join(lines), file=file if file is not None else sys.stdout)
