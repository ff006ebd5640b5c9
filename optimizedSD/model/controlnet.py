"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a
trained copy of the UNet's input half and middle block, fed the latents plus a hint image, whose
zero-convolution outputs are added to the UNet's skip connections and middle-block output
(lllyasviel/ControlNet `cldm/cldm.py` `ControlNet`).

Attribute paths equal the original checkpoint's keys under `control_model.`: `time_embed`,
`input_hint_block`, `input_blocks`, `zero_convs`, `middle_block`, `middle_block_out`. The network is
built from the `UNetConfig` of the UNet it controls (the skip connections must match) and a hint
channel count. Like the UNet halves it is a list of steps (`steps()`), one per streamed block, run on
a `ControlCarry`; its residuals collect in `carry.skips` in the order the UNet emits its skips, the
middle block's last. Nothing here knows the UNet it feeds: the engine adds the residuals through
`unet.Carry.control` (engine/control.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .config import UNetConfig
from .unet import Carry, TimestepEmbedSequential, UNetInput, _input_channels

# The hint encoder's channels and strides (cldm.py: fixed, whatever the UNet's width).
HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)
SD15_CONTEXT_DIM = 768


@dataclass
class ControlCarry(Carry):
    """A chunk's state through one ControlNet: `hint` (rows, hint_channels, H, W) in [0, 1] until the
    hint encoder has used it, then `guided` (rows, model_channels, h, w) until the first input block
    has; `skips` collects the zero-conv outputs (the residuals)."""
    hint: torch.Tensor | None = None
    guided: torch.Tensor | None = None


class ControlNet(UNetInput):
    """time_embed + input_hint_block + input_blocks + zero_convs + middle_block + middle_block_out."""

    def __init__(self, cfg: UNetConfig, hint_channels: int = 3):
        super().__init__(cfg)
        mc = cfg.model_channels
        layers, ch = [], hint_channels
        for out, stride in zip(HINT_CHANNELS, HINT_STRIDES):
            layers += [nn.Conv2d(ch, out, 3, stride=stride, padding=1), nn.SiLU()]
            ch = out
        self.input_hint_block = TimestepEmbedSequential(*layers, nn.Conv2d(ch, mc, 3, padding=1))
        self.zero_convs = nn.ModuleList(TimestepEmbedSequential(nn.Conv2d(c, c, 1)) for c in _input_channels(cfg))
        ch = cfg.channel_mult[-1] * mc
        self.middle_block_out = TimestepEmbedSequential(nn.Conv2d(ch, ch, 1))
        self.hint_channels = hint_channels

    def steps(self):
        """(block name, step(carry)) in run order; each name is also the offload unit's suffix."""
        return ([("time_embed", self._embed), ("input_hint_block", self._hint)]
                + [(f"input_blocks.{i}", partial(self._control_input, i)) for i in range(len(self.input_blocks))]
                + [("middle_block", self._control_middle)])

    def _hint(self, c: ControlCarry) -> None:
        c.guided, c.hint = self.input_hint_block(c.hint.to(c.h.dtype), c.emb, c.context), None

    def _control_input(self, i: int, c: ControlCarry) -> None:
        h = self.input_blocks[i](c.h, c.emb, c.context)
        if c.guided is not None:  # the first block: the encoded hint joins the latents' features
            h, c.guided = h + c.guided, None
        c.h = h
        c.skips.append(self.zero_convs[i](h, c.emb, c.context))

    def _control_middle(self, c: ControlCarry) -> None:
        c.h = self.middle_block(c.h, c.emb, c.context)
        c.skips.append(self.middle_block_out(c.h, c.emb, c.context))
        c.h = c.emb = None

    def forward(self, x, hint, t, context) -> list[torch.Tensor]:
        """The residuals (one per UNet skip connection, then the middle block's) for latents x
        (B, C, h, w), hint (B, hint_channels, H, W) in [0, 1], timesteps t (B,), context (B, tokens, dim)."""
        c = ControlCarry(x, context, t, hint=hint)
        for _, step in self.steps():
            step(c)
        return c.skips


def unit_modules(net: ControlNet) -> list[tuple[str, list[nn.Module]]]:
    """(block name, the modules whose weights it moves) of every streamed block, in run order."""
    out = [("time_embed", [net.time_embed]), ("input_hint_block", [net.input_hint_block])]
    out += [(f"input_blocks.{i}", [b, z]) for i, (b, z) in enumerate(zip(net.input_blocks, net.zero_convs))]
    out.append(("middle_block", [net.middle_block, net.middle_block_out]))
    return out


# Which UNet input-half step each ControlNet block runs just before (the hint encoder before the
# first input block): the order the engine streams and runs them in.
def unet_step_of(block: str) -> str:
    return "input_blocks.0" if block == "input_hint_block" else block
