# cython: language_level=3
# The entry of the kernels compiled with AVX-512 (see setup.py): _core.pyx again, which takes the
# kernels of its build (_lookup_avx512, ...) by its module name. fastemb/_kernels.py picks it on
# CPUs with AVX-512.
include "_core.pyx"
