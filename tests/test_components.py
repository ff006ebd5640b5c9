"""Each fragment against an independent implementation: diffusers, transformers, and a hand-written CLIP.

The path checked is the one a real checkpoint takes: our fragments' weights are written out in the
original CompVis key layout (`checkpoint_key`), diffusers' own single-file converters translate that
dict to diffusers names, and the diffusers/transformers model loads it with `strict=True`, so a key
our layout gets wrong fails here as a missing/unexpected key before any number is compared.

Tolerances: everything runs in float32 on the CPU. Two implementations of the same math differ
only by summation order (conv/matmul blocking, GroupNorm reductions), i.e. a few float32 ulps per
op that grow mildly with depth, so outputs are compared with an absolute tolerance of REL_TOL times
the reference's largest magnitude. A wrong key, a swapped norm, a missing residual or an off-by-one
in upsampling moves outputs by O(scale), orders of magnitude above this.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing below may touch the network
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)

from optimizedSD.model.attention import AttentionPolicy, attention, get_policy, set_policy
from optimizedSD.model.config import SDConfig, tiny_config
from optimizedSD.model.fragments import TEXT_ENCODER, UNET_IN, UNET_OUT, VAE, build_fragments
from reference import checkpoint, diffusers_unet, diffusers_vae, ldm_config, tiny_fragments, transformers_clip

REL_TOL = 1e-5  # max |ours - reference| allowed, as a fraction of max |reference| (float32, see above)


def assert_matches(ours: torch.Tensor, ref: torch.Tensor, rel_tol: float = REL_TOL) -> float:
    """Shapes equal and max |ours - ref| <= rel_tol * max |ref|; returns the relative error."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.isfinite(ref).all()
    scale = ref.abs().max().item()
    assert scale > 1e-3, "degenerate reference output proves nothing"
    err = (ours - ref).abs().max().item() / scale
    assert err <= rel_tol, f"max abs diff {err * scale:.3g} = {err:.3g} x output scale {scale:.3g}"
    return err


# ---------------------------------------------------------------------------------------------
# Fixtures: tiny random fragments, their original-layout checkpoint, the configs diffusers reads
# ---------------------------------------------------------------------------------------------

# A second tiny UNet: three levels (two downsamplers), one res block per level, a level without
# attention (DownBlock2D/UpBlock2D) and two transformer blocks per SpatialTransformer.
_DEEP_UNET = replace(tiny_config(), unet=replace(tiny_config().unet, channel_mult=(1, 2, 2), num_res_blocks=1,
                                                 attention_resolutions=(1, 4), transformer_depth=2))


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    frags = tiny_fragments(cfg)
    return cfg, frags, checkpoint(frags)


@pytest.fixture(scope="module")
def deep_unet():
    frags = tiny_fragments(_DEEP_UNET, seed=1)
    frags = {k: frags[k] for k in (UNET_IN, UNET_OUT)}
    return _DEEP_UNET, frags, checkpoint(frags)


# ---------------------------------------------------------------------------------------------
# UNet: input half -> output half vs diffusers UNet2DConditionModel
# ---------------------------------------------------------------------------------------------

def _unet_eps(frags, x, t, context):
    h, emb, skips = frags[UNET_IN](x, t, context)
    return frags[UNET_OUT](h, emb, skips, context)


@pytest.mark.parametrize("which, hw", [
    ("tiny", (8, 8)),      # 64x64 pixels
    ("tiny", (9, 11)),     # 72x88 pixels: odd sizes, diffusers forwards the upsample size
    ("tiny", (13, 7)),
    ("deep", (8, 8)),
    ("deep", (10, 6)),     # 10 -> 5 -> 3 -> 5 -> 10: only the innermost upsample needs the size
    ("deep", (13, 7)),
])
def test_unet_matches_diffusers(request, which, hw):
    cfg, frags, ckpt = request.getfixturevalue("tiny" if which == "tiny" else "deep_unet")
    ref_model = diffusers_unet(cfg, ckpt)
    g = torch.Generator().manual_seed(hw[0] * 100 + hw[1])
    x = torch.randn(2, cfg.unet.in_channels, *hw, generator=g)
    t = torch.tensor([999.0, 17.0])  # a different timestep per batch item
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    x0, c0 = x.clone(), context.clone()
    with torch.no_grad():
        ours = _unet_eps(frags, x, t, context)
        ref = ref_model(x, t, encoder_hidden_states=context).sample
    assert torch.equal(x, x0) and torch.equal(context, c0), "inputs were modified"
    assert_matches(ours, ref)


def test_unet_scalar_and_fractional_timesteps(tiny):
    """A 0-d timestep broadcasts over the batch; k-diffusion samplers pass fractional t."""
    cfg, frags, ckpt = tiny
    ref_model = diffusers_unet(cfg, ckpt)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    with torch.no_grad():
        assert_matches(_unet_eps(frags, x, torch.tensor(500.25), context),
                       ref_model(x, torch.tensor([500.25, 500.25]), encoder_hidden_states=context).sample)


@pytest.mark.parametrize("policy", [AttentionPolicy("sliced", slice_size=3),
                                    AttentionPolicy("chunked", chunk_size=5, slice_size=2)])
def test_unet_with_memory_saving_attention_matches_diffusers(tiny, policy):
    cfg, frags, ckpt = tiny
    ref_model = diffusers_unet(cfg, ckpt)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 9, 11, generator=g)
    t = torch.tensor([3.0, 641.0])
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    previous = get_policy()
    set_policy(policy)
    try:
        with torch.no_grad():
            ours = _unet_eps(frags, x, t, context)
    finally:
        set_policy(previous)
    with torch.no_grad():
        assert_matches(ours, ref_model(x, t, encoder_hidden_states=context).sample)


# ---------------------------------------------------------------------------------------------
# VAE: encode (posterior mean, logvar) and decode vs diffusers AutoencoderKL
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])  # channels-last: the CPU's
@pytest.mark.parametrize("hw", [(64, 64), (72, 56)])
def test_vae_matches_diffusers(tiny, hw, layout):
    cfg, frags, ckpt = tiny
    ref_model = diffusers_vae(cfg, ckpt)
    ours_vae = frags[VAE]
    g = torch.Generator().manual_seed(hw[0])
    image = torch.rand(2, 3, *hw, generator=g) * 2 - 1
    f = cfg.downsample_factor
    z = torch.randn(2, cfg.vae.embed_dim, hw[0] // f, hw[1] // f, generator=g)
    image0, z0 = image.clone(), z.clone()
    with torch.no_grad():
        mean, logvar = ours_vae.encode(image.contiguous(memory_format=layout))
        posterior = ref_model.encode(image).latent_dist
        decoded = ours_vae.decode(z.contiguous(memory_format=layout))
        ref_decoded = ref_model.decode(z).sample
    assert torch.equal(image, image0) and torch.equal(z, z0), "inputs were modified"
    assert mean.shape == (2, cfg.vae.embed_dim, hw[0] // f, hw[1] // f)
    assert_matches(mean, posterior.mean)
    assert_matches(logvar, posterior.logvar)
    assert decoded.shape == (2, 3, *hw)
    assert_matches(decoded, ref_decoded)


# ---------------------------------------------------------------------------------------------
# Text encoder: vs transformers CLIPTextModel from the converted keys, and vs a hand-written CLIP
# ---------------------------------------------------------------------------------------------

def _reference_clip(sd: dict, tokens: torch.Tensor, cfg) -> torch.Tensor:
    """CLIP's text transformer from its definition (Radford et al. 2021), on original-layout keys.

    token + position embedding; per layer x += attn(LN1(x)) with a causal mask, x += MLP(LN2(x))
    with quick_gelu(a) = a * sigmoid(1.702 a); final LN. Returns (B, tokens, hidden).
    """
    p = "cond_stage_model.transformer.text_model."
    heads, eps = cfg.num_attention_heads, cfg.layer_norm_eps
    b, n = tokens.shape
    x = sd[p + "embeddings.token_embedding.weight"][tokens] + sd[p + "embeddings.position_embedding.weight"][:n]
    causal = torch.full((n, n), float("-inf")).triu(1)  # token i sees tokens <= i

    def ln(v, name):
        return F.layer_norm(v, v.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)

    def linear(v, name):
        return v @ sd[name + ".weight"].T + sd[name + ".bias"]

    for i in range(cfg.num_hidden_layers):
        L = f"{p}encoder.layers.{i}."
        h = ln(x, L + "layer_norm1")
        # (B, n, hidden) -> (B, heads, n, d)
        q, k, v = (linear(h, L + f"self_attn.{w}_proj").reshape(b, n, heads, -1).transpose(1, 2)
                   for w in ("q", "k", "v"))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + causal
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        x = x + linear(a, L + "self_attn.out_proj")
        h = linear(ln(x, L + "layer_norm2"), L + "mlp.fc1")
        x = x + linear(h * torch.sigmoid(1.702 * h), L + "mlp.fc2")
    return ln(x, p + "final_layer_norm")


def _tokens(cfg, seed=0) -> torch.Tensor:
    """Two prompts shaped like the tokenizer's output: BOS, words, EOS, EOS padding to 77."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((2, cfg.max_position_embeddings), 49407)
    tokens[:, 0] = 49406
    tokens[0, 1:6] = torch.randint(0, 49406, (5,), generator=g)
    tokens[1, 1:40] = torch.randint(0, 49406, (39,), generator=g)
    return tokens


def test_text_encoder_matchestransformers_clip(tiny):
    cfg, frags, ckpt = tiny
    ref_model = transformers_clip(cfg, ckpt)
    tokens = _tokens(cfg.text)
    with torch.no_grad():
        assert_matches(frags[TEXT_ENCODER](tokens), ref_model(input_ids=tokens).last_hidden_state)


def test_text_encoder_matches_handwritten_clip(tiny):
    cfg, frags, ckpt = tiny
    tokens = _tokens(cfg.text, seed=1)
    with torch.no_grad():
        ours = frags[TEXT_ENCODER](tokens)
        ref = _reference_clip(ckpt, tokens, cfg.text)
    assert ours.shape == (2, 77, cfg.text.hidden_size)
    assert_matches(ours, ref)
    # Causality: a token's state depends only on tokens up to it (prompt 0's EOS padding at 6..).
    changed = tokens.clone()
    changed[0, 50] = 123
    with torch.no_grad():
        moved = frags[TEXT_ENCODER](changed)
    assert torch.allclose(moved[0, :50], ours[0, :50], rtol=0, atol=1e-6) and not torch.allclose(moved[0, 50:], ours[0, 50:])


# ---------------------------------------------------------------------------------------------
# Attention strategies vs the plain softmax math
# ---------------------------------------------------------------------------------------------

def _softmax_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64, (B, heads, Nq, d) x (B, heads, Nk, d) -> (B, heads, Nq, d)."""
    q, k, v = q.double(), k.double(), v.double()
    w = torch.einsum("bhqd,bhkd->bhqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bhkd->bhqd", w.softmax(-1), v).float()


@pytest.mark.parametrize("policy", [
    AttentionPolicy("sdpa"),
    AttentionPolicy("sliced", slice_size=3),      # B*heads = 7: slices of 3, 3, 1
    AttentionPolicy("sliced", slice_size=7),      # exactly one slice
    AttentionPolicy("sliced", slice_size=100),    # larger than B*heads
    AttentionPolicy("sliced"),                    # no slice_size: all rows at once
    AttentionPolicy("chunked", chunk_size=5),     # 77 = 15*5 + 2, 13 = 2*5 + 3
    AttentionPolicy("chunked", chunk_size=7, slice_size=2),
    AttentionPolicy("chunked", chunk_size=1),
    AttentionPolicy("chunked", chunk_size=1024),  # one chunk
])
@pytest.mark.parametrize("nq, nk", [(77, 77), (13, 77), (77, 13), (64, 5)])
def test_attention_strategies_match_plain_softmax(policy, nq, nk):
    g = torch.Generator().manual_seed(nq * 100 + nk)
    b, heads, d = 1, 7, 16  # B*heads = 7 does not divide by 2 or 3
    q = torch.randn(b, heads, nq, d, generator=g) * 2  # * 2: peaked softmax, not near-uniform
    k = torch.randn(b, heads, nk, d, generator=g)
    v = torch.randn(b, heads, nk, d, generator=g)
    inputs = [t.clone() for t in (q, k, v)]
    out = attention(q, k, v, policy)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), inputs)), "inputs were modified"
    assert_matches(out, _softmax_attention(q, k, v))
    # B=2 with 3 heads: B*heads = 6 slices across the batch boundary.
    q2, k2, v2 = (torch.randn(2, 3, n, d, generator=g) for n in (nq, nk, nk))
    assert_matches(attention(q2, k2, v2, policy), _softmax_attention(q2, k2, v2))


def test_attention_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="unknown attention strategy"):
        AttentionPolicy("flash")


# ---------------------------------------------------------------------------------------------
# Full-size SD v1 on `meta`: parameter counts and the key layout diffusers' converters expect
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_size():
    cfg = SDConfig()
    with torch.device("meta"):
        frags = build_fragments(cfg)
    return cfg, frags, checkpoint(frags)


def _count(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_full_size_parameter_counts(full_size):
    _, frags, _ = full_size
    assert all(p.is_meta for m in frags.values() for p in m.parameters())
    assert _count(frags[UNET_IN], frags[UNET_OUT]) == 859_520_964
    assert _count(frags[TEXT_ENCODER]) == 123_060_480
    assert _count(frags[VAE]) == 83_653_863


def test_full_size_unet_layout_is_what_diffusers_converts(full_size):
    cfg, frags, ckpt = full_size
    config = create_unet_diffusers_config_from_ldm(ldm_config(cfg), ckpt)
    converted = convert_ldm_unet_checkpoint(ckpt, config)
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    # strict=True checks names and shapes; every one of our UNet tensors is used exactly once
    model.load_state_dict(converted, strict=True, assign=True)
    assert len(converted) == len([k for k in ckpt if k.startswith("model.diffusion_model.")])
    assert _count(model) == 859_520_964


def test_full_size_vae_layout_is_what_diffusers_converts(full_size):
    cfg, frags, ckpt = full_size
    config = create_vae_diffusers_config_from_ldm(ldm_config(cfg), ckpt)
    assert config["scaling_factor"] == cfg.scale_factor == 0.18215
    converted = convert_ldm_vae_checkpoint(ckpt, config)
    with torch.device("meta"):
        model = DiffusersAutoencoderKL(**config)
    model.load_state_dict(converted, strict=True, assign=True)
    assert len(converted) == len(frags[VAE].state_dict())
    assert _count(model) == 83_653_863


def test_full_size_text_encoder_layout_is_what_transformers_loads(full_size):
    cfg, frags, ckpt = full_size
    with torch.device("meta"):
        model = transformers_clip(cfg, ckpt)
    assert _count(model) == 123_060_480
