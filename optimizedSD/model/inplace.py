"""Elementwise steps written into a tensor the caller has just computed, instead of a new one.

At 512x512 the VAE decoder's activations are up to 128 MiB each (1 x 128 x 512 x 512 fp32). A new
tensor of that size is fresh memory from the kernel: page faults and zeroed pages, on every call.
Writing SiLU and residual additions into the tensor that was just produced avoids them and gives
the same bits (the same kernels; IEEE addition and multiplication are commutative). On the CPU the
VAE decode and the UNet run faster for it (README, "CPU speed", for the whole run against diffusers').

The caller passes as `fresh` only a tensor nothing else holds (the output of the layer just run).
Each function falls back to the out-of-place form when writing in place would change the result
(type promotion, broadcasting to a larger shape) or when autograd records the graph (training).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _writable(fresh: torch.Tensor, other: torch.Tensor) -> bool:
    return (not (fresh.requires_grad or other.requires_grad)
            and torch.result_type(fresh, other) == fresh.dtype
            and torch.broadcast_shapes(fresh.shape, other.shape) == fresh.shape)


def add(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """`fresh + other`, in `fresh` where that is the same."""
    return fresh.add_(other) if _writable(fresh, other) else fresh + other


def mul(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """`fresh * other`, in `fresh` where that is the same."""
    return fresh.mul_(other) if _writable(fresh, other) else fresh * other


def silu(fresh: torch.Tensor) -> torch.Tensor:
    """`F.silu(fresh)`, in `fresh` unless autograd records it."""
    return F.silu(fresh, inplace=not fresh.requires_grad)


class SiLU(nn.Module):
    """`nn.SiLU` for a Sequential whose previous layer makes a new tensor (a norm, a linear layer)."""

    def forward(self, x):
        return silu(x)
