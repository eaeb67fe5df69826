"""Which compiled kernels run: ``fastemb._core`` (portable x86-64) or ``fastemb._core_avx2``
(the same source compiled with -mavx2, identical results, 256-bit vectors), chosen once at
import: the AVX2 build when it exists and the CPU has AVX2, unless ``FASTEMB_KERNELS=portable``.
"""

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


def _select():
    if os.environ.get("FASTEMB_KERNELS", "").strip().lower() == "portable":
        return portable
    if portable.cpu_has_avx2():
        try:
            from . import _core_avx2
        except ImportError:  # built without it (compiler without -mavx2)
            return portable
        return _core_avx2
    return portable


kernels = _select()
variant = "avx2" if kernels is not portable else "portable"
