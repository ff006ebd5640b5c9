"""Attention as a swappable strategy: same inputs, same result, different peak memory.

Every strategy computes softmax(q k^T / sqrt(d)) v for q (B, heads, Nq, d), k (B, heads, Nk, d) and
v (B, heads, Nk, dv), and returns (B, heads, Nq, dv):
- "sdpa":    torch's scaled_dot_product_attention in one call (flash / memory-efficient kernels on
             CUDA never materialise the (Nq, Nk) matrix); on the CPU, the calls our own kernels take
             (cpu_attention.handles: bf16 without AMX, fp32 up to head dim 80) go to them instead.
- "sliced":  loops over the flattened B*heads dimension, `slice_size` rows at a time; each slice
             is plain math on a (slice, Nq, Nk) score block.
- "chunked": loops over query tokens, `chunk_size` at a time, so the largest temporary is the
             (slice, chunk, Nk) score block; also slices B*heads when `slice_size` is set.
Sliced and chunked may instead be given a byte budget, `max_score_bytes`: each call then picks its
slice and chunk from its own shapes so that `score_bytes` of the call stays under the budget (one
budget fits every layer: UNet self- and cross-attention at every resolution, and the VAE). With
`sdpa_if_fused`, a call that torch's SDPA would run in a fused kernel (`fused_sdpa`: flash /
memory-efficient, which never materialise the (Nq, Nk) scores; on the CPU, torch's flash kernel for
equal head dims) goes to SDPA, and only the others are sliced or chunked.

Both UNet `CrossAttention` and the VAE's single-head `AttnBlock` call `attention`, so one policy
governs all of them. The policy is module-global state set once by the pipeline through
`set_policy`; `auto_policy` says what a real run on a given device should use, and `score_bytes`
is the pure workspace model a memory planner uses (it runs on shapes alone).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from . import cpu_attention

STRATEGIES = ("sdpa", "sliced", "chunked")
DEFAULT_CHUNK = 1024  # query tokens per chunk for "chunked" with neither chunk_size nor a budget
# Score-block budget `auto_policy` gives the CPU and MPS when the caller names none: at SD v1
# 512x512 (4096 tokens, 8 heads, fp32) it keeps all 8 heads and takes 1024 queries per chunk.
HOST_SCORE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class AttentionPolicy:
    strategy: str = "sdpa"
    slice_size: int | None = None  # rows of B*heads per slice ("sliced", optional for "chunked")
    chunk_size: int | None = None  # query tokens per chunk ("chunked"); None: DEFAULT_CHUNK, or
    #                                as many as max_score_bytes allows when a budget is set
    max_score_bytes: int | None = None  # budget for score_bytes; slice/chunk above become upper bounds
    sdpa_if_fused: bool = False  # "sliced"/"chunked": calls that SDPA runs fused go to SDPA instead

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown attention strategy {self.strategy!r}; choose one of {STRATEGIES}")
        for name in ("slice_size", "chunk_size", "max_score_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"attention {name} must be a positive integer, got {value!r}")
        if self.strategy == "sdpa" and (self.max_score_bytes is not None or self.sdpa_if_fused):
            raise ValueError("max_score_bytes and sdpa_if_fused need the 'sliced' or 'chunked' strategy; "
                             "sdpa picks its own workspace")


_policy = AttentionPolicy()


def set_policy(policy: AttentionPolicy) -> None:
    global _policy
    _policy = policy


def get_policy() -> AttentionPolicy:
    return _policy


@contextmanager
def using_policy(policy: AttentionPolicy):
    """`policy` for the duration of the block, then the previous one again."""
    previous = _policy
    set_policy(policy)
    try:
        yield policy
    finally:
        set_policy(previous)


def auto_policy(device: torch.device | str, max_score_bytes: int | None = None) -> AttentionPolicy:
    """The policy a real run on `device` should use.

    CUDA without a budget: "sdpa", which dispatches to the flash / memory-efficient kernels (no
    (Nq, Nk) block). CPU, MPS and any other device without a budget: SDPA for every call it runs in
    a fused kernel (on the CPU, torch's flash kernel: every SD v1 attention, UNet and VAE, at any
    size), else "chunked" under HOST_SCORE_BYTES, since SDPA's math fallback materialises every
    head's full score matrix. An explicit `max_score_bytes` forces chunking on every device, CUDA
    included, so a planner that cannot fit its model of the sdpa workspace can bound it exactly.
    """
    device = torch.device(device)
    if max_score_bytes is None:
        if device.type == "cuda":
            return AttentionPolicy("sdpa")
        return AttentionPolicy("chunked", max_score_bytes=HOST_SCORE_BYTES, sdpa_if_fused=True)
    return AttentionPolicy("chunked", max_score_bytes=int(max_score_bytes))


def fused_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether torch's SDPA runs these inputs in a fused kernel (flash or memory-efficient: no
    (Nq, Nk) score block), as its own dispatcher decides for their device, dtype, shapes and strides.
    On the CPU that is the flash kernel, which needs equal q/k/v head dims and a contiguous last dim.
    False where torch cannot say (`torch._fused_sdp_choice` missing) or on `meta`."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None or q.is_meta:
        return False
    return choose(q, k, v) in _FUSED


_FUSED = {int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.EFFICIENT_ATTENTION)}


def blocks(policy: AttentionPolicy, bh: int, nq: int, nk: int, elem: int) -> tuple[int, int]:
    """(rows of B*heads, query tokens) computed at once by "sliced"/"chunked" for these shapes.

    `elem` is the compute dtype's size in bytes. Without a budget the sizes are the policy's. With
    `max_score_bytes`, "sliced" takes the most rows whose (rows, Nq, Nk) scores plus probabilities
    fit; "chunked" keeps all rows (up to slice_size) and takes the most queries that fit, cutting
    rows only when a single query per row is over budget. At least one row and one query are
    always taken, so a budget below 2 * Nk * elem is exceeded (by that one (1, 1, Nk) row).
    """
    if policy.strategy == "sdpa":
        raise ValueError("sdpa does not compute in blocks")
    rows = min(policy.slice_size or bh, bh)
    if policy.strategy == "sliced":
        cols = nq
    else:
        cols = min(policy.chunk_size or (nq if policy.max_score_bytes else DEFAULT_CHUNK), nq)
    budget = policy.max_score_bytes
    if budget is not None:
        per_query = 2 * nk * elem  # one query's scores plus its probabilities, for one row
        if policy.strategy == "sliced":
            rows = max(1, min(rows, budget // (per_query * nq)))
        elif budget // (per_query * rows) >= 1:
            cols = min(cols, budget // (per_query * rows))
        else:
            rows = max(1, min(rows, budget // per_query))
            cols = max(1, min(cols, budget // (per_query * rows)))
    return max(rows, 1), max(cols, 1)


def score_bytes(policy: AttentionPolicy, b: int, h: int, nq: int, nk: int, dtype: torch.dtype,
                d: int | None = None) -> int:
    """Bytes of attention workspace alive at once for one call on these shapes (pure; shapes only).

    - "sliced"/"chunked": 2 * rows * cols * Nk * elem with (rows, cols) from `blocks` and elem the
      compute dtype's size: the (rows, cols, Nk) scores plus the same again for their softmax
      (the scores block is freed only after the softmax has been written).
    - "sdpa": b * h * Nq * (d + 1) * 4, taking CUDA's memory-efficient kernel: no (Nq, Nk) block,
      but an fp32 output accumulator (B, h, Nq, d) and the fp32 log-sum-exp (B, h, Nq); `d` (the
      head dim) is required. torch's math fallback (e.g. SDPA on CPU for some shapes) would
      instead materialise b * h * Nq * Nk scores; `auto_policy` does not choose sdpa there.
    - `sdpa_if_fused`: the sliced/chunked figure, a bound for the calls SDPA does not run fused
      (whether it does depends on strides and torch's dispatcher, not on shapes alone).
    Not counted, for every strategy: q/k/v and output sized tensors, O(B * h * N * d), which are
    the layer's activations (the blocked strategies also make contiguous (B*h, N, d) copies).
    """
    if policy.strategy == "sdpa":
        if d is None:
            raise ValueError("score_bytes for sdpa needs the head dim d")
        return b * h * nq * (d + 1) * 4
    rows, cols = blocks(policy, b * h, nq, nk, dtype.itemsize)
    return 2 * rows * cols * nk * dtype.itemsize


def _block(q, k, v, scale):
    """(R, C, d) x (R, Nk, d) x (R, Nk, dv) -> (R, C, dv); the (R, C, Nk) scores are the workspace."""
    scores = torch.bmm(q * scale, k.transpose(1, 2))  # (R, C, Nk)
    # An explicit dtype keeps the probabilities in the scores' dtype: CUDA autocast would otherwise
    # write them in fp32 and cast them back for the bmm (3x the fp16 block instead of 2x).
    probs = scores.softmax(dim=-1, dtype=scores.dtype)
    del scores  # the second (R, C, Nk) block lives only as long as the softmax
    return torch.bmm(probs, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              policy: AttentionPolicy | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v: (B, h, Nq, d), (B, h, Nk, d), (B, h, Nk, dv) -> (B, h, Nq, dv)."""
    policy = policy or _policy
    if policy.strategy == "sdpa" or (policy.sdpa_if_fused and fused_sdpa(q, k, v)):
        if q.is_meta:
            return _meta_sdpa(q, k, v)
        if cpu_attention.handles(q, k, v):  # where our CPU kernels beat torch's
            return cpu_attention.attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    # Flatten B*heads so a slice can cut across both: (B*h, tokens, dim).
    qf, kf, vf = q.reshape(b * h, nq, d), k.reshape(b * h, nk, d), v.reshape(b * h, nk, dv)
    rows, cols = blocks(policy, b * h, nq, nk, q.dtype.itemsize)
    out = q.new_empty((b * h, nq, dv))
    scale = d ** -0.5
    for r in range(0, b * h, rows):
        for c in range(0, nq, cols):
            out[r:r + rows, c:c + cols] = _block(qf[r:r + rows, c:c + cols], kf[r:r + rows], vf[r:r + rows], scale)
    return out.reshape(b, h, nq, dv)


def _meta_sdpa(q, k, v):
    """SDPA on `meta` (a planned CUDA run) allocating what CUDA's kernel would: the flash kernel for
    fp16/bf16 (output plus an fp32 log-sum-exp row per query), the memory-efficient one for fp32.
    torch's meta SDPA would take the math path and materialise every (Nq, Nk) score block."""
    if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == v.shape[-1] and q.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]
