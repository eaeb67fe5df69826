"""Torch tensors and NumPy arrays that share memory, both ways (bfloat16 included)."""

import numpy as np
import torch

from .._dtypes import bfloat16_dtype, ml_dtypes

BFLOAT16 = None if ml_dtypes is None else bfloat16_dtype()  # (NumPy's, when ml_dtypes is here)


def to_numpy(tensor, name):
    """A NumPy array on ``tensor``'s memory (no copy); bfloat16 becomes ml_dtypes' bfloat16.

    ``tensor`` must be a dense CPU ``torch.Tensor``; anything else raises TypeError or
    ValueError naming ``name``.

    >>> to_numpy(torch.tensor([1.0, 2.0]), "x").tolist()
    [1.0, 2.0]
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}; fastemb.torch runs on CPU tensors "
                         f"(move it with .cpu())")
    if tensor.layout != torch.strided:
        raise ValueError(f"{name} must be a dense tensor, got layout {tensor.layout}")
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(bfloat16_dtype())
    try:
        return tensor.numpy()
    except TypeError as error:  # a dtype NumPy lacks
        raise TypeError(f"{name} has dtype {tensor.dtype}, which NumPy lacks ({error})") from None


def to_tensor(array):
    """A torch tensor on ``array``'s memory (no copy); ml_dtypes' bfloat16 becomes torch's.

    >>> to_tensor(np.arange(3, dtype=np.float32)).tolist()
    [0.0, 1.0, 2.0]
    """
    if array.dtype == BFLOAT16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def numpy_dtype(dtype):
    """``dtype`` as NumPy knows it: a torch dtype (``torch.float32``) is translated, anything
    else is returned as it is.

    >>> numpy_dtype(torch.float64), numpy_dtype(torch.bfloat16)
    (dtype('float64'), dtype(bfloat16))
    """
    if not isinstance(dtype, torch.dtype):
        return dtype
    if dtype == torch.bfloat16:
        return bfloat16_dtype()
    return to_numpy(torch.empty(0, dtype=dtype), "dtype").dtype
