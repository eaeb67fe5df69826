# cython: language_level=3
# The kernels of _core.pyx compiled again with -mavx2 (see setup.py): the same source, so the
# same results bit for bit, with 256-bit vectors. fastemb/_kernels.py picks it on CPUs with AVX2.
include "_core.pyx"
