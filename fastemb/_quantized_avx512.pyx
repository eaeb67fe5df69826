# cython: language_level=3
# The kernels of _quantized.pyx compiled again with AVX-512 (see setup.py): the same source, so
# the same results bit for bit, with wider vectors. fastemb._core_avx512 gives them.
include "_quantized.pyx"
