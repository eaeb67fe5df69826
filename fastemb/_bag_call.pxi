# The arguments of embedding_bag's one-call common case, read straight from the NumPy objects
# (included by _lookup.pyx for float tables and _quantized.pyx for quantized ones; the includer
# cimports numpy as cnp, calls cnp.import_array() and cimports BagMode, BAG_SUM, BAG_MEAN,
# BAG_MAX and index_t from fastemb._common). parse_bag_call reads a call's indices, offsets,
# mode, per-sample weights and padding_idx, or declines it; new_bag_output makes its output.

from libc.stdlib cimport free, malloc

from fastemb._allocator import BLOCK_CACHE_HANDLER

cdef extern from "numpy/arrayobject.h":
    object PyDataMem_SetHandler(object handler)  # (the allocator new arrays take their data from)
    enum: NPY_USERDEF  # (the first type number of the dtypes other packages register)


cdef struct BagCall:
    int index_type  # NPY_INT32 or NPY_INT64
    BagMode mode
    Py_ssize_t num_indices
    Py_ssize_t num_bags
    const void *indices  # NULL without indices
    const void *weights  # NULL without per-sample weights
    int64_t padding_idx  # in [0, num_rows), or -1 for none
    int64_t *bounds  # num_bags + 1 entries (malloc: free_bag_call frees them)


cdef bint copy_valid_offsets(const index_t *offsets, Py_ssize_t num_offsets, int64_t *bounds,
                             Py_ssize_t num_bags, int64_t num_indices,
                             bint include_last_offset) noexcept nogil:
    """Fill bounds (num_bags + 1 entries) from torch-style offsets; False if they are not valid:
    from 0, non-decreasing, the last bag ending at num_indices at most (exactly, with
    include_last_offset)."""
    cdef Py_ssize_t b
    cdef int64_t previous = 0, offset
    for b in range(num_offsets):
        offset = offsets[b]
        if offset < previous or (b == 0 and offset != 0):
            return False
        bounds[b] = offset
        previous = offset
    if include_last_offset:
        return previous == num_indices
    bounds[num_bags] = num_indices
    return previous <= num_indices


cdef bint is_plain_array(object value) noexcept:
    """True for an ndarray (not a subclass) that is C-contiguous, aligned and in native byte
    order: one whose data a kernel may read as it is."""
    return (cnp.PyArray_CheckExact(value) and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>value)
            and cnp.PyArray_ISALIGNED(<cnp.ndarray>value)
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>value))


cdef int index_type_of(object value, int ndim) noexcept:
    """NPY_INT32 or NPY_INT64 for a plain array (is_plain_array) of ndim dimensions holding
    those; -1 for anything else."""
    cdef int type_number
    if not is_plain_array(value) or cnp.PyArray_NDIM(<cnp.ndarray>value) != ndim:
        return -1
    type_number = cnp.PyArray_TYPE(<cnp.ndarray>value)
    return type_number if type_number == cnp.NPY_INT32 or type_number == cnp.NPY_INT64 else -1


cdef Py_ssize_t bag_count(object offsets, bint include_last_offset) noexcept:
    """The number of bags B that torch-style ``offsets`` give, if they are a plain 1-D
    int32/int64 array (see index_type_of); -1 for any other offsets."""
    cdef Py_ssize_t num_offsets
    if index_type_of(offsets, 1) < 0:
        return -1
    num_offsets = cnp.PyArray_DIM(<cnp.ndarray>offsets, 0)
    return num_offsets - 1 if include_last_offset else num_offsets


cdef bint copy_offsets(cnp.ndarray offsets, int64_t *bounds, Py_ssize_t num_bags,
                       int64_t num_indices, bint include_last_offset) noexcept:
    """copy_valid_offsets on offsets that bag_count accepted (it gave num_bags >= 0)."""
    cdef Py_ssize_t num_offsets = cnp.PyArray_DIM(offsets, 0)
    if cnp.PyArray_TYPE(offsets) == cnp.NPY_INT64:
        return copy_valid_offsets(<const int64_t *>cnp.PyArray_DATA(offsets), num_offsets,
                                  bounds, num_bags, num_indices, include_last_offset)
    return copy_valid_offsets(<const int32_t *>cnp.PyArray_DATA(offsets), num_offsets, bounds,
                              num_bags, num_indices, include_last_offset)


cdef int bag_mode_of(object mode) noexcept:
    """The BagMode of a mode string ("sum", "mean", "max"); -1 for anything else."""
    if type(mode) is not str:
        return -1
    if mode == "sum":
        return BAG_SUM
    if mode == "mean":
        return BAG_MEAN
    if mode == "max":
        return BAG_MAX
    return -1


cdef bint parse_bag_call(object input, object offsets, object mode, object per_sample_weights,
                         bint include_last_offset, object padding_idx, Py_ssize_t num_rows,
                         int weights_type, BagCall *call) except -1:
    """Fill ``call`` for the common case: int32/int64 plain indices (is_plain_array), 1-D with
    plain valid offsets or 2-D without; a str mode; per-sample weights None or a plain array
    of the input's shape and NumPy type ``weights_type`` (not with max); padding_idx None or
    an int in [-num_rows, num_rows); at least one bag. Returns False (and allocates nothing)
    for any other call, which the caller then declines."""
    cdef int input_dims = 1 if offsets is not None else 2
    cdef int bag_mode = bag_mode_of(mode)
    cdef Py_ssize_t b, bag_size = 0
    call.bounds = NULL
    call.index_type = index_type_of(input, input_dims)
    if bag_mode < 0 or call.index_type < 0:
        return False
    call.mode = <BagMode>bag_mode
    call.num_indices = cnp.PyArray_SIZE(<cnp.ndarray>input)
    call.indices = cnp.PyArray_DATA(<cnp.ndarray>input) if call.num_indices else NULL
    call.padding_idx = -1
    if padding_idx is not None:
        if type(padding_idx) is not int or not -num_rows <= padding_idx < num_rows:
            return False
        call.padding_idx = padding_idx % num_rows
    call.weights = NULL
    if per_sample_weights is not None:
        if (bag_mode == BAG_MAX or not is_plain_array(per_sample_weights)
                or cnp.PyArray_TYPE(<cnp.ndarray>per_sample_weights) != weights_type
                or cnp.PyArray_NDIM(<cnp.ndarray>per_sample_weights) != input_dims
                or cnp.PyArray_DIM(<cnp.ndarray>per_sample_weights, 0)
                != cnp.PyArray_DIM(<cnp.ndarray>input, 0)
                or cnp.PyArray_SIZE(<cnp.ndarray>per_sample_weights) != call.num_indices):
            return False
        call.weights = cnp.PyArray_DATA(<cnp.ndarray>per_sample_weights)
    if input_dims == 2:
        call.num_bags = cnp.PyArray_DIM(<cnp.ndarray>input, 0)
        bag_size = cnp.PyArray_DIM(<cnp.ndarray>input, 1)
    else:
        call.num_bags = bag_count(offsets, include_last_offset)
    if call.num_bags <= 0:  # (the general path's rare cases)
        return False
    call.bounds = <int64_t *>malloc((call.num_bags + 1) * sizeof(int64_t))
    if call.bounds == NULL:
        raise MemoryError()
    if input_dims == 2:
        for b in range(call.num_bags + 1):
            call.bounds[b] = b * bag_size
    elif not copy_offsets(offsets, call.bounds, call.num_bags, call.num_indices,
                          include_last_offset):
        free_bag_call(call)
        return False
    return True


cdef void free_bag_call(BagCall *call) noexcept:
    """Free what parse_bag_call allocated."""
    free(call.bounds)
    call.bounds = NULL


cdef object new_bag_output(Py_ssize_t num_bags, Py_ssize_t dim, int type_number):
    """A new (num_bags, dim) array of NumPy type ``type_number`` from the block cache."""
    cdef cnp.npy_intp shape[2]
    shape[0] = num_bags
    shape[1] = dim
    previous_handler = PyDataMem_SetHandler(BLOCK_CACHE_HANDLER)
    try:
        return cnp.PyArray_EMPTY(2, shape, type_number, 0)
    finally:
        PyDataMem_SetHandler(previous_handler)
