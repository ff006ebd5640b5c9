"""Our CPU attention kernels (optimizedSD/model/cpu_attention.py, kernels/attention.c), bf16 and fp32,
against softmax(q k^T / sqrt(d)) v computed in float64 from the same inputs, with torch's own SDPA in
the same dtype as the yardstick for the rounding that dtype allows; which calls take them; and the
fallbacks.

The kernels run on any CPU with AVX512-BF16 (these tests call them there, AMX CPUs included, where the
engine itself keeps torch's bf16 kernel); elsewhere they are skipped, saying so.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optimizedSD.model import attention as attention_module
from optimizedSD.model import cpu_attention

HAS_BF16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no AVX512-BF16, which the kernel needs")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """dtype -> our C function, built from the source in a cache of the test's own."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    try:
        yield {dtype: cpu_attention.load_kernel(dtype) for dtype in (torch.bfloat16, torch.float32)}
    except OSError as e:  # .ci/run installs a compiler; elsewhere say why
        pytest.skip(f"the kernel cannot be built here: {e}")
    finally:
        mp.undo()


@pytest.fixture
def kernel(kernels):
    return kernels[torch.bfloat16]


def _inputs(b, h, n, m, d, dv, seed, token_major=True, dtype=torch.bfloat16):
    """q, k, v as the UNet hands them: (B, h, N, d) views of (B, N, h, d) tensors (or contiguous)."""
    g = torch.Generator().manual_seed(seed)

    def make(tokens, dim, spread):
        t = torch.randn(b, tokens, h, dim, generator=g) * spread
        t = t.to(dtype).transpose(1, 2)
        return t if token_major else t.contiguous()

    return make(n, d, 1.5), make(m, d, 1.5), make(m, dv, 1.0)


def _exact(q, k, v):
    q, k, v = (t.double() for t in (q, k, v))
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v


SHAPES = [
    (2, 8, 1024, 1024, 40, 40),   # SD's 32² self-attention shape class, head dim 40
    (2, 8, 300, 77, 40, 40),      # cross-attention: 77 keys (not a multiple of 16)
    (2, 8, 256, 256, 80, 80),     # head dim 80 (5 vectors of 16)
    (2, 4, 64, 77, 160, 160),     # head dim 160 (two output chunks)
    (1, 1, 600, 600, 512, 512),   # the VAE's single-head attention (32 vectors of 16)
    (1, 3, 37, 53, 10, 6),        # odd sizes everywhere, dv != d, fewer queries than one task
    (3, 2, 25, 1, 2, 17),         # one key, head dim 2, a 17-dim value
]


@needs_bf16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("b,h,n,m,d,dv", SHAPES + [(1, 2, 33, 20, 7, 9)])  # fp32 only: an odd head dim
def test_kernel_is_softmax_attention_within_rounding(kernels, dtype, b, h, n, m, d, dv):
    if dtype == torch.bfloat16 and d % 2:
        pytest.skip("bf16 takes even head dims (cpu_attention.handles)")
    q, k, v = _inputs(b, h, n, m, d, dv, seed=n + m + d, dtype=dtype)
    exact = _exact(q, k, v)
    ours = cpu_attention.attention(q, k, v, kernel=kernels[dtype])
    torch_same_dtype = F.scaled_dot_product_attention(q, k, v)
    assert ours.shape == (b, h, n, dv) and ours.dtype == dtype
    err, yardstick = (ours.double() - exact).abs(), (torch_same_dtype.double() - exact).abs()
    # bf16: about one of bf16's steps at the output (2^-8 relative), as torch's kernel; fp32: a few fp32 steps
    floor = 1e-3 if dtype == torch.bfloat16 else 1e-6
    assert err.max() <= 1.25 * yardstick.max() + floor, (err.max(), yardstick.max())
    assert err.mean() <= 1.25 * yardstick.mean() + floor / 10, (err.mean(), yardstick.mean())


@needs_bf16
def test_kernel_reads_any_token_strides(kernel):
    """Token-major views (the UNet's) and contiguous heads (the VAE's) give the same bits."""
    a = cpu_attention.attention(*_inputs(2, 4, 100, 90, 40, 40, seed=1), kernel=kernel)
    b = cpu_attention.attention(*_inputs(2, 4, 100, 90, 40, 40, seed=1, token_major=False), kernel=kernel)
    assert torch.equal(a, b)
    # the result is (B, h, N, dv) over (B, N, h, dv) memory: the UNet's transpose back is free
    assert a.transpose(1, 2).is_contiguous()


@needs_bf16
def test_a_masked_out_key_weighs_nothing(kernel):
    """Keys past a 16-key tile (padding) must not enter the softmax: with one real key the output is
    that key's value, exactly."""
    q, k, v = _inputs(1, 2, 30, 1, 40, 24, seed=3)
    out = cpu_attention.attention(q, k, v, kernel=kernel)
    assert torch.equal(out, v.expand(1, 2, 30, 24))


def test_handles_only_what_the_kernel_computes(monkeypatch):
    monkeypatch.setattr(cpu_attention, "_load", lambda dtype: object())  # as on a CPU the kernels are for
    q, k, v = _inputs(1, 2, 8, 8, 40, 40, seed=0)
    assert cpu_attention.handles(q, k, v) and cpu_attention.handles(q.float(), k.float(), v.float())
    assert not cpu_attention.handles(q.half(), k.half(), v.half())            # fp16: torch's kernel
    assert not cpu_attention.handles(q, k.float(), v)                         # mixed dtypes
    assert not cpu_attention.handles(q[..., :39], k[..., :39], v)             # bf16, odd head dim
    assert cpu_attention.handles(q[..., :39].float(), k[..., :39].float(), v.float())  # fp32 takes it
    wide = _inputs(1, 2, 8, 8, 160, 160, seed=0, dtype=torch.float32)
    assert cpu_attention.handles(*_inputs(1, 2, 8, 8, 80, 80, seed=0, dtype=torch.float32))
    assert not cpu_attention.handles(*wide)                                   # fp32 past d 80: torch's is faster
    assert cpu_attention.handles(*(t.bfloat16() for t in wide))
    assert not cpu_attention.handles(q, k[..., :32], v)                       # q and k dims differ
    assert not cpu_attention.handles(q.transpose(-1, -2), k, v)               # last dim not contiguous
    assert not cpu_attention.handles(q.to("meta"), k.to("meta"), v.to("meta"))
    leaf = q.detach().requires_grad_()
    assert not cpu_attention.handles(leaf, k, v)                              # autograd: torch's
    with torch.no_grad():
        assert cpu_attention.handles(leaf, k, v)


def test_sdpa_calls_go_to_the_kernel_where_it_handles_them(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_attention, "handles", lambda q, k, v: q.dtype == torch.bfloat16)
    monkeypatch.setattr(cpu_attention, "attention", lambda q, k, v: calls.append(q.shape) or torch.zeros(1))
    q, k, v = _inputs(1, 2, 8, 8, 40, 40, seed=0)
    attention_module.attention(q, k, v, attention_module.AttentionPolicy("sdpa"))
    assert calls == [q.shape]
    out = attention_module.attention(q.float(), k.float(), v.float(), attention_module.AttentionPolicy("sdpa"))
    assert len(calls) == 1 and torch.allclose(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float()))
    # an explicit sliced/chunked policy keeps its own blocks
    attention_module.attention(q, k, v, attention_module.AttentionPolicy("chunked", chunk_size=4))
    assert len(calls) == 1


@pytest.mark.parametrize("setting,why", [
    ({"OPTIMIZEDSD_CPU_ATTENTION": "torch"}, "turned off by OPTIMIZEDSD_CPU_ATTENTION=torch"),
    ({"CC": "/nonexistent/cc"}, "the kernel could not be built"),
])
def test_fallback_says_why(monkeypatch, tmp_path, setting, why):
    monkeypatch.setattr(cpu_attention, "_kernels", {})
    monkeypatch.setattr(cpu_attention, "_why", {})
    monkeypatch.setattr(cpu_attention, "_cpu_wants", lambda dtype: None)  # as on a CPU the kernels are for
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    bf16, fp32 = cpu_attention.status().split("; ")
    assert bf16.startswith(f"bf16 attention: torch's kernel ({why}") and fp32.startswith(f"fp32 attention: torch's kernel ({why}")
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = _inputs(1, 2, 8, 8, 40, 40, seed=0, dtype=dtype)
        assert not cpu_attention.handles(q, k, v)
        out = attention_module.attention(q, k, v, attention_module.AttentionPolicy("sdpa"))
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left in the cache


@needs_bf16
def test_build_is_cached_by_source(kernel, monkeypatch, tmp_path):  # (kernel: skipped where none can be built)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = cpu_attention._build()
    assert first.parent == tmp_path / "optimizedSD" and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert cpu_attention._build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no leftovers of the build


@needs_bf16
def test_unet_and_vae_run_every_attention_on_the_kernels(kernels, monkeypatch):
    """Every attention of the tiny UNet (self and cross) and of the VAE decoder goes to our kernels: in
    fp32 their outputs equal torch's within fp32 rounding; under bf16 autocast, as a bf16 CPU run computes,
    they follow the fp32 model as closely as the same bf16 model through torch's SDPA does."""
    from reference import tiny_fragments

    from optimizedSD.model.config import tiny_config
    from optimizedSD.model.fragments import UNET_IN, UNET_OUT, VAE

    frags = tiny_fragments(tiny_config())
    g = torch.Generator().manual_seed(5)
    x, context, z = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g), \
        torch.randn(1, 4, 16, 16, generator=g)

    def run(bf16: bool):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            h, emb, skips = frags[UNET_IN](x, torch.tensor([981.0, 3.0]), context)
            return frags[UNET_OUT](h, emb, skips, context).float(), frags[VAE].decode(z).float()

    monkeypatch.setattr(cpu_attention, "_load", lambda dtype: None)  # torch's kernels
    torch_fp32, torch_bf16 = run(bf16=False), run(bf16=True)
    calls = []
    real = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "_load", lambda dtype: kernels[dtype])
    monkeypatch.setattr(cpu_attention, "attention",
                        lambda q, k, v: calls.append((q.dtype, *k.shape[1:3])) or real(q, k, v, kernels[q.dtype]))
    ours_fp32, ours_bf16 = run(bf16=False), run(bf16=True)
    # (dtype, heads, keys): the UNet's self-attention at 16² and 8² and its cross-attention; the VAE's at 16²
    assert sorted(set(calls), key=str) == sorted({(dt, *hk) for dt in (torch.float32, torch.bfloat16)
                                                  for hk in ((1, 256), (2, 64), (2, 77), (2, 256))}, key=str)
    for name, o, ref in zip(("unet", "vae decode"), ours_fp32, torch_fp32):
        assert torch.allclose(o, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), name
    for name, o, t, ref in zip(("unet", "vae decode"), ours_bf16, torch_bf16, torch_fp32):
        scale = ref.abs().max()
        assert (o - ref).abs().max() <= 1.5 * (t - ref).abs().max() + 1e-3 * scale, name
        assert (o - ref).abs().mean() <= 1.5 * (t - ref).abs().mean() + 1e-4 * scale, name
