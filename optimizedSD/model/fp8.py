"""fp8 weight storage (`--fp8`): the weights of Linear and Conv2d layers held as `float8_e4m3fn`, cast to
the compute dtype each time a layer runs.

As Forge, ComfyUI and the AUTOMATIC1111 webui (its `FP8 weight` option) store them: a plain
per-tensor cast, no scales. Everything else keeps the dtype the precision gives it: biases, norms,
embeddings, the UNet's time embedding (`time_embed`) and the adapters (arXiv 2303.18181: small, and
added after the checkpoint). Which fragments: `FP8_PARTS` ("unet": both UNet halves; "all": the text
encoder too); the VAE never.

How a layer runs: `store_fp8` turns an `nn.Linear` / `nn.Conv2d` into `FP8Linear` / `FP8Conv2d` (the
same module, its class swapped: the same parameter names and checkpoint keys, so the offload engine
moves the fp8 tensor, at half fp16's bytes, and LoRA patches it in place), whose `forward` casts the
weight (and the bias) to the input's dtype first: on the compute device, after the transfer, a copy
that lives for that call only. The input's dtype is the arithmetic's: fp16 under CUDA autocast, fp32
in upcast and full precision, bf16 with `--precision bf16`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fragments import TEXT_ENCODER, UNET_IN, UNET_OUT
from .weight_cast import weights_for

FP8 = getattr(torch, "float8_e4m3fn", None)  # torch >= 2.1
FP8_PARTS = {"unet": (UNET_IN, UNET_OUT), "all": (UNET_IN, UNET_OUT, TEXT_ENCODER)}
# Children (by attribute name, at any depth) whose layers keep the precision's dtype.
KEPT = frozenset({"time_embed", "adapter", "adapter_inout"})


def available() -> bool:
    """Whether this torch has the float8_e4m3fn dtype (and can cast to and from it on the CPU)."""
    if FP8 is None:
        return False
    try:
        return bool(torch.ones(1).to(FP8).float().item() == 1.0)
    except (RuntimeError, TypeError):
        return False


class FP8Linear(nn.Linear):
    """An nn.Linear whose weight is stored in fp8: cast to the input's dtype for each call."""

    def forward(self, x):
        return F.linear(x, *weights_for(self, x))


class FP8Conv2d(nn.Conv2d):
    """An nn.Conv2d whose weight is stored in fp8: cast to the input's dtype for each call (the
    cast keeps the weight's memory format: channels-last stays channels-last)."""

    def forward(self, x):
        return self._conv_forward(x, *weights_for(self, x))


_FP8_CLASS = {nn.Linear: FP8Linear, nn.Conv2d: FP8Conv2d}


def store_fp8(module: nn.Module) -> int:
    """Store the weights of `module`'s Linear and Conv2d layers (not under `KEPT`) in fp8, in place;
    returns how many layers. Host masters only (before an offload engine captures them)."""
    n = 0
    for name, m in module.named_modules():
        if type(m) not in _FP8_CLASS or KEPT & set(name.split(".")):
            continue
        with torch.no_grad():
            m.weight = nn.Parameter(m.weight.detach().to(FP8), requires_grad=False)
        m.__class__ = _FP8_CLASS[type(m)]
        n += 1
    return n


def store_fragments_fp8(fragments: dict[str, nn.Module], which: str) -> int:
    """`store_fp8` on the fragments `which` ("unet" or "all", `FP8_PARTS`) names; layers changed."""
    return sum(store_fp8(fragments[name]) for name in FP8_PARTS[which] if name in fragments)

