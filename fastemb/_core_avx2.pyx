# cython: language_level=3
# The entry of the kernels compiled with -mavx2 (see setup.py): _core.pyx again, which takes the
# kernels of its build (_lookup_avx2, ...) by its module name. fastemb/_kernels.py picks it on
# CPUs with AVX2.
include "_core.pyx"
