"""``fastemb.torch``: torch ``nn.Module`` versions of fastemb's modules (torch is optional).

``fastemb.torch.Embedding`` and ``fastemb.torch.EmbeddingBag`` take torch tensors, run
fastemb's kernels on them without copying, and share their weight with the NumPy module they
wrap (``module.table``). Their backward gives the weight a sparse COO gradient, as
``nn.EmbeddingBag(sparse=True)`` does, for torch's ``SparseAdam``, ``SGD`` or ``Adagrad``; or,
after ``module.fuse_optimizer(fastemb.optim.RowWiseAdagrad, lr=0.1)``, steps the table right
in the backward with that fastemb optimizer (TorchRec's "optimizer in backward").
``fastemb.torch.EmbeddingBagCollection`` and ``EmbeddingCollection`` do the same for many
tables in one kernel call.

``import fastemb`` never imports torch; ``import fastemb.torch`` does.

>>> import torch, fastemb.torch
>>> bags = fastemb.torch.EmbeddingBag(1000, 16, mode="sum", seed=0)
>>> out = bags(torch.tensor([[1, 2], [3, 3]]))
>>> out.sum().backward()
>>> bags.weight.grad.coalesce().indices().tolist()
[[1, 2, 3]]

``python -m fastemb.torch.dlrm`` trains a DLRM-style model on synthetic Criteo-like data.
"""

try:
    import torch  # noqa: F401  (the real torch: imports are absolute)
except ModuleNotFoundError as error:
    if error.name != "torch":
        raise
    raise ImportError("fastemb.torch needs torch: pip install torch==2.13.0") from error

from .autograd import EmbeddingBagFunction, EmbeddingFunction
from .collection import (EmbeddingBagCollection, EmbeddingBagCollectionFunction,
                         EmbeddingCollection, EmbeddingCollectionFunction)
from .modules import Embedding, EmbeddingBag

__all__ = ["Embedding", "EmbeddingBag", "EmbeddingBagCollection",
           "EmbeddingBagCollectionFunction", "EmbeddingBagFunction", "EmbeddingCollection",
           "EmbeddingCollectionFunction", "EmbeddingFunction"]
