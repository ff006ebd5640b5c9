"""Robust VAE decoding and encoding: overlapping latent tiles, an fp32 redo when fp16 overflows, and
the decode memory model a planner uses to decide when to tile.

Tiles are laid out on the latent grid, (B, z_channels, h, w), the latent the VAE's `decode` takes
(already divided by the latent scale). To decode, a tile's pixels are its latent pixels times the
decoder's upsampling factor (8 for SD v1), read off the first decoded tile rather than assumed; to
encode, a tile is that many image pixels per latent pixel.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ..model.upcast import UpcastMode
from ..model.vae import banding


# ---- tiled decode ---------------------------------------------------------------------------

def _starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along an axis of `n` latent pixels: as few tiles as keep every overlap >= `overlap`,
    spread evenly from 0 to n - tile (so the overlaps differ by at most one latent pixel)."""
    if n <= tile:
        return [0]
    count = -(-(n - overlap) // (tile - overlap))  # ceil: tiles needed at stride tile - overlap
    return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def _ramps(starts: list[int], size: int, f: int) -> list[torch.Tensor]:
    """Per-tile 1-D blend weights in pixels, (size * f,) each: 1 inside, a linear ramp across the part
    shared with each neighbour ((i + 0.5) / n up, its mirror down), nothing at the image border.
    Where exactly two tiles meet the two ramps sum to 1."""
    out = []
    for i, s in enumerate(starts):
        w = torch.ones(size * f)
        if i > 0:
            n = (starts[i - 1] + size - s) * f
            w[:n] = torch.minimum(w[:n], (torch.arange(n) + 0.5) / n)
        if i < len(starts) - 1:
            n = (s + size - starts[i + 1]) * f
            w[-n:] = torch.minimum(w[-n:], (n - 0.5 - torch.arange(n)) / n)
        out.append(w)
    return out


def _tiled(fn, x: torch.Tensor, tile: int, overlap: int, down: int = 1) -> torch.Tensor:
    """`fn(x)` on overlapping tiles of `x`, blended. Tiles are laid out on a grid of latent pixels:
    one grid unit is `down` pixels of `x` (1 to decode a latent, the VAE's f to encode an image) and
    as many pixels of `fn`'s output as it returns per unit (f to decode, 1 to encode)."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tiled VAE needs 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    h, w = x.shape[-2] // down, x.shape[-1] // down
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    if len(ys) == len(xs) == 1:
        return fn(x)
    th, tw = min(tile, h), min(tile, w)
    out = wy = wx = None
    for i, y in enumerate(ys):
        for j, x0 in enumerate(xs):
            part = fn(x[..., y * down:(y + th) * down, x0 * down:(x0 + tw) * down])  # (B, C, th * f, tw * f)
            if out is None:
                f = part.shape[-1] // tw
                out = part.new_zeros((*part.shape[:2], h * f, w * f), dtype=torch.float32)
                wy = [r.to(part.device) for r in _ramps(ys, th, f)]
                wx = [r.to(part.device) for r in _ramps(xs, tw, f)]
            out[..., y * f:(y + th) * f, x0 * f:(x0 + tw) * f] += part.float() * (wy[i][:, None] * wx[j])
    # Normalise by the summed weights (1 wherever at most two tiles meet along each axis).
    total_y = torch.zeros(h * f, device=out.device)
    total_x = torch.zeros(w * f, device=out.device)
    for y, r in zip(ys, wy):
        total_y[y * f:(y + th) * f] += r
    for x0, r in zip(xs, wx):
        total_x[x0 * f:(x0 + tw) * f] += r
    return (out / (total_y[:, None] * total_x)).to(part.dtype)


# fp32 bytes of one row band's temporaries when a tiled decode computes in bands (`model.vae.banding`):
# at 512x512 the full-resolution layers then take 16 to 32 rows at a time
BAND_BYTES = 16 * 2**20


def decode_tiled(vae, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """`vae.decode(z)` computed on overlapping (tile, tile) latent tiles, blended with linear ramps.

    z: (B, C, h, w) latent -> (B, 3, h * f, w * f) in the decode's dtype. A latent that fits one tile
    is decoded whole (identical to `vae.decode`). Otherwise tiles overlap by at least `overlap`
    latent pixels and each pixel is the ramp-weighted mean of the tiles covering it. The result is
    not bit-identical to an untiled decode: GroupNorm statistics and the mid-block attention see one
    tile instead of the whole latent. Each tile is decoded in row bands (`BAND_BYTES`, `model.vae.banding`:
    the unbanded result up to float rounding). Peak memory is one tile's decode plus the fp32 output.
    """
    with banding(BAND_BYTES):
        return _tiled(vae.decode, z, tile, overlap)


def encode_tiled(vae, image: torch.Tensor, f: int, tile: int = 64, overlap: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """`vae.encode(image)` computed on overlapping image tiles of (tile * f)^2 pixels, the posterior's
    mean and logvar blended with linear ramps on the latent grid, as `decode_tiled` blends pixels.

    image: (B, 3, H, W), H and W multiples of the VAE's downsampling factor `f` -> (mean, logvar),
    each (B, C, H / f, W / f). An image that fits one tile is encoded whole (identical to
    `vae.encode`); larger ones differ slightly from untiled encoding, for the same reasons as tiled
    decoding. Peak memory is one tile's encode plus the fp32 moments.
    """
    if image.shape[-2] % f or image.shape[-1] % f:
        raise ValueError(f"tiled encode needs an image whose sides are multiples of {f}, got {tuple(image.shape[-2:])}")
    moments = _tiled(lambda x: torch.cat(vae.encode(x), dim=1), image, tile, overlap, down=f)
    return moments.chunk(2, dim=1)


# ---- fp16 overflow ----------------------------------------------------------------------------

def _autocast_off(device: torch.device):
    return torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else nullcontext()


def decode_safe(vae, z: torch.Tensor, tile: int | None = None, overlap: int = 16,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, bool]:
    """Decode z cast to `dtype` (default: the VAE's weight dtype); if that yields NaN/inf (fp16
    overflow), decode again in fp32 arithmetic.

    Returns (image (B, 3, H, W), redone). The first pass runs under whatever autocast or upcast the
    caller set up; tiles when `tile` is given (both passes). The redo computes every layer in fp32
    from the same weights (`UpcastMode`: each fp16 weight cast just before use), from the caller's z
    in fp32 with autocast off: the module is never converted, so the offload engine's parameter
    swaps and host masters stay intact, and only one layer's fp32 weight copy exists at a time. A
    first pass already in fp32 is not redone. Tiles are decoded in row bands, as `decode_tiled` does.
    """
    def run(decode, latent):
        if tile is None:
            return decode(latent)
        with banding(BAND_BYTES):
            return _tiled(decode, latent, tile, overlap)

    dtype = dtype or next(vae.parameters()).dtype
    image = run(vae.decode, z.to(dtype))
    if dtype == torch.float32 or torch.isfinite(image).all():
        return image, False
    with _autocast_off(z.device), UpcastMode():
        image = run(vae.decode, z.float())
    return image, True
