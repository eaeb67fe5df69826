# cython: language_level=3
"""fastemb._common: the kernels' enums (``BagMode``, ``HalfFormat``, ``StepMethod``) for
Python; the shared declarations and inline helpers are in ``_common.pxd``."""
