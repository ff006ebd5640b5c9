"""Attention strategies against an independent float64 softmax, model outputs under every policy,
and the policy/workspace figures (`auto_policy`, `score_bytes`) against hand-computed numbers.

Tolerances: each strategy does the same float32 math as the float64 reference in a different
blocking, so the difference is float32 rounding: relative 1e-5 of the output scale (an error in a
chunk boundary or a missing row moves outputs by O(1)).
"""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import optimizedSD.model.attention as attention_module
from optimizedSD.model.attention import (DEFAULT_CHUNK, HOST_SCORE_BYTES, AttentionPolicy, attention, auto_policy,
                                   fused_sdpa, get_policy, score_bytes, set_policy)
from optimizedSD.model.config import tiny_config
from optimizedSD.model.fragments import UNET_IN, UNET_OUT, VAE
from reference import tiny_fragments

MiB = 2**20


def math_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64: (B, h, Nq, d), (B, h, Nk, d), (B, h, Nk, dv) -> (B, h, Nq, dv)."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)


def assert_close_to(out, ref, rel=1e-5):
    assert out.shape == ref.shape and out.dtype == torch.float32
    scale = ref.abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= rel * scale, f"max diff {err:.3g} > {rel} x scale {scale:.3g}"


class LiveBytes(TorchDispatchMode):
    """Tracks bytes of tensors created inside the mode and still alive, and their peak (works on `meta`).

    Every non-view op output that is not one of its inputs counts from creation until its Python
    object dies; inputs made before entering the mode are not counted.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            inputs = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and id(t) not in inputs:
                    n = t.numel() * t.element_size()
                    self.live += n
                    weakref.finalize(t, self._free, n)
            self.peak = max(self.peak, self.live)
        return out

    def _free(self, n):
        self.live -= n


# ---------------------------------------------------------------------------------------------
# Every strategy equals the float64 math
# ---------------------------------------------------------------------------------------------

POLICIES = [
    AttentionPolicy("sdpa"),
    AttentionPolicy("sliced", slice_size=3),                  # B*heads = 7: slices 3, 3, 1
    AttentionPolicy("sliced"),                                # all rows at once
    AttentionPolicy("chunked", chunk_size=10),                # 77 = 7 * 10 + 7
    AttentionPolicy("chunked", chunk_size=10, slice_size=3),  # both, neither dividing evenly
    AttentionPolicy("chunked", chunk_size=1),
    AttentionPolicy("chunked"),                               # DEFAULT_CHUNK: one chunk here
    AttentionPolicy("chunked", max_score_bytes=2 * 3 * 10 * 77 * 4),  # budget: 7 rows x 4 queries
    AttentionPolicy("chunked", max_score_bytes=1000),         # below one row of one query: 1 x 1
    AttentionPolicy("sliced", max_score_bytes=2 * 2 * 77 * 77 * 4),   # budget: slices of 2
    auto_policy("cpu"),                                       # SDPA where fused (d == dv), else chunked
]


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("nq, nk, dv", [(77, 77, 16), (50, 77, 16), (77, 13, 24)], ids=["self", "cross", "dv"])
def test_strategy_equals_math(policy, nq, nk, dv):
    g = torch.Generator().manual_seed(nq * 1000 + nk)
    b, h, d = 1, 7, 16
    q = torch.randn(b, h, nq, d, generator=g) * 2  # * 2: a peaked softmax, not a near-uniform one
    k = torch.randn(b, h, nk, d, generator=g)
    v = torch.randn(b, h, nk, dv, generator=g)
    before = [t.clone() for t in (q, k, v)]
    assert_close_to(attention(q, k, v, policy), math_attention(q, k, v))
    assert all(torch.equal(t, t0) for t, t0 in zip((q, k, v), before)), "inputs were modified"
    # B=2 x 3 heads as non-contiguous (B, tokens, heads, d) views, the layout CrossAttention passes.
    q2, k2, v2 = (torch.randn(2, n, 3, d, generator=g).transpose(1, 2) for n in (nq, nk, nk))
    assert_close_to(attention(q2, k2, v2, policy), math_attention(q2, k2, v2))


def test_blocks_are_what_attention_computes(monkeypatch):
    """attention() computes exactly the (rows, cols, Nk) blocks that `blocks`/`score_bytes` describe."""
    seen = []
    real = attention_module._block

    def spy(q, k, v, scale):
        seen.append((q.shape[0], q.shape[1], k.shape[1]))
        return real(q, k, v, scale)

    monkeypatch.setattr(attention_module, "_block", spy)
    q, k, v = torch.randn(1, 7, 77, 8), torch.randn(1, 7, 77, 8), torch.randn(1, 7, 77, 8)
    policy = AttentionPolicy("chunked", chunk_size=10, slice_size=3)
    attention(q, k, v, policy)
    assert len(seen) == 3 * 8  # ceil(7 / 3) slices x ceil(77 / 10) chunks
    assert max(seen) == (3, 10, 77) and (1, 7, 77) in seen  # the ragged last slice and chunk
    assert score_bytes(policy, 1, 7, 77, 77, torch.float32) == 2 * 3 * 10 * 77 * 4


@pytest.mark.parametrize("policy", [AttentionPolicy("sliced", slice_size=3), AttentionPolicy("chunked", chunk_size=100),
                                    AttentionPolicy("chunked", max_score_bytes=3 * MiB)], ids=str)
def test_score_bytes_is_the_measured_workspace(policy):
    """On `meta`, the peak bytes attention() allocates are exactly score_bytes plus its output.

    (q * scale and a block's (rows, cols, d) result are freed before the scores are allocated, or
    allocated after them.)
    """
    b, h, n, d = 2, 4, 1024, 8
    with torch.device("meta"):
        q, k, v = (torch.empty(b, h, n, d) for _ in range(3))
    with LiveBytes() as live:
        out = attention(q, k, v, policy)
    assert live.peak - b * h * n * d * 4 == score_bytes(policy, b, h, n, n, torch.float32)
    del out


# ---------------------------------------------------------------------------------------------
# UNet and VAE give the same outputs under every policy (tiny config)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def frags():
    return tiny_fragments(tiny_config())


@pytest.fixture
def restore_policy():
    previous = get_policy()
    yield
    set_policy(previous)


MODEL_POLICIES = [AttentionPolicy("sliced", slice_size=3), AttentionPolicy("chunked", chunk_size=7),
                  AttentionPolicy("chunked", chunk_size=10, slice_size=1), auto_policy("cpu", max_score_bytes=4096)]


def _unet_and_vae(frags):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 9, 11, generator=g)           # 99 tokens at the first level
    context = torch.randn(2, 77, 32, generator=g)       # cross-attention: Nk = 77
    z = torch.randn(1, 4, 7, 9, generator=g)            # VAE mid-block attention over 63 tokens
    pixels = torch.randn(1, 3, 56, 40, generator=g)     # encoder mid-block attention over 35 tokens
    with torch.no_grad():
        h, emb, skips = frags[UNET_IN](x, torch.tensor([981.0, 3.0]), context)
        return (frags[UNET_OUT](h, emb, skips, context), frags[VAE].decode(z), *frags[VAE].encode(pixels))


@pytest.mark.parametrize("policy", MODEL_POLICIES, ids=str)
def test_models_identical_under_each_policy(frags, policy, restore_policy, monkeypatch):
    set_policy(AttentionPolicy("sdpa"))
    reference = _unet_and_vae(frags)
    set_policy(policy)
    outputs = _unet_and_vae(frags)
    for name, ours, ref in zip(("unet", "vae decode", "vae mean", "vae logvar"), outputs, reference):
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), name
    # The strategy really ran in the VAE's single-head AttnBlocks: (rows, chunk, 32 channels) blocks.
    calls = []
    real = attention_module._block
    monkeypatch.setattr(attention_module, "_block", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        frags[VAE].decode(torch.randn(1, 4, 7, 9))
    assert calls and all(shape[0] == 1 and shape[-1] == 32 for shape in calls)


# ---------------------------------------------------------------------------------------------
# auto_policy and score_bytes against hand-computed figures
# ---------------------------------------------------------------------------------------------

def test_auto_policy():
    assert auto_policy("cuda") == AttentionPolicy("sdpa")
    assert auto_policy(torch.device("cuda", 1)) == AttentionPolicy("sdpa")
    for device in ("cpu", "mps"):
        assert auto_policy(device) == AttentionPolicy("chunked", max_score_bytes=HOST_SCORE_BYTES, sdpa_if_fused=True)
    # A budget forces chunking everywhere, CUDA included.
    assert auto_policy("cuda", max_score_bytes=64 * MiB) == AttentionPolicy("chunked", max_score_bytes=64 * MiB)
    assert auto_policy("cpu", max_score_bytes=10**6).max_score_bytes == 10**6


def test_policy_validation():
    with pytest.raises(ValueError, match="unknown attention strategy"):
        AttentionPolicy("flash")
    with pytest.raises(ValueError, match="chunk_size"):
        AttentionPolicy("chunked", chunk_size=0)
    with pytest.raises(ValueError, match="max_score_bytes"):
        AttentionPolicy("sdpa", max_score_bytes=10)
    with pytest.raises(ValueError, match="sdpa_if_fused"):
        AttentionPolicy("sdpa", sdpa_if_fused=True)
    with pytest.raises(ValueError, match="head dim"):
        score_bytes(AttentionPolicy("sdpa"), 1, 8, 4096, 4096, torch.float16)


F32, F16 = torch.float32, torch.float16


@pytest.mark.parametrize("policy, shape, dtype, expected", [
    # sliced: rows x all Nq x Nk, scores + probabilities
    (AttentionPolicy("sliced", slice_size=3), (1, 7, 77, 77), F32, 2 * 3 * 77 * 77 * 4),
    (AttentionPolicy("sliced"), (2, 8, 4096, 77), F16, 2 * 16 * 4096 * 77 * 2),
    # chunked: rows x chunk x Nk
    (AttentionPolicy("chunked", chunk_size=10, slice_size=3), (1, 7, 77, 77), F32, 2 * 3 * 10 * 77 * 4),
    (AttentionPolicy("chunked"), (2, 8, 4096, 4096), F16, 2 * 16 * DEFAULT_CHUNK * 4096 * 2),   # 256 MiB
    (AttentionPolicy("chunked", chunk_size=5000), (1, 1, 4096, 4096), F32, 2 * 4096 * 4096 * 4),
    # budgets: SD v1 512x512 self-attention (8 heads, 4096 tokens) keeps all 8 rows, 1024 queries
    (AttentionPolicy("chunked", max_score_bytes=256 * MiB), (1, 8, 4096, 4096), F32, 256 * MiB),
    # ... its cross-attention (Nk = 77) fits whole: 8 x 4096 x 77 x 2 x 2 = 9.6 MiB
    (AttentionPolicy("chunked", max_score_bytes=256 * MiB), (1, 8, 4096, 77), F16, 2 * 8 * 4096 * 77 * 2),
    # ... the VAE mid block at a 64x64 latent (1 head, 4096 tokens): all 4096 queries, 128 MiB
    (AttentionPolicy("chunked", max_score_bytes=256 * MiB), (1, 1, 4096, 4096), F32, 2 * 4096 * 4096 * 4),
    # a budget under one query for every row: 100_000 // (2 * 4096 * 4) = 3 rows of 1 query
    (AttentionPolicy("chunked", max_score_bytes=100_000), (1, 8, 4096, 4096), F32, 2 * 3 * 1 * 4096 * 4),
    # under one row of one query: the 1 x 1 x Nk minimum, over budget
    (AttentionPolicy("chunked", max_score_bytes=1000), (1, 8, 4096, 4096), F32, 2 * 4096 * 4),
    # a sliced budget cuts rows only: 256 MiB // (2 * 4096 * 4096 * 4) = 2 rows
    (AttentionPolicy("sliced", max_score_bytes=256 * MiB), (2, 8, 4096, 4096), F32, 2 * 2 * 4096 * 4096 * 4),
    # a budget with explicit caps: chunk_size still bounds the queries
    (AttentionPolicy("chunked", chunk_size=64, max_score_bytes=256 * MiB), (1, 8, 4096, 4096), F32,
     2 * 8 * 64 * 4096 * 4),
])
def test_score_bytes_hand_computed(policy, shape, dtype, expected):
    assert score_bytes(policy, *shape, dtype) == expected
    if policy.max_score_bytes and expected > 2 * shape[-1] * dtype.itemsize:
        assert expected <= policy.max_score_bytes


def test_score_bytes_sdpa_is_accumulator_and_logsumexp():
    # memory-efficient kernel: fp32 (B, h, Nq, d) accumulator + fp32 (B, h, Nq) log-sum-exp, no Nq x Nk
    assert score_bytes(AttentionPolicy("sdpa"), 2, 8, 4096, 4096, F16, d=40) == 2 * 8 * 4096 * 41 * 4
    assert score_bytes(AttentionPolicy("sdpa"), 1, 1, 4096, 4096, F16, d=512) == 4096 * 513 * 4


# ---------------------------------------------------------------------------------------------
# The CPU's policy: SDPA where torch runs it fused, chunked under the budget elsewhere
# ---------------------------------------------------------------------------------------------

def test_fused_sdpa_on_cpu():
    """torch's CPU flash kernel takes equal head dims with the last dim contiguous; the rest would go
    to the math kernel, which materialises the (Nq, Nk) scores."""
    q, k = torch.randn(2, 8, 64, 40), torch.randn(2, 8, 77, 40)
    assert fused_sdpa(q, k, k)                                      # UNet cross-attention's shapes
    assert fused_sdpa(*(torch.randn(2, 77, 8, 40).transpose(1, 2),) * 3)  # CrossAttention's strided views
    assert not fused_sdpa(q, k, torch.randn(2, 8, 77, 24))         # dv != d
    single = torch.randn(1, 512, 64).transpose(1, 2)[:, None]       # (B, 1, tokens, C), channels strided
    assert not fused_sdpa(single, single, single)
    assert fused_sdpa(*(single.contiguous(),) * 3)
    with torch.device("meta"):
        assert not fused_sdpa(q.to("meta"), k.to("meta"), k.to("meta"))


def test_cpu_policy_runs_fused_sdpa_in_both_models(frags, restore_policy, monkeypatch):
    """Under the CPU's auto policy every attention of the UNet and the VAE (encoder and decoder) is
    one fused call (torch's SDPA, or our CPU kernel where it takes it) and none is chunked; outputs
    equal the chunked policy's."""
    set_policy(AttentionPolicy("chunked", chunk_size=7))
    chunked = _unet_and_vae(frags)
    blocks, sdpa = [], []
    real_block, real_sdpa = attention_module._block, attention_module.F.scaled_dot_product_attention
    real_ours = attention_module.cpu_attention.attention
    monkeypatch.setattr(attention_module, "_block", lambda *a: blocks.append(1) or real_block(*a))
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda q, k, v: sdpa.append((q.shape, k.shape)) or real_sdpa(q, k, v))
    monkeypatch.setattr(attention_module.cpu_attention, "attention",
                        lambda q, k, v: sdpa.append((q.shape, k.shape)) or real_ours(q, k, v))
    set_policy(auto_policy("cpu"))
    outputs = _unet_and_vae(frags)
    assert blocks == [] and len(sdpa) > 0
    assert any(shape[1] == 1 for shape, _ in sdpa)  # the VAE's single-head attention went fused too
    for name, ours, ref in zip(("unet", "vae decode", "vae mean", "vae logvar"), outputs, chunked):
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), name


def test_cpu_policy_chunks_what_sdpa_would_materialise():
    """A call SDPA cannot run fused (dv != d) stays under the budget: chunked, never the math kernel's
    whole (Nq, Nk) block (here 2 * 8 * 1024 * 1024 * 4 = 64 MiB against a 4 MiB budget)."""
    budget = 4 * MiB
    policy = AttentionPolicy("chunked", max_score_bytes=budget, sdpa_if_fused=True)
    q, k, v = torch.randn(1, 8, 1024, 16), torch.randn(1, 8, 1024, 16), torch.randn(1, 8, 1024, 24)
    with LiveBytes() as live:
        out = attention(q, k, v, policy)
    assert live.peak - out.numel() * 4 <= budget
    assert_close_to(out, math_attention(q, k, v))
