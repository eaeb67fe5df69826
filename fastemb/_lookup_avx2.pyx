# cython: language_level=3
# The kernels of _lookup.pyx compiled again with -mavx2 (see setup.py): the same source, so the
# same results bit for bit, with 256-bit vectors. fastemb._core_avx2 gives them.
include "_lookup.pyx"
