# cython: language_level=3
# The kernels of _quantized.pyx compiled again with -mavx2 (see setup.py): the same source, so
# the same results bit for bit, with wider vectors. fastemb._core_avx2 gives them.
include "_quantized.pyx"
