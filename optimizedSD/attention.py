"""Attention as a swappable strategy: same inputs, same result, different peak memory.

Every strategy computes softmax(q k^T / sqrt(d)) v for q (B, heads, Nq, d), k and v (B, heads, Nk, d):
- "sdpa":    torch's scaled_dot_product_attention in one call (flash / memory-efficient kernels on
             CUDA never materialise the (Nq, Nk) matrix).
- "sliced":  loops over the B*heads dimension `slice_size` at a time; each slice is plain math.
- "chunked": loops over query tokens, `chunk_size` rows at a time (the (chunk, Nk) score block is
             the largest temporary); also slices B*heads when `slice_size` is set.
The policy is module-global state set once by the pipeline through `set_policy`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

STRATEGIES = ("sdpa", "sliced", "chunked")


@dataclass(frozen=True)
class AttentionPolicy:
    strategy: str = "sdpa"
    slice_size: int | None = None  # rows of B*heads per slice ("sliced", optional for "chunked")
    chunk_size: int = 1024  # query tokens per chunk ("chunked")

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown attention strategy {self.strategy!r}; choose one of {STRATEGIES}")


_policy = AttentionPolicy()


def set_policy(policy: AttentionPolicy) -> None:
    global _policy
    _policy = policy


def get_policy() -> AttentionPolicy:
    return _policy


def _plain(q, k, v):
    """Reference math: (B, h, Nq, d) x (B, h, Nk, d) -> (B, h, Nq, d); the score block is (Nq, Nk)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return torch.matmul(scores.softmax(dim=-1), v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              policy: AttentionPolicy | None = None) -> torch.Tensor:
    policy = policy or _policy
    if policy.strategy == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    b, h, nq, d = q.shape
    # Flatten B*heads so a slice can cut across both.
    qf, kf, vf = (t.reshape(b * h, t.shape[2], d) for t in (q, k, v))
    out = torch.empty_like(qf)
    rows = policy.slice_size or b * h
    cols = policy.chunk_size if policy.strategy == "chunked" else nq
    for r in range(0, b * h, rows):
        for c in range(0, nq, cols):
            out[r:r + rows, c:c + cols] = _plain(qf[r:r + rows, c:c + cols], kf[r:r + rows], vf[r:r + rows])
    return out.reshape(b, h, nq, d)
