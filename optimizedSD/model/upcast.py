"""fp32 arithmetic from half-precision weights (`--precision upcast`).

The weights stay fp16 (stored on the host, moved and kept on the device at half size); while
`UpcastMode()` is active, every call of a function that reads a layer's weights (linear, conv2d,
group_norm, layer_norm: what nn.Linear, nn.Conv2d, nn.GroupNorm and nn.LayerNorm call) gets its
half-precision tensor arguments as fp32 copies that live only for that call; an embedding lookup
(exact in any dtype) returns its rows as fp32 instead of copying the whole table. Fed fp32 inputs,
a model then computes every activation in fp32: attention, norms, residual sums and the time
embedding included, so nothing can overflow fp16's 65504. The device holds the fp16 weights plus
one layer's fp32 weight copy at a time, and fp32 activations (twice fp16's).

The mode changes no module and no parameter, so the offload engine's parameter swaps and host
masters are untouched; it works on any device, `meta` included (the planner counts the copies).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

HALF = (torch.float16, torch.bfloat16)
# The functions through which layers read their weights (F.linear is torch._C._nn.linear, F.conv2d
# is torch.conv2d: the objects a TorchFunctionMode is handed).
WEIGHTED = frozenset({F.linear, F.conv2d, F.group_norm, F.layer_norm})


def _fp32(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in HALF else x


class UpcastMode(TorchFunctionMode):
    """`with UpcastMode():` layers compute in fp32 from half-precision weights (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:  # a lookup is exact in any dtype: cast the rows taken, not the whole table
            return _fp32(func(*args, **kwargs))
        if func in WEIGHTED:
            args, kwargs = tree_map(_fp32, (args, kwargs))
        return func(*args, **kwargs)
