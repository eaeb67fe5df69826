"""Which compiled kernels run: ``fastemb._core`` (portable x86-64), ``fastemb._core_avx2`` (the
same source compiled with -mavx2: 256-bit vectors) or ``fastemb._core_avx512`` (with AVX-512:
512-bit vectors), all with identical results. Chosen once at import: the widest build that
exists and that the CPU runs, or the one ``FASTEMB_KERNELS`` names (portable, avx2, avx512)
when it can run.
"""

import importlib
import os

try:
    from . import _core as portable
except ImportError as error:  # the source folder, never built: say what to do
    raise ImportError(
        f"fastemb's compiled kernels are not built in {os.path.dirname(__file__)}: Python is "
        f"importing the source folder (it comes first when you run from the repository's "
        f"root). Build them in place with `pip install -e .`, or run from another folder "
        f"after `pip install .`."
    ) from error

# The vector builds, widest first: name -> (module, whether this CPU runs it).
VECTOR_BUILDS = {
    "avx512": ("fastemb._core_avx512", portable.cpu_has_avx512),
    "avx2": ("fastemb._core_avx2", portable.cpu_has_avx2),
}


def available_builds():
    """The kernel builds this installation has and this CPU runs, as {name: module}, widest
    first; "portable" always.

    >>> "portable" in available_builds()
    True
    """
    builds = {}
    for name, (module_name, cpu_runs_it) in VECTOR_BUILDS.items():
        if cpu_runs_it():
            try:
                builds[name] = importlib.import_module(module_name)
            except ImportError:  # built without it (a compiler without the flags)
                pass
    builds["portable"] = portable
    return builds


def _select():
    builds = available_builds()
    wanted = os.environ.get("FASTEMB_KERNELS", "").strip().lower()
    if wanted in builds:
        return wanted, builds[wanted]
    return next(iter(builds.items()))


variant, kernels = _select()
