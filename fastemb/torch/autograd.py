"""The autograd Functions that link a torch weight to a fastemb NumPy module.

Each forward runs fastemb's kernels on the tensors' memory and keeps, in its own ``ctx``, what
its backward needs (so several forwards may precede their backwards). Each backward gives the
weight either a coalesced sparse COO gradient, as ``nn.EmbeddingBag(sparse=True)`` does, or,
when a fused fastemb optimizer is given, no gradient: that optimizer steps the table there.
"""

import torch
from torch.autograd.function import once_differentiable

from ..backward import bag_grads, embedding_backward
from ..functional import bag_forward, embedding
from ._arrays import to_numpy, to_tensor


def bag_options(table):
    """The lookup options of a fastemb ``EmbeddingBag``, as ``fastemb.embedding_bag`` names
    them (keyword arguments).

    >>> import fastemb
    >>> bag_options(fastemb.EmbeddingBag(5, 2, mode="sum", padding_idx=0))["padding_idx"]
    0
    """
    return {"mode": table.mode, "include_last_offset": table.include_last_offset,
            "padding_idx": table.padding_idx, "max_norm": table.max_norm,
            "norm_type": table.norm_type}


def lookup_options(table):
    """The lookup options of a fastemb ``Embedding``, as ``fastemb.embedding`` names them.

    >>> import fastemb
    >>> lookup_options(fastemb.Embedding(5, 2, max_norm=1.0))["max_norm"]
    1.0
    """
    return {"padding_idx": table.padding_idx, "max_norm": table.max_norm,
            "norm_type": table.norm_type}


def optional_numpy(tensor, name):
    """``to_numpy(tensor, name)``, or None for None.

    >>> optional_numpy(None, "offsets") is None, optional_numpy(torch.tensor([0]), "offsets")
    (True, array([0]))
    """
    return None if tensor is None else to_numpy(tensor, name)


def weight_gradient(grad, dtype, fused_optimizer, table):
    """What a backward returns for the weight, given the table's SparseGrad ``grad``: a
    coalesced sparse COO tensor of torch dtype ``dtype`` (the weight's); or, with a fused
    optimizer, None after that optimizer stepped the table with ``grad`` (``table.grad`` is
    left as it was).

    >>> import fastemb, numpy as np
    >>> grad = fastemb.SparseGrad([2], np.ones((1, 3), np.float32), num_embeddings=4)
    >>> weight_gradient(grad, torch.float32, None, None).to_dense()[:, 0].tolist()
    [0.0, 0.0, 1.0, 0.0]
    """
    if fused_optimizer is not None:
        previous, table.grad = table.grad, grad
        try:
            fused_optimizer.step()
        finally:
            table.grad = previous
        return None
    return torch.sparse_coo_tensor(to_tensor(grad.rows)[None], to_tensor(grad.values),
                                   grad.shape, is_coalesced=True,
                                   check_invariants=False).to(dtype)  # (they hold: a SparseGrad)


class EmbeddingBagFunction(torch.autograd.Function):
    """``EmbeddingBagFunction.apply(weight, table, fused_optimizer, input, offsets,
    per_sample_weights)``: the bags of a fastemb ``EmbeddingBag`` ``table`` whose weight is
    ``weight``'s memory, differentiable in ``weight`` and ``per_sample_weights``.
    ``fastemb.torch.EmbeddingBag`` calls it; ``fused_optimizer`` (a fastemb optimizer of
    ``table``, or None) steps the table in the backward instead of giving a weight gradient.

    >>> import fastemb, fastemb.torch
    >>> table = fastemb.EmbeddingBag(10, 4, mode="sum", seed=0)
    >>> weight = fastemb.torch.EmbeddingBag.from_numpy(table).weight
    >>> out = EmbeddingBagFunction.apply(weight, table, None, torch.tensor([[1, 1, 5]]), None,
    ...                                  None)
    >>> out.sum().backward(); weight.grad.coalesce().values()[:, 0].tolist()
    [2.0, 1.0]
    """

    @staticmethod
    def forward(ctx, weight, table, fused_optimizer, input, offsets, per_sample_weights):
        forward = bag_forward(to_numpy(input, "input"), table.weight,
                              optional_numpy(offsets, "offsets"),
                              per_sample_weights=optional_numpy(per_sample_weights,
                                                                "per_sample_weights"),
                              **bag_options(table))
        output = forward.output
        ctx.forward = forward.private_copy()  # (the caller may change its tensors in place)
        ctx.table, ctx.fused_optimizer, ctx.weight_dtype = table, fused_optimizer, weight.dtype
        return to_tensor(output)

    @staticmethod
    @once_differentiable  # (the gradients are not differentiable themselves)
    def backward(ctx, grad_output):
        weight_grad, sample_grad = bag_grads(ctx.forward, ctx.table.weight,
                                             to_numpy(grad_output, "grad_output"),
                                             ctx.table.scale_grad_by_freq)
        weight_needs_grad, _, _, _, _, samples_need_grad = ctx.needs_input_grad
        return (weight_gradient(weight_grad, ctx.weight_dtype, ctx.fused_optimizer, ctx.table)
                if weight_needs_grad else None,
                None, None, None, None,
                to_tensor(sample_grad) if samples_need_grad else None)


class EmbeddingFunction(torch.autograd.Function):
    """``EmbeddingFunction.apply(weight, table, fused_optimizer, input)``: the rows of a
    fastemb ``Embedding`` ``table`` whose weight is ``weight``'s memory, differentiable in
    ``weight``; see ``EmbeddingBagFunction``.

    >>> import fastemb, fastemb.torch
    >>> table = fastemb.Embedding(10, 4, seed=0)
    >>> weight = fastemb.torch.Embedding.from_numpy(table).weight
    >>> EmbeddingFunction.apply(weight, table, None, torch.tensor([[1, 2]])).shape
    torch.Size([1, 2, 4])
    """

    @staticmethod
    def forward(ctx, weight, table, fused_optimizer, input):
        output = embedding(to_numpy(input, "input"), table.weight, **lookup_options(table))
        ctx.save_for_backward(input)  # (torch checks that nothing changed it in place)
        ctx.table, ctx.fused_optimizer, ctx.weight_dtype = table, fused_optimizer, weight.dtype
        return to_tensor(output)

    @staticmethod
    @once_differentiable  # (the gradients are not differentiable themselves)
    def backward(ctx, grad_output):
        input, = ctx.saved_tensors
        table = ctx.table
        weight_grad = embedding_backward(to_numpy(grad_output, "grad_output"),
                                         to_numpy(input, "input"), table.num_embeddings,
                                         table.padding_idx, table.scale_grad_by_freq)
        return (weight_gradient(weight_grad, ctx.weight_dtype, ctx.fused_optimizer, table),
                None, None, None)
