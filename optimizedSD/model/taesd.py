"""TAESD's decoder (madebyollin/taesd, "Tiny AutoEncoder for Stable Diffusion"): scaled SD latents
(B, 4, h, w) -> images (B, 3, 8h, 8w), a few MB of weights, for live previews.

The layout of `taesd_decoder.pth` / `taesd_decoder.safetensors` (an `nn.Sequential`; the index is the
key's first part):

    0 Clamp (3 tanh(x / 3))     1 conv 3x3 4->C     2 ReLU
    3-5 Block x3   6 Upsample x2 (nearest)   7 conv 3x3 C->C, no bias
    8-10 Block x3  11 Upsample   12 conv        13-15 Block x3  16 Upsample  17 conv
    18 Block       19 conv 3x3 C->3

Block(x) = ReLU(conv3x3 -> ReLU -> conv3x3 -> ReLU -> conv3x3 (x) + x)  (`.conv.0/.2/.4`, no `.skip`
when in and out channels agree). C = 64 in the released files. Its raw output is about [0, 1];
`TaesdDecoder` returns [-1, 1] like the VAE (2 x - 1, as diffusers' `AutoencoderTiny.decode`).

Read also: diffusers' `AutoencoderTiny` names (`decoder.layers.N...`: the same modules one index lower,
the Clamp being in its forward) and a `decoder.` prefix (the webui's and ComfyUI's copies). The
module is built from the file's own shapes (any C, any number of blocks per stage) and loaded strictly.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn


class TaesdError(ValueError):
    """A file that is not a TAESD decoder; the message says which and why."""


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(n_in, n_out, 3, padding=1), nn.ReLU(), nn.Conv2d(n_out, n_out, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(n_out, n_out, 3, padding=1))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


class TaesdDecoder(nn.Module):
    """`layers` in the released files' order and names; forward -> images in about [-1, 1]."""

    def __init__(self, layers: nn.Sequential):
        super().__init__()
        self.layers = layers

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z) * 2 - 1


def taesd_keys(state: dict) -> dict:
    """A decoder file's tensors under the released layout's keys (`1.weight`, `3.conv.0.weight`, ...)."""
    if any(k.startswith("decoder.layers.") for k in state):  # diffusers' AutoencoderTiny: one index lower
        out = {}
        for k, v in state.items():
            if k.startswith("decoder.layers."):
                i, rest = k[len("decoder.layers."):].split(".", 1)
                out[f"{int(i) + 1}.{rest}"] = v
        return out
    return {k.removeprefix("decoder."): v for k, v in state.items() if not k.startswith("encoder.")}


def build_decoder(state: dict) -> TaesdDecoder:
    """The decoder that `state` (released layout, `taesd_keys`) fits, from its shapes."""
    index = re.compile(r"^(\d+)\.(.+)$")
    parts: dict[int, set[str]] = {}
    for k in state:
        m = index.match(k)
        if not m:
            raise TaesdError(f"unexpected key {k!r}")
        parts.setdefault(int(m.group(1)), set()).add(m.group(2))
    if not parts or 1 not in parts or "weight" not in parts[1]:
        raise TaesdError("no first convolution (key 1.weight)")
    layers = []
    last = max(parts)
    for i in range(last + 1):
        names = parts.get(i)
        if i == 0:
            layers.append(Clamp())
        elif names is None:  # no weights: a ReLU after the first conv, else an upsampling before a conv
            nxt = parts.get(i + 1, set())
            layers.append(nn.Upsample(scale_factor=2) if "weight" in nxt and "bias" not in nxt else nn.ReLU())
        elif "conv.0.weight" in names:
            w = state[f"{i}.conv.0.weight"]
            layers.append(Block(w.shape[1], w.shape[0]))
        elif "weight" in names:
            w = state[f"{i}.weight"]
            layers.append(nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2,
                                    bias="bias" in names))
        else:
            raise TaesdError(f"layer {i} has neither a convolution nor a block: {sorted(names)}")
    decoder = TaesdDecoder(nn.Sequential(*layers))
    try:
        decoder.layers.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TaesdError(str(e).splitlines()[0]) from None
    if decoder.layers[1].in_channels != 4 or decoder.layers[-1].out_channels != 3:
        raise TaesdError("not an SD v1 decoder (4 latent channels in, 3 colours out)")
    return decoder.eval().requires_grad_(False)


def load_taesd(path: str | Path, dtype: torch.dtype = torch.float32) -> TaesdDecoder:
    """A TAESD decoder file (.safetensors, or a .pth read with weights_only) -> `TaesdDecoder` on the host."""
    path = Path(path)
    if not path.is_file():
        raise TaesdError(f"TAESD decoder file not found: {path}; check the --taesd path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one message
        raise TaesdError(f"cannot read TAESD decoder {path.name}: {e}") from None
    try:
        return build_decoder(taesd_keys(state)).to(dtype)
    except TaesdError as e:
        raise TaesdError(f"{path.name} is not a TAESD decoder ({e}); give taesd_decoder.pth or .safetensors") from None
