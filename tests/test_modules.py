"""Embedding and EmbeddingBag modules: construction, from_pretrained, repr, and the forward."""

import numpy as np
import pytest
from reference import assert_same_bits, embedding_bag_ref, embedding_ref, renorm_ref

import fastemb

MODULES = [fastemb.Embedding, fastemb.EmbeddingBag]


# --------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module_class", MODULES)
def test_init_is_seeded_standard_normal(module_class, dtype):
    module = module_class(2000, 50, dtype=dtype, seed=123)
    weight = module.weight
    assert isinstance(weight, np.ndarray) and weight.shape == (2000, 50) and weight.dtype == dtype
    assert weight.flags.c_contiguous and weight.flags.writeable
    assert (module.num_embeddings, module.embedding_dim) == (2000, 50)
    assert abs(weight.mean()) < 0.01 and abs(weight.std() - 1) < 0.01
    assert abs(np.mean(np.abs(weight)) - np.sqrt(2 / np.pi)) < 0.01  # normal, not uniform
    assert_same_bits(module_class(2000, 50, dtype=dtype, seed=123).weight, weight)
    assert not np.array_equal(module_class(2000, 50, dtype=dtype, seed=124).weight, weight)
    assert not np.array_equal(module_class(2000, 50, dtype=dtype).weight,
                              module_class(2000, 50, dtype=dtype).weight)
    # the values are the generator's standard normals in C order, the data cache-line aligned
    expected = np.random.default_rng(123).standard_normal((2000, 50), dtype=dtype)
    assert_same_bits(weight, expected)
    assert weight.ctypes.data % 64 == 0


@pytest.mark.parametrize("module_class", MODULES)
@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0, 0), (1, 1), (7, 5), (3, 33)])
def test_small_and_empty_tables_are_aligned_too(module_class, shape):
    weight = module_class(*shape, seed=0).weight
    assert weight.shape == shape and weight.flags.c_contiguous and weight.flags.writeable
    assert weight.size == 0 or weight.ctypes.data % 64 == 0  # (no elements: no data to align)


@pytest.mark.parametrize("module_class", MODULES)
def test_default_dtype_is_float32_and_not_frozen(module_class):
    module = module_class(3, 2)
    assert module.weight.dtype == np.float32
    assert module.frozen is False
    assert module.padding_idx is None
    assert module.max_norm is None


@pytest.mark.parametrize("module_class", MODULES)
@pytest.mark.parametrize("padding_idx, stored", [(0, 0), (2, 2), (3, 3), (-1, 3), (-4, 0)])
def test_padding_row_is_zeroed_and_normalised(module_class, padding_idx, stored):
    module = module_class(4, 3, padding_idx=padding_idx, seed=0)
    assert module.padding_idx == stored
    assert np.all(module.weight[stored] == 0)
    others = np.delete(module.weight, stored, axis=0)
    assert np.all(others != 0)
    unpadded = module_class(4, 3, seed=0).weight
    np.testing.assert_array_equal(others, np.delete(unpadded, stored, axis=0))


def test_embedding_negative_padding_idx_example():
    assert fastemb.Embedding(4, 3, padding_idx=-1).padding_idx == 3


@pytest.mark.parametrize("module_class", MODULES)
def test_empty_sizes_are_allowed(module_class):
    assert module_class(0, 3).weight.shape == (0, 3)
    assert module_class(3, 0).weight.shape == (3, 0)


@pytest.mark.parametrize("module_class", MODULES)
@pytest.mark.parametrize("arguments, exception", [
    ((-1, 3), ValueError),
    ((3, -2), ValueError),
    ((2.5, 3), TypeError),
    ((3, "4"), TypeError),
    ((None, 3), TypeError),
    ((True, 3), TypeError),
    ((4, 3, dict(padding_idx=4)), ValueError),
    ((4, 3, dict(padding_idx=-5)), ValueError),
    ((0, 3, dict(padding_idx=0)), ValueError),
    ((4, 3, dict(dtype=np.int64)), TypeError),
    ((4, 3, dict(dtype=np.complex64)), TypeError),
    ((4, 3, dict(dtype=np.int32)), TypeError),
    ((4, 3, dict(max_norm="1")), TypeError),
])
def test_invalid_construction(module_class, arguments, exception):
    *sizes, keywords = arguments if isinstance(arguments[-1], dict) else (*arguments, {})
    with pytest.raises(exception):
        module_class(*sizes, **keywords)


@pytest.mark.parametrize("arguments", [dict(mode="avg"), dict(mode="max", scale_grad_by_freq=True)])
def test_invalid_bag_options(arguments):
    with pytest.raises(ValueError):
        fastemb.EmbeddingBag(4, 3, **arguments)
    with pytest.raises(ValueError):
        fastemb.EmbeddingBag.from_pretrained(np.ones((4, 3), np.float32), **arguments)


def test_bag_defaults():
    module = fastemb.EmbeddingBag(4, 3)
    assert module.mode == "mean"
    assert module.include_last_offset is False


# --------------------------------------------------------------------------------------------
# from_pretrained
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module_class", MODULES)
def test_from_pretrained_shares_memory_and_keeps_padding_row(module_class, dtype):
    vectors = np.arange(1, 13, dtype=dtype).reshape(4, 3)
    module = module_class.from_pretrained(vectors, padding_idx=-4)
    assert module.weight is vectors or np.shares_memory(module.weight, vectors)
    assert module.padding_idx == 0
    np.testing.assert_array_equal(vectors[0], [1, 2, 3])  # the padding row is kept
    assert module.frozen is True
    assert module_class.from_pretrained(vectors, freeze=False).frozen is False
    vectors[2, 1] = -7  # the module sees later writes to the array
    assert module.weight[2, 1] == -7


@pytest.mark.parametrize("module_class", MODULES)
@pytest.mark.parametrize("embeddings, exception", [
    (np.ones(3, np.float32), ValueError),
    (np.ones((2, 2, 2), np.float32), ValueError),
    (np.ones((2, 2), np.int64), TypeError),
    (np.ones((2, 2), np.complex128), TypeError),
])
def test_from_pretrained_rejects(module_class, embeddings, exception):
    with pytest.raises(exception):
        module_class.from_pretrained(embeddings)


@pytest.mark.parametrize("module_class", MODULES)
def test_from_pretrained_padding_range(module_class):
    with pytest.raises(ValueError):
        module_class.from_pretrained(np.ones((2, 2), np.float32), padding_idx=2)


def test_from_pretrained_bag_options():
    vectors = np.array([[1, 2], [3, 4], [5, 6]], np.float32)
    module = fastemb.EmbeddingBag.from_pretrained(vectors, mode="max", include_last_offset=True)
    assert module.mode == "max" and module.include_last_offset is True
    np.testing.assert_array_equal(module([0, 2, 1], offsets=[0, 1, 3]), [[1, 2], [5, 6]])
    assert fastemb.EmbeddingBag.from_pretrained(vectors).mode == "mean"


# --------------------------------------------------------------------------------------------
# repr
# --------------------------------------------------------------------------------------------

def test_repr():
    text = repr(fastemb.Embedding(4, 3, padding_idx=1, max_norm=1.0))
    assert text.startswith("Embedding(4, 3") and text.endswith(")")
    assert "padding_idx=1" in text and "max_norm=1.0" in text
    assert repr(fastemb.Embedding(4, 3)) == "Embedding(4, 3)"
    assert "padding_idx=3" in repr(fastemb.Embedding(4, 3, padding_idx=-1))
    assert "float64" in repr(fastemb.Embedding(4, 3, dtype=np.float64))
    text = repr(fastemb.EmbeddingBag(10, 2, mode="sum"))
    assert text.startswith("EmbeddingBag(10, 2") and "sum" in text
    assert "max" in repr(fastemb.EmbeddingBag(10, 2, mode="max"))
    assert "frozen" in repr(fastemb.Embedding.from_pretrained(np.ones((2, 2), np.float32)))
    assert "frozen" not in repr(fastemb.Embedding(2, 2))


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

def test_embedding_forward():
    module = fastemb.Embedding(10, 4, padding_idx=2, seed=5)
    indices = np.array([[1, 2], [9, 9], [0, 2]])
    out = module(indices)
    assert_same_bits(out, embedding_ref(indices, module.weight))
    assert_same_bits(module([3]), embedding_ref([3], module.weight))
    with pytest.raises(IndexError, match=r"input\[0\] = 10 is out of range"):
        module([10])


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_forward(mode):
    module = fastemb.EmbeddingBag(10, 4, mode=mode, padding_idx=-1, dtype=np.float64, seed=5)
    indices = np.array([1, 9, 9, 3, 0, 9, 4])
    offsets = np.array([0, 3, 3, 5])
    expected, _ = embedding_bag_ref(indices, module.weight, offsets, mode, padding_idx=9)
    assert_same_bits(module(indices, offsets), expected)
    assert_same_bits(module(indices, offsets=offsets), expected)
    two_d = indices[:6].reshape(2, 3)
    assert_same_bits(module(two_d), embedding_bag_ref(two_d, module.weight, mode=mode,
                                                      padding_idx=9)[0])
    if mode != "max":
        psw = np.linspace(0.5, 2, indices.size)
        expected, _ = embedding_bag_ref(indices, module.weight, offsets, mode, psw, padding_idx=9)
        assert_same_bits(module(indices, offsets, per_sample_weights=psw), expected)
    else:
        with pytest.raises(ValueError):
            module(indices, offsets, per_sample_weights=np.ones(indices.size))


def test_embedding_bag_module_include_last_offset():
    module = fastemb.EmbeddingBag(10, 3, mode="sum", include_last_offset=True, seed=0)
    indices = np.array([1, 2, 3, 4])
    expected, _ = embedding_bag_ref(indices, module.weight, [0, 1, 4], "sum",
                                    include_last_offset=True)
    assert_same_bits(module(indices, [0, 1, 4]), expected)
    assert module(indices, [0, 1, 4]).shape == (2, 3)
    with pytest.raises(ValueError):
        module(indices, [0, 1, 3])


@pytest.mark.parametrize("module_class", MODULES)
def test_module_max_norm_renorms_its_weight(module_class):
    module = module_class(10, 4, max_norm=1.0, norm_type=1.0, seed=0)
    before = module.weight.copy()
    indices = np.array([[3, 5, 3]])
    out = module(indices)
    expected = renorm_ref(before, indices, 1.0, 1.0)
    assert_same_bits(module.weight, expected)
    assert not np.array_equal(module.weight, before)
    if module_class is fastemb.Embedding:
        assert_same_bits(out, embedding_ref(indices, expected))
    else:
        assert_same_bits(out, embedding_bag_ref(indices, expected, mode="mean")[0])


@pytest.mark.parametrize("module_class", MODULES)
def test_frozen_module_still_runs_forward(module_class):
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    module = module_class.from_pretrained(vectors)
    out = module(np.array([[2, 0]]))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(vectors, np.arange(6, dtype=np.float32).reshape(3, 2))
