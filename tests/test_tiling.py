"""Tiled VAE decode and encode, the fp32 redo on fp16 overflow, and the decode memory model.

Run with -s to print the tiled-vs-untiled figures of the tiny VAE.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optimizedSD.model.config import tiny_config
from optimizedSD.model.fragments import VAE
from optimizedSD.engine.tiling import decode_safe, decode_tiled, encode_tiled
from reference import tiny_fragments

MiB = 2**20


@pytest.fixture(scope="module")
def vae():
    return tiny_fragments(tiny_config())[VAE]


class PointwiseDecoder(nn.Module):
    """A test double with no spatial coupling: a 1x1 conv, then each latent pixel becomes an 8x8 block.
    Any partition-of-unity blend of its tiles reproduces the untiled output exactly."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 1)

    def decode(self, z):
        return F.interpolate(self.conv(z), scale_factor=8, mode="nearest")


class TileMeanDecoder(nn.Module):
    """A test double whose output is constant over a tile: the tile's latent mean, at 8x the size."""

    def decode(self, z):
        return z.mean().expand(z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8)


# ---------------------------------------------------------------------------------------------
# decode_tiled
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw, tile", [((8, 8), 8), ((8, 6), 8), ((5, 7), 64)])
def test_one_tile_is_the_untiled_decode(vae, hw, tile):
    z = torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(decode_tiled(vae, z, tile=tile, overlap=2), vae.decode(z))


@pytest.mark.parametrize("hw, tile, overlap", [((48, 40), 32, 8), ((37, 70), 16, 5), ((17, 9), 8, 3),
                                               ((64, 64), 64, 16), ((130, 66), 64, 16), ((12, 40), 16, 4)])
def test_tiles_of_a_pointwise_decoder_reassemble_exactly(hw, tile, overlap):
    """Placement and blend weights: every pixel's weights sum to 1 and come from the tiles covering it."""
    dec = PointwiseDecoder()
    z = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dec.decode(z)
        out = decode_tiled(dec, z, tile=tile, overlap=overlap)
    assert out.shape == (2, 3, hw[0] * 8, hw[1] * 8) and out.dtype == ref.dtype
    assert torch.allclose(out, ref, rtol=0, atol=1e-5)


def test_blend_is_a_linear_ramp_across_the_overlap():
    """Two tiles side by side (latent width 24, tile 16, overlap 8): the overlap is latent columns
    8..15 = pixels 64..127. With a decoder that paints each tile its latent mean, the output is the
    left tile's mean up to pixel 63, the right tile's from pixel 128, and a straight line between."""
    z = torch.arange(24.0).expand(1, 4, 16, 24)  # latent value = column index
    out = decode_tiled(TileMeanDecoder(), z, tile=16, overlap=8)[0, 0, 0]  # one pixel row
    left, right = 7.5, 15.5  # means of columns 0..15 and 8..23
    assert torch.all(out[:64] == left) and torch.all(out[128:] == right)
    ramp = left + (right - left) * (torch.arange(64) + 0.5) / 64
    assert torch.allclose(out[64:128], ramp, atol=1e-5)


def test_tiled_vs_untiled_tiny_vae(vae):
    """A 48x40 latent (384x320 pixels) in 32x32 tiles overlapping by 8 (2x2 tiles) vs one decode.

    Tiles do not reproduce the untiled image exactly: each tile's GroupNorm statistics and its
    mid-block attention see only that tile (and its inner edges see zero padding, which the ramps
    weight down). Measured on this random tiny VAE with N(0, 1) latents, three seeds: max |diff|
    0.41-0.44 against outputs of max |x| 3.3-4.3 and std 0.55; mean |diff| 0.032-0.035, while two
    unrelated latents decode 0.59 apart on average. The bounds below (mean < 0.1 x that control,
    max < 0.2 x the output's max) sit about 1.5x above the measurements, and far below what a
    misplaced tile or a missing normalisation gives (errors of the order of the control).
    """
    g = torch.Generator().manual_seed(0)
    z, other = torch.randn(1, 4, 48, 40, generator=g), torch.randn(1, 4, 48, 40, generator=g)
    with torch.no_grad():
        full, tiled, unrelated = vae.decode(z), decode_tiled(vae, z, tile=32, overlap=8), vae.decode(other)
    assert_close_to_untiled(tiled, full, unrelated, "decode, 48x40 latent")


def assert_close_to_untiled(tiled: torch.Tensor, full: torch.Tensor, unrelated: torch.Tensor, what: str) -> None:
    """Tiled output differs from the untiled `full` (really tiled), by less than a tenth of what an
    unrelated input's output differs on average, and nowhere by a fifth of the output's largest value."""
    diff = (tiled - full).abs()
    control = (unrelated - full).abs().mean().item()
    print(f"\ntiled (32/8) vs untiled {what}: max |diff| {diff.max():.4f} mean |diff| {diff.mean():.4f}; "
          f"untiled max |x| {full.abs().max():.4f} std {full.std():.4f}; unrelated input mean |diff| {control:.4f}")
    assert diff.max() > 0  # really tiled
    assert diff.mean() < 0.1 * control
    assert diff.max() < 0.2 * full.abs().max()


def test_tiled_rejects_bad_overlap(vae):
    with pytest.raises(ValueError, match="overlap"):
        decode_tiled(vae, torch.zeros(1, 4, 16, 16), tile=8, overlap=8)


# ---------------------------------------------------------------------------------------------
# encode_tiled
# ---------------------------------------------------------------------------------------------

class PointwiseEncoder(nn.Module):
    """A test double with no coupling between latent pixels: each 8x8 pixel block is averaged, then
    a 1x1 conv gives the posterior's mean and logvar."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def encode(self, x):
        return self.conv(F.avg_pool2d(x, 8)).chunk(2, dim=1)


@pytest.mark.parametrize("hw, tile", [((64, 64), 8), ((64, 48), 8), ((40, 56), 64)])
def test_one_tile_is_the_untiled_encode(vae, hw, tile):
    x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        for tiled, whole in zip(encode_tiled(vae, x, 8, tile=tile, overlap=2), vae.encode(x)):
            assert torch.equal(tiled, whole)


@pytest.mark.parametrize("hw, tile, overlap", [((48, 40), 32, 8), ((37, 70), 16, 5), ((17, 9), 8, 3), ((130, 66), 64, 16)])
def test_tiles_of_a_pointwise_encoder_reassemble_exactly(hw, tile, overlap):
    """`hw` in latent pixels: every latent pixel's blend weights sum to 1 and come from the tiles covering it."""
    enc = PointwiseEncoder()
    x = torch.randn(2, 3, hw[0] * 8, hw[1] * 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = enc.encode(x)
        out = encode_tiled(enc, x, 8, tile=tile, overlap=overlap)
    for o, r in zip(out, ref):
        assert o.shape == (2, 4, *hw) and o.dtype == r.dtype
        assert torch.allclose(o, r, rtol=0, atol=1e-5)


def test_tiled_vs_untiled_encode_tiny_vae(vae):
    """A 384x320 image (48x40 latent) in 32x32-latent tiles overlapping by 8 (2x2 tiles) vs one
    encode, mean of the posterior. As for decoding, tiles differ from the whole: GroupNorm statistics
    and the mid-block attention see one tile. Measured on this random tiny VAE with U(-1, 1) pixels,
    three seeds: max |diff| 0.155-0.159 against means of max |x| 3.0-3.9 and std 0.54; mean |diff|
    0.018-0.020, while two unrelated images encode 0.50-0.51 apart on average. Bounds as in the
    decode test (mean < 0.1 x that control, max < 0.2 x the untiled mean's max |x|)."""
    g = torch.Generator().manual_seed(0)
    x, other = (torch.rand(1, 3, 384, 320, generator=g) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        full, tiled, unrelated = vae.encode(x)[0], encode_tiled(vae, x, 8, tile=32, overlap=8)[0], vae.encode(other)[0]
    assert_close_to_untiled(tiled, full, unrelated, "encode, 384x320 image, posterior mean")


def test_encode_tiled_needs_whole_latent_pixels(vae):
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_tiled(vae, torch.zeros(1, 3, 100, 64), 8, tile=8, overlap=2)


# ---------------------------------------------------------------------------------------------
# decode_safe
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def overflowing(vae):
    """A float16 copy of the tiny VAE whose decoder conv_in is scaled by 1e5: its output (and every
    residual after it) exceeds fp16's 65504, while GroupNorms bring fp32 activations back to O(1)."""
    big = copy.deepcopy(vae)
    with torch.no_grad():
        big.decoder.conv_in.weight.mul_(1e5)
    return big.half()


def _snapshot(module):
    return [(name, p, p.dtype, p.detach().clone()) for name, p in module.named_parameters()]


def _assert_unchanged(module, snapshot):
    now = list(module.named_parameters())
    assert [n for n, _ in now] == [n for n, *_ in snapshot]
    for (name, p), (_, p0, dtype, value) in zip(now, snapshot):
        assert p is p0 and p.dtype == dtype and torch.equal(p, value), name


@pytest.mark.parametrize("tile", [None, 4])
def test_decode_safe_redoes_fp16_overflow_in_fp32(overflowing, tile):
    z = torch.randn(1, 4, 7, 6, generator=torch.Generator().manual_seed(2))
    snapshot = _snapshot(overflowing)
    with torch.no_grad():
        assert not torch.isfinite(overflowing.decode(z.half())).all()  # the premise: fp16 overflows
        image, redone = decode_safe(overflowing, z, tile=tile, overlap=1)
        # Independent fp32 decode: a converted copy of the same (fp16-rounded) weights.
        fp32 = copy.deepcopy(overflowing).float()
        ref = fp32.decode(z) if tile is None else decode_tiled(fp32, z, tile=tile, overlap=1)
    assert redone and image.dtype == torch.float32 and torch.isfinite(image).all()
    assert torch.allclose(image, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    _assert_unchanged(overflowing, snapshot)


def test_decode_safe_keeps_a_finite_decode(vae):
    z = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(3))
    snapshot = _snapshot(vae)
    with torch.no_grad():
        image, redone = decode_safe(vae, z)
        assert not redone and torch.equal(image, vae.decode(z))
    _assert_unchanged(vae, snapshot)
