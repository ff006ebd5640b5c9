"""The SD v1 UNet (CompVis `openaimodel.UNetModel` with spatial transformers), split in two halves.

`UNetInput` holds `time_embed`, `input_blocks`, `middle_block`; `UNetOutput` holds `output_blocks`
and `out`. Attribute paths equal the checkpoint keys under `model.diffusion_model.`. The input half
returns the hidden state, the time embedding and the skip connections the output half consumes.

Each half is also a list of steps (`steps()`: name, function of a `Carry`), one per layer of a block
(`input_blocks.4.0` the ResBlock, `input_blocks.4.1` its transformer: the names are the layers'
checkpoint paths; `time_embed` and `out` are one step each), so a caller can run one step on several
chunks of rows before the next (block-major order: the offload engine then moves each streamed
layer once per evaluation, whatever the number of chunks; a layer rather than a whole block, so that
no block of up to 185 MiB (the middle block, fp16) has to be on the device at once). `forward` is
those steps in order on one chunk. The UNet computes in its input's dtype. Each step drops what it
read as soon as nothing reads it any more (the output half's skip connection after the join).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import inplace
from .attention import attention
from .config import UNetConfig
from .weight_cast import weights_for


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input and weight dtypes, as the reference ResBlocks do
    (CUDA autocast computes group_norm in fp32 anyway; CPU autocast does not, and upcast or bf16 weights
    are cast here)."""

    def forward(self, x):
        w, b = (None if p is None else p.float() for p in (self.weight, self.bias))
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            # ATen's CPU kernel reads bf16 in fp32 (its opmath) and rounds once: the fp32 path below
            # without its two copies, about 4x faster at SD's sizes; its statistics are summed in another
            # order, so 1 in 10^4-10^6 values lands one bf16 step away (tests/test_bf16.py)
            return F.group_norm(x, self.num_groups, w, b, self.eps)
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t f), sin(t f)], f_i = max_period^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepBlock(nn.Module):
    """Marker: a block whose forward takes the time embedding."""


def run_layer(layer: nn.Module, x, emb, context=None, upsample_size=None):
    """One layer of a block, given the time embedding, context or output size it takes."""
    if isinstance(layer, TimestepBlock):
        return layer(x, emb)
    if isinstance(layer, SpatialTransformer):
        return layer(x, context)
    if isinstance(layer, Upsample):
        return layer(x, upsample_size)
    return layer(x)


class TimestepEmbedSequential(nn.Sequential):
    """Runs children in order, giving the time embedding and context to those that take them."""

    def forward(self, x, emb, context=None, upsample_size=None):
        for layer in self:
            x = run_layer(layer, x, emb, context, upsample_size)
        return x


def block_started(step: str) -> str | None:
    """The block (`input_blocks.4`, `middle_block`, `time_embed`) whose first step is `step`
    (`input_blocks.4.0`, `middle_block.0`, `time_embed`), or None for a later step of a block."""
    parts = step.split(".")
    if parts[0] in ("input_blocks", "output_blocks"):
        return ".".join(parts[:2]) if parts[2:] == ["0"] else None
    return parts[0] if parts[1:] in ([], ["0"]) else None


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        # Nearest x2, or to the skip connection's size when H/W are not multiples of 64 (as diffusers does).
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class ResBlock(TimestepBlock):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), inplace.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_channels), inplace.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))
        self.adapter = None  # hook point: arXiv 2303.18181's ResBlock adapter (custom/adapters.py attaches it)

    def forward(self, x, emb):
        at = None if self.adapter is None else self.adapter.tap()
        if at is not None:
            x = at("resi", x)
        plus = inplace.add if at is None else torch.add  # an adapter may keep a tensor it read: new sums
        h = self.in_layers(x)
        h = plus(h, self.emb_layers(emb).type(h.dtype)[..., None, None])
        out = plus(self.out_layers(h), self.skip_connection(x))
        return out if at is None else at("reso", out)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, _ = x.shape
        # (B, tokens, heads*dim) -> (B, heads, tokens, dim)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        # proj's two halves as two products (row slices of its weight: views, and what LoRA patched),
        # so the gate comes out contiguous: gelu on the strided half of one product took 2.5x as long
        # (CPU, 64x64 latents). fp8 storage (model/fp8.py) is cast to the input's dtype first.
        w, b = weights_for(self.proj, x)
        n = w.shape[0] // 2
        return inplace.mul(F.gelu(F.linear(x, w[n:], b[n:])), F.linear(x, w[:n], b[:n]))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.adapter_inout = None  # hook point: arXiv 2303.18181's adapter (custom/adapters.py attaches it)

    def forward(self, x, context):
        if self.adapter_inout is None:
            x = inplace.add(self.attn1(self.norm1(x)), x)
            x = inplace.add(self.attn2(self.norm2(x), context), x)
            return inplace.add(self.ff(self.norm3(x)), x)
        # The same data path with the adapter's positions named (Xiang-cd/unet-finetune
        # BasicTransformerBlock._forward): it reads at one, adds at another; the rest pass through.
        at = self.adapter_inout.tap()
        x = at("attn1i", x)
        out = at("attn1o", self.attn1(self.norm1(x)))
        x = at("attn2i", out + x)
        out = at("attn2o", self.attn2(self.norm2(x), at("attn2c", context)))
        x = at("ffni", out + x)
        out = at("ffno", self.ff(self.norm3(x)))
        return at("transo", out + x)


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        for block in self.transformer_blocks:
            x = block(x, context)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        return inplace.add(self.proj_out(x), x_in)


def _heads(cfg: UNetConfig, ch: int) -> tuple[int, int]:
    if cfg.num_head_channels == -1:
        return cfg.num_heads, ch // cfg.num_heads
    return ch // cfg.num_head_channels, cfg.num_head_channels


def _transformer(cfg: UNetConfig, ch: int) -> SpatialTransformer:
    heads, dim_head = _heads(cfg, ch)
    return SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim)


def _input_channels(cfg: UNetConfig) -> list[int]:
    """Channel count of every skip connection the input half emits, in order."""
    chans = [cfg.model_channels]
    ch = cfg.model_channels
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            ch = mult * cfg.model_channels
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            chans.append(ch)
    return chans


@dataclass
class Carry:
    """What one chunk of rows carries from one UNet block to the next."""
    h: torch.Tensor  # (rows, C, H, W): the input latents at first, the predicted noise after `out`
    context: torch.Tensor  # (rows, tokens, dim)
    t: torch.Tensor | None = None  # (rows,) timesteps, until `time_embed` has used them
    emb: torch.Tensor | None = None  # (rows, 4 * model_channels) time embedding
    skips: list[torch.Tensor] = field(default_factory=list)  # input_blocks' outputs, consumed last-first
    # hook point (a ControlNet, engine/control.py): residuals, one per skip connection and the middle
    # block's last (None: nothing to add); popped as `skips` are, each added to its skip connection (the
    # last to the middle block's output)
    control: list[torch.Tensor] | None = None


class UNetInput(nn.Module):
    """time_embed + input_blocks + middle_block: (x, t, context) -> (h, emb, skips)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        blocks = [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(_transformer(cfg, ch))
                blocks.append(TimestepEmbedSequential(*layers))
            if level != len(cfg.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(ch)))
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch), _transformer(cfg, ch), ResBlock(ch, emb_dim, ch))
        self.model_channels = mc

    def units(self):
        """(step name, the module it runs) of every step, in the order they run (`steps`)."""
        return ([("time_embed", self.time_embed)]
                + [(f"input_blocks.{i}.{j}", layer) for i, block in enumerate(self.input_blocks)
                   for j, layer in enumerate(block)]
                + [(f"middle_block.{j}", layer) for j, layer in enumerate(self.middle_block)])

    def steps(self):
        """(step name, step(carry)) of every layer of every block, in the order they run."""
        out = [("time_embed", self._embed)]
        for i, block in enumerate(self.input_blocks):
            out += [(f"input_blocks.{i}.{j}", partial(self._input, layer, j == len(block) - 1))
                    for j, layer in enumerate(block)]
        last = len(self.middle_block) - 1
        return out + [(f"middle_block.{j}", partial(self._middle, layer, j == last))
                      for j, layer in enumerate(self.middle_block)]

    def _embed(self, c: Carry) -> None:
        t = c.t.reshape(-1).expand(c.h.shape[0]) if c.t.numel() == 1 else c.t
        c.emb, c.t = self.time_embed(timestep_embedding(t, self.model_channels).to(c.h.dtype)), None

    @staticmethod
    def _input(layer, last: bool, c: Carry) -> None:
        c.h = run_layer(layer, c.h, c.emb, c.context)
        if last:  # the block's output is a skip connection
            c.skips.append(c.h)

    @staticmethod
    def _middle(layer, last: bool, c: Carry) -> None:
        c.h = run_layer(layer, c.h, c.emb, c.context)
        residual = c.control.pop() if last and c.control else None
        if residual is not None:
            c.h = inplace.add(c.h, residual)

    def forward(self, x, t, context):
        c = Carry(x, context, t)
        for _, step in self.steps():
            step(c)
        return c.h, c.emb, c.skips


class UNetOutput(nn.Module):
    """output_blocks + out: (h, emb, skips, context) -> predicted noise. Consumes `skips` (popped)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        skip_chans = _input_channels(cfg)
        ch = cfg.channel_mult[-1] * mc
        ds = 2 ** (len(cfg.channel_mult) - 1)
        blocks = []
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_dim, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(_transformer(cfg, ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(GroupNorm32(32, ch), inplace.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def units(self):
        """(step name, the module it runs) of every step, in the order they run (`steps`)."""
        return ([(f"output_blocks.{i}.{j}", layer) for i, block in enumerate(self.output_blocks)
                 for j, layer in enumerate(block)] + [("out", self.out)])

    def steps(self):
        """(step name, step(carry)) of every layer of every block, in the order they run."""
        return ([(f"output_blocks.{i}.{j}", partial(self._output, layer, j == 0))
                 for i, block in enumerate(self.output_blocks) for j, layer in enumerate(block)]
                + [("out", self._out)])

    @staticmethod
    def _output(layer, first: bool, c: Carry) -> None:
        if first:  # the block's input: h joined with its skip connection (and a ControlNet's residual)
            skip, residual = c.skips.pop(), c.control.pop() if c.control else None
            h = torch.cat([c.h, skip if residual is None else skip + residual], dim=1)
            c.h = skip = None  # both halves of the join are read: freed while the layer runs
        else:
            h, c.h = c.h, None  # this step's reference is the only one
        # An upsampler brings h to the size of the next skip connection it will be joined with.
        c.h = run_layer(layer, h, c.emb, c.context, upsample_size=c.skips[-1].shape[-2:] if c.skips else None)

    def _out(self, c: Carry) -> None:
        c.h, c.emb = self.out(c.h), None

    def forward(self, h, emb, skips, context):
        c = Carry(h, context, emb=emb, skips=list(skips))
        for _, step in self.steps():
            step(c)
        return c.h
