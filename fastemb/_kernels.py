"""Which compiled kernels run: ``fastemb._core`` (portable x86-64) or ``fastemb._core_avx2``
(the same source compiled with -mavx2, identical results, 256-bit vectors), chosen once at
import: the AVX2 build when it exists and the CPU has AVX2, unless ``FASTEMB_KERNELS=portable``.
"""

import os

from . import _core as portable


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
