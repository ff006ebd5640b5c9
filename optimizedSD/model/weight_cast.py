"""The one rule for a layer whose weight is stored in fp8 (`--fp8`, model/fp8.py): its weight and bias
are cast to the input's dtype at the call, copies that live for that call only. Any other weight is
used as stored (CUDA autocast and `UpcastMode` cast those themselves).

Its own module so that a layer that reads another layer's weight itself (the UNet's GEGLU reads its
projection's two halves) follows the same rule as `FP8Linear` / `FP8Conv2d` without importing fp8.py
(which imports the fragment split, which builds the UNet).
"""
from __future__ import annotations

import torch
from torch import nn


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def weights_for(layer: nn.Linear | nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) `layer` computes `x` with: cast to `x`'s dtype where the weight is fp8."""
    if layer.weight.dtype.itemsize != 1:
        return layer.weight, layer.bias
    return _to(layer.weight, x.dtype), _to(layer.bias, x.dtype)
