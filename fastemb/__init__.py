"""fastemb: fast CPU embedding lookups, bag reductions, sparse gradients and lazy optimizers,
on plain NumPy arrays.

Start with ``fastemb.embedding`` / ``fastemb.embedding_bag`` (functional) or
``fastemb.Embedding`` / ``fastemb.EmbeddingBag`` (modules). The kernels' entry is
``fastemb/_core.pyx``; ``fastemb.show_config()`` tells how they were built.
"""

from . import optim
from ._config import __version__, get_num_threads, set_num_threads, show_config
from ._memory import release_memory
from .backward import embedding_backward, embedding_bag_backward
from .checkpoint import load, save
from .collection import (EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection,
                         EmbeddingConfig)
from .functional import embedding, embedding_bag
from .jagged import JaggedArray, KeyedArray, KeyedJaggedArray
from .modules import Embedding, EmbeddingBag
from .quantized import QuantizedTable, quantize
from .sparse import SparseGrad

__all__ = [
    "Embedding",
    "EmbeddingBag",
    "EmbeddingBagCollection",
    "EmbeddingBagConfig",
    "EmbeddingCollection",
    "EmbeddingConfig",
    "JaggedArray",
    "KeyedArray",
    "KeyedJaggedArray",
    "QuantizedTable",
    "SparseGrad",
    "__version__",
    "embedding",
    "embedding_backward",
    "embedding_bag",
    "embedding_bag_backward",
    "get_num_threads",
    "load",
    "optim",
    "quantize",
    "release_memory",
    "save",
    "set_num_threads",
    "show_config",
]
