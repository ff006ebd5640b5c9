"""Applying ControlNets to a render: which nets act at which step, with what weight, on which rows.

A request's `controls` are `ControlUnit`s (one per net: its file, its control image and settings).
`Control` runs them inside every UNet evaluation (`Pipeline._unet`): before each UNet input-half block
it runs the ControlNet blocks that mirror it (model/controlnet.py: the hint encoder before the first
input block), on every chunk of rows, each inside `Offloader.block` (so they stream block by block
with the UNet, `offload.unet_units`), and adds each zero-conv output, scaled, into the chunk's
`Carry.control` (the UNet's hook point: added to the skip connections as the output half takes
them, the last to the middle block's output). The residuals of several nets are summed
(diffusers' `MultiControlNetModel`).

Per net, as diffusers' `StableDiffusionControlNetPipeline` and the webui's extension:
- `weight` (diffusers' `controlnet_conditioning_scale`) scales every residual;
- `start`/`end` (diffusers' `control_guidance_start/end`): with N sampling steps, step i acts when
  i/N >= start and (i+1)/N <= end (N: the steps walked, after img2img's strength); an evaluation
  between two steps' sigmas (Heun, DPM2) belongs to the earlier step;
- `mode`: "balanced" runs the net on the unconditional and conditional rows (batched: once per
  evaluation for both); "prompt" (the webui's "My prompt is more important") scales residual k of
  n by 0.825 ** (n - 1 - k) (the webui's `0.825 ** (12 - i)` for SD 1.5's 13); "control" ("ControlNet
  is more important", diffusers' `guess_mode`) also runs the net on the conditional rows only, the
  unconditional ones getting nothing. diffusers' guess mode scales by `logspace(-1, 0, n)`, i.e.
  10 ** (-(n - 1 - k) / (n - 1)): 0.8254 ** (12 - k) for n = 13, within 0.6 % of the webui's.
A net that does not act at a step is not run (nor streamed: `Offloader.idle`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.controlnet import ControlCarry
from ..model.unet import Carry

CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "control": "ControlNet is more important"}  # ours -> the webui's label
SOFT_DECAY = 0.825  # the webui's per-depth factor of "My prompt / ControlNet is more important"


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet of a request. `model`: a ControlNet file (or a name found in the ControlNet
    folders); `image`: the control image (a path or PIL image; `Request.complete` reads it);
    `preprocessor`, `low`, `high`: what makes the map from it (engine/control_images.py); `resize`:
    how it is brought to the render's size."""
    model: str | Path
    image: object = None
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    preprocessor: str = "none"
    low: int = 100
    high: int = 200
    resize: str = "crop and resize"
    image_name: str | None = None  # for the metadata; taken from a path


@dataclass
class ActiveNet:
    """A ControlNet loaded for a render: fragment name, module, hint (1, C, H, W) in [0, 1] on the host."""
    fragment: str
    net: torch.nn.Module
    hint: torch.Tensor
    unit: ControlUnit


class Control:
    """The ControlNets of one render, run inside each UNet evaluation (see the module docstring)."""

    def __init__(self, nets: list[ActiveNet], engine):
        self.nets = nets
        self.engine = engine  # the Offloader: block() for every ControlNet block, idle for the nets that rest
        self._timesteps = None  # (N,) the walked steps' DDPM timesteps, decreasing
        self._guided = True
        self._hints: dict[str, torch.Tensor] = {}  # fragment -> hint on the device, in the compute dtype
        self._run: list[tuple[ActiveNet, float]] = []  # this evaluation's acting nets and their weights
        self._carries: dict[str, list[tuple[Carry, ControlCarry | None, slice]]] = {}

    def begin(self, timesteps: torch.Tensor, guided: bool) -> None:
        """A sampling loop starts: its walked steps' timesteps (N,), and whether rows come as
        cat([uncond, cond]) (classifier-free guidance) or cond alone."""
        self._timesteps, self._guided = timesteps.float().cpu(), guided
        self._hints.clear()

    def step_of(self, t: float) -> int:
        """The index of the step an evaluation at DDPM timestep t belongs to."""
        return max(0, int((self._timesteps >= t - 1e-3).sum()) - 1)

    def weight(self, unit: ControlUnit, step: int) -> float:
        """The net's weight at `step` of N: 0 outside its window (diffusers' `controlnet_keep`)."""
        n = len(self._timesteps)
        keep = not (step / n < unit.start or (step + 1) / n > unit.end)
        return float(unit.weight) if keep else 0.0

    # ---- one evaluation -------------------------------------------------------------------------
    def evaluation(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, chunks: list[Carry],
                   unet_bs: int) -> None:
        """Set up the nets acting in this evaluation of rows x (N, C, h, w) at timesteps t (N,), cut
        into `chunks` of `unet_bs` rows: a `ControlCarry` per net and chunk on the rows it sees, and
        each chunk's `control` list to sum the residuals into."""
        step = 0 if t.is_meta else self.step_of(float(t[0]))  # planning: every net acts
        self._run = [(a, w) for a in self.nets for w in (self.weight(a.unit, step),) if w != 0.0]
        acting = {a.fragment for a, _ in self._run}
        self.engine.idle = {u for a in self.nets if a.fragment not in acting for u in self.engine.units[a.fragment]}
        self._carries.clear()
        if not self._run:
            return
        rows = x.shape[0]
        first_cond = rows // 2 if self._guided else 0
        for chunk in chunks:
            chunk.control = None
        for a, _ in self._run:
            hint = self._hint(a, x)
            carries = []
            for j, chunk in enumerate(chunks):
                lo, hi = j * unet_bs, min(rows, (j + 1) * unet_bs)
                if a.unit.mode == "control":  # the conditional rows only (diffusers' guess_mode)
                    lo = max(lo, first_cond)
                if lo >= hi:
                    carries.append((chunk, None, slice(0)))
                    continue
                inside = slice(lo - j * unet_bs, hi - j * unet_bs)  # those rows within the chunk
                carry = ControlCarry(x[lo:hi, :a.net.input_blocks[0][0].in_channels], context[lo:hi], t[lo:hi],
                                     hint=hint.expand(hi - lo, -1, -1, -1))
                carries.append((chunk, carry, inside))
            self._carries[a.fragment] = carries

    def _hint(self, a: ActiveNet, x: torch.Tensor) -> torch.Tensor:
        hint = self._hints.get(a.fragment)
        if hint is None or hint.dtype != x.dtype:
            hint = self._hints[a.fragment] = a.hint.to(x.device, x.dtype)
        return hint

    def steps_for(self, unet_step: str):
        """[(unit, run())] of the acting nets' blocks that go just before UNet input-half step
        `unet_step`, in run order (as `offload.unet_units` orders them)."""
        from ..model.controlnet import unet_step_of

        out = []
        for a, w in self._run:
            for name, step in a.net.steps():
                if unet_step_of(name) == unet_step:
                    out.append((f"{a.fragment}.{name}", self._runner(a, w, name, step)))
        return out

    def _runner(self, a: ActiveNet, weight: float, name: str, step):
        n = len(a.net.input_blocks) + 1  # residuals: one per skip connection, then the middle block's
        k = n - 1 if name == "middle_block" else int(name.split(".")[1]) if name.startswith("input_blocks.") else None
        scale = weight * (SOFT_DECAY ** (n - 1 - k) if k is not None and a.unit.mode != "balanced" else 1.0)

        def run():
            for chunk, carry, inside in self._carries[a.fragment]:
                if chunk.control is None:
                    chunk.control = [None] * n
                if carry is None:
                    continue
                step(carry)
                if k is not None:  # the block made residual k
                    self._add(chunk, k, carry.skips.pop() * scale, inside)
        return run

    @staticmethod
    def _add(chunk: Carry, k: int, residual: torch.Tensor, inside: slice) -> None:
        rows = chunk.h.shape[0]
        if inside.stop - inside.start == rows:
            full = residual
        else:  # some rows of the chunk get nothing from this net
            full = residual.new_zeros((rows, *residual.shape[1:]))
            full[inside] = residual
        chunk.control[k] = full if chunk.control[k] is None else chunk.control[k] + full

    def end_evaluation(self) -> None:
        self._carries.clear()
        self.engine.idle = set()
