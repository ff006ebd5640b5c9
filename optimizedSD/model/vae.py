"""The SD v1 KL autoencoder (CompVis `AutoencoderKL` with `Encoder`/`Decoder`), keys as in the checkpoint.

`encode` returns the posterior's (mean, logvar); `decode` maps a latent (already divided by the
latent scale) to pixels in [-1, 1] (unclamped).

Row bands (`banding`): at 512x512 the decoder's full-resolution maps are 64-128 MiB each (fp16), and
a GroupNorm, its SiLU and the convolution reading them would hold two or three at once. Within
`banding(nbytes)` each decoder ResnetBlock, Upsample and the output layers compute their convolutions
on bands of output rows (the rows a band reads, one more above and below, normalised and activated
for that band only, at most `nbytes` of fp32 at a time), writing into the layer's output; the
GroupNorm statistics are gathered over the whole map first, band by band (Chan et al.'s pairwise
mean/variance), so the result is the unbanded one up to float rounding (tests/test_vae.py). A map
that fits one band is computed unbanded. The decoder's `parts` are what its forward runs one after
the other (an offload engine may bring each to the device on its own).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from . import inplace
from .attention import attention
from .config import VAEConfig


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


_band_bytes: int | None = None  # `banding`: fp32 bytes of one band's temporaries, or None (whole maps)


@contextmanager
def banding(nbytes: int | None):
    """Decode in row bands of at most `nbytes` of fp32 temporaries (None: whole maps) inside the block."""
    global _band_bytes
    previous, _band_bytes = _band_bytes, nbytes
    try:
        yield
    finally:
        _band_bytes = previous


def get_banding() -> int | None:
    return _band_bytes


def _band_rows(x: torch.Tensor, factor: int = 1) -> int | None:
    """Output rows per band for a layer reading `x` (B, C, H, W) (`factor` output rows per input row),
    or None when banding is off or the whole map is one band."""
    if _band_bytes is None:
        return None
    b, c, h, w = x.shape
    rows = max(1, _band_bytes // (b * c * w * factor * factor * 4))
    return rows if rows < h * factor else None


def _like(x: torch.Tensor, channels: int, h: int, w: int) -> torch.Tensor:
    """An empty (B, channels, h, w) map in `x`'s dtype, device and memory format."""
    fmt = (torch.channels_last if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
           else torch.contiguous_format)
    return torch.empty((x.shape[0], channels, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)


def _group_stats(norm: nn.GroupNorm, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) per (batch, group) of x (B, C, H, W), fp32, gathered over bands of `rows` rows
    (each band's mean and variance combined pairwise: Chan, Golub and LeVeque 1979)."""
    b, g = x.shape[0], norm.num_groups
    count, mean, m2 = 0, None, None
    for r in range(0, x.shape[2], rows):
        band = x[:, :, r:r + rows].float().reshape(b, g, -1)
        var_b, mean_b = torch.var_mean(band, dim=-1, correction=0)
        n = band.shape[-1]
        del band
        if mean is None:
            count, mean, m2 = n, mean_b, var_b * n
            continue
        delta = mean_b - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + var_b * n + delta * delta * (count * n / total)
        count = total
    return mean, torch.rsqrt(m2 / count + norm.eps)


def _normed_silu(norm: nn.GroupNorm, stats, band: torch.Tensor) -> torch.Tensor:
    """silu(norm(band)) with the whole map's statistics, computed in fp32, in the band's dtype."""
    mean, rstd = stats
    b, c = band.shape[:2]
    g = norm.num_groups
    y = band.to(torch.float32, copy=True).reshape(b, g, -1)  # a copy: written in place below, never the map
    y = y.sub_(mean[..., None]).mul_(rstd[..., None]).reshape(band.shape)
    if norm.weight is not None:
        y = y.mul_(norm.weight.float()[:, None, None]).add_(norm.bias.float()[:, None, None])
    return F.silu(y, inplace=True).to(band.dtype)


def _conv_rows(conv: nn.Conv2d, x: torch.Tensor, r0: int, r1: int, pre, up: int = 1) -> torch.Tensor:
    """Output rows [r0, r1) of conv(pre(up(x))) for a 3x3, stride 1, padding 1 conv, where up is a
    nearest upsampling by `up` (1: none): the input rows those outputs read, `pre` applied to them,
    the image border zero-padded as the conv pads it."""
    h = x.shape[2] * up
    lo, hi = max(0, r0 - 1), min(h, r1 + 1)  # the (upsampled) rows read
    a, b = lo // up, (hi - 1) // up + 1
    band = pre(x[:, :, a:b])
    if up != 1:
        band = F.interpolate(band, scale_factor=float(up), mode="nearest")[:, :, lo - a * up:hi - a * up]
    band = F.pad(band, (0, 0, 1 if r0 == 0 else 0, 1 if r1 >= h else 0))
    return F.conv2d(band, conv.weight, conv.bias, 1, (0, 1))


def _banded_conv(conv: nn.Conv2d, x: torch.Tensor, rows: int, pre=lambda t: t, up: int = 1,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """conv(pre(up(x))) computed `rows` output rows at a time into one output map (or added into `out`)."""
    h, w = x.shape[2] * up, x.shape[3] * up
    result = _like(x, conv.out_channels, h, w) if out is None else out
    for r in range(0, h, rows):
        part = _conv_rows(conv, x, r, min(h, r + rows), pre, up)
        if out is None:
            result[:, :, r:r + rows] = part
        else:
            result[:, :, r:r + rows] += part
        del part
    return result


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        rows = _band_rows(x)
        if rows is not None:
            return self._banded(x, rows)
        # one name for the data path, so each intermediate is freed once its reader ran: at most x, a
        # convolution's input and its output live at once (the full-size decoder's peak at 512x512)
        h = inplace.silu(self.norm1(x))
        h = self.conv1(h)
        h = inplace.silu(self.norm2(h))
        h = self.conv2(self.dropout(h))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return inplace.add(h, x)

    def _banded(self, x, rows):
        """`forward` in row bands (`banding`): x, conv1's output and conv2's output are the only full
        maps, and the shortcut is added band by band into the last."""
        stats = _group_stats(self.norm1, x, rows)
        h = _banded_conv(self.conv1, x, rows, lambda t: _normed_silu(self.norm1, stats, t))
        stats = _group_stats(self.norm2, h, rows)
        out = _banded_conv(self.conv2, h, rows, lambda t: _normed_silu(self.norm2, stats, t))
        del h
        for r in range(0, x.shape[2], rows):
            band = x[:, :, r:r + rows]
            out[:, :, r:r + rows] += self.nin_shortcut(band) if hasattr(self, "nin_shortcut") else band
        return out


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 convolutions as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C) with the channels innermost, as a fused SDPA kernel needs them:
        # already so when x is channels-last (the CPU decodes so), else copied
        q, k, v = (t.permute(0, 2, 3, 1).reshape(b, 1, h * w, c).contiguous()
                   for t in (self.q(n), self.k(n), self.v(n)))
        out = attention(q, k, v).reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides
        return inplace.add(self.proj_out(out), x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the reference


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        rows = _band_rows(x, 2)
        if rows is not None:  # the upsampled map exists a band at a time
            return _banded_conv(self.conv, x, rows, up=2)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`): resnet blocks, optional attention."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        res, block_in = cfg.resolution, cfg.ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, cfg.ch * mult))
                block_in = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            stage = Level(blocks, attns)
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = Mid(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(inplace.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = Mid(block_in)
        levels = []
        for level in reversed(range(len(cfg.ch_mult))):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[level]))
                block_in = cfg.ch * cfg.ch_mult[level]
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            stage = Level(blocks, attns)
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, stage)  # up.0 is the full-resolution level
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)
        self.visit = None  # hook point: a context manager factory each part runs inside (`forward`)

    def parts(self) -> list[tuple[str, list[nn.Module]]]:
        """(name, modules) of what `forward` runs one after the other: conv_in, mid, every block,
        attention and upsampler of the levels (up.3 first, named by checkpoint path), then "out"
        (norm_out and conv_out)."""
        out = [("conv_in", [self.conv_in]), ("mid", [self.mid])]
        for i in reversed(range(len(self.up))):
            stage = self.up[i]
            for j, block in enumerate(stage.block):
                out.append((f"up.{i}.block.{j}", [block]))
                if len(stage.attn):
                    out.append((f"up.{i}.attn.{j}", [stage.attn[j]]))
            if hasattr(stage, "upsample"):
                out.append((f"up.{i}.upsample", [stage.upsample]))
        return out + [("out", [self.norm_out, self.conv_out])]

    def forward(self, z):
        # hook point (an offload engine): visit(part name) is a context each part runs inside
        visit = self.visit or _nothing
        h = z
        # the parts one by one (not Level.forward), so each input is freed once read
        for name, (part, *_) in self.parts()[:-1]:
            with visit(name):
                h = part(h)
        with visit("out"):
            rows = _band_rows(h)
            if rows is None:
                return self.conv_out(inplace.silu(self.norm_out(h)))
            stats = _group_stats(self.norm_out, h, rows)
            return _banded_conv(self.conv_out, h, rows, lambda t: _normed_silu(self.norm_out, stats, t))


@contextmanager
def _nothing(name):
    yield


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels (B, 3, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, embed_dim, H/f, W/f)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (B, embed_dim, h, w) -> pixels (B, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, z):
        return self.decode(z)
