"""Planning device memory without a GPU: runs of the real pipeline on torch's `meta` device.

`predict` runs text encoding, one sampling step and the decode of one batch with the weights and
activations on `meta`, under a `MetaMeter`: the live meta storages are what a CUDA run would hold,
so its figures are the planned peak device bytes of each phase (a sampling step's peak is the same
at every step). `plan_budget` searches the settings that fit a `--vram` budget: first the number of
images sampled at once, `unet_bs` and tiled VAE encoding/decoding at the lowest residency, then as many UNet
blocks resident as still fit (a prefix of the blocks in run order: the input half first).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch

from .attention import auto_policy, using_policy
from .config import SDConfig
from .memory import MetaMeter
from .offload import Offloader, unet_units

GiB = 2 ** 30
_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


class PlanError(Exception):
    """No setting fits the budget."""


def parse_size(text: str) -> int:
    """'2G', '2GB', '2GiB', '1536M', '0.75g', '3000000000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtb]?)(?:i?b)?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 2G, 1536M or 0.75G")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def gib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / GiB:.2f} GiB"


@dataclass(frozen=True)
class MemoryPlan:
    mode: str = "default"  # "default", "turbo" or "stream" (see offload.py)
    resident: tuple[str, ...] = ()  # UNet blocks kept on the device while sampling ("stream")
    batch: int | None = None  # images sampled at once (None: all of --n_samples)
    unet_bs: int = 1
    tile: bool = False  # tiled VAE encode and decode
    peaks: dict = field(default_factory=dict, compare=False)  # predicted phase -> bytes

    def peak(self) -> int:
        return max(self.peaks.values(), default=0)


@functools.cache
def _meta_fragments(cfg: SDConfig, dtype: torch.dtype):
    """The fragments with every weight on `meta`: the host masters of a planning run cost nothing."""
    from .fragments import build_fragments

    with torch.device("meta"):
        return {name: m.to(dtype) for name, m in build_fragments(cfg).items()}


def predict(cfg: SDConfig, dtype: torch.dtype, plan: MemoryPlan, height: int, width: int, batch: int,
            guided: bool = True, encode: bool = False, fragments=None) -> tuple[dict[str, int], int]:
    """(planned peak device bytes per phase, host->device bytes per sampling step) of `plan`; with
    `encode`, the init image's VAE encoding (img2img, inpainting) too. `fragments`: host fragments to
    plan with (e.g. `checkpoint.empty_fragments`, LoRA-patched); default: built from `cfg` on meta."""
    from .pipeline import Pipeline, SampleSettings

    fragments = _meta_fragments(cfg, dtype) if fragments is None else fragments
    with using_policy(auto_policy("cuda")), MetaMeter() as meter:  # the kernels of the CUDA run planned
        engine = Offloader(fragments, torch.device("meta"), plan.mode, plan.resident, meter=meter)
        pipe = Pipeline(cfg, engine, dtype=dtype, unet_bs=plan.unet_bs, tile=plan.tile)
        settings = SampleSettings("ddim", 1, scale=7.5 if guided else 1.0)
        seeds = list(range(batch))
        image = torch.zeros(1, 3, height, width, device="meta")
        if cfg.unet.in_channels == cfg.channels:
            latents = pipe.txt2img_latents("plan", "", seeds, height, width, settings)
            if encode:
                pipe.encode(image, [torch.Generator("cpu")])
        else:  # a 9-channel inpainting UNet samples only with its mask and masked-image latents
            mask = torch.zeros(1, 1, height, width, device="meta")
            latents = pipe.inpaint_latents("plan", "", seeds, image, mask, settings)
        pipe.decode(latents)
    _clear_hooks(fragments)
    return dict(engine.peaks), engine.phase_bytes.get("sample", 0)


def _clear_hooks(fragments) -> None:
    for m in fragments.values():
        for sub in m.modules():
            sub._forward_pre_hooks.clear()
            sub._forward_hooks.clear()


def _halvings(n: int) -> list[int]:
    out = [n]
    while out[-1] > 1:
        out.append((out[-1] + 1) // 2)
    return out


def plan_budget(cfg: SDConfig, dtype: torch.dtype, budget: int, height: int, width: int, n_samples: int,
                guided: bool = True, encode: bool = False) -> MemoryPlan:
    """The fastest settings whose planned peak, in every phase, is at most `budget` bytes."""
    lowest = None
    for batch in _halvings(n_samples):
        rows = batch * (2 if guided else 1)
        for unet_bs in _halvings(rows):
            for tile in (False, True):
                plan = MemoryPlan("stream", (), batch, unet_bs, tile)
                peaks, _ = predict(cfg, dtype, plan, height, width, batch, guided, encode)
                plan = MemoryPlan("stream", (), batch, unet_bs, tile, peaks)
                lowest = plan if lowest is None or plan.peak() < lowest.peak() else lowest
                if plan.peak() <= budget:
                    return _most_resident(cfg, dtype, plan, budget, height, width, guided, encode)
                if max(peaks.get("decode", 0), peaks.get("encode", 0)) <= budget:
                    break  # tiling cannot help: the VAE already fits
    raise PlanError(f"--vram {gib(budget)} is too small for {width}x{height}: the lowest setting needs "
                    f"{gib(lowest.peak())}; use a smaller size or a larger --vram")


def _most_resident(cfg, dtype, plan: MemoryPlan, budget, height, width, guided, encode) -> MemoryPlan:
    """Binary search on the number of resident UNet blocks (a prefix in run order)."""
    units = [u for u, _ in unet_units(_meta_fragments(cfg, dtype))]
    best, lo, hi = plan, 1, len(units)
    while lo <= hi:
        k = (lo + hi) // 2
        mode = "turbo" if k == len(units) else "stream"
        candidate = MemoryPlan(mode, tuple(units[:k]) if mode == "stream" else (), plan.batch, plan.unet_bs, plan.tile)
        peaks, _ = predict(cfg, dtype, candidate, height, width, plan.batch, guided, encode)
        if max(peaks.values()) <= budget:
            best, lo = MemoryPlan(candidate.mode, candidate.resident, plan.batch, plan.unet_bs, plan.tile, peaks), k + 1
        else:
            hi = k - 1
    return best


def choose_plan(cfg: SDConfig, dtype: torch.dtype, *, turbo: bool, lowvram: bool, vram: int | None,
                unet_bs: int, height: int, width: int, n_samples: int, guided: bool,
                encode: bool = False) -> MemoryPlan:
    """The memory settings of a run: --turbo, --lowvram, --vram SIZE, or the four-fragment default."""
    if vram is not None:
        return plan_budget(cfg, dtype, vram, height, width, n_samples, guided, encode)
    if lowvram:  # tiles only change images larger than one tile (512x512 pixels)
        return MemoryPlan("stream", (), None, unet_bs, tile=True)
    return MemoryPlan("turbo" if turbo else "default", (), None, unet_bs)


def describe(plan: MemoryPlan, n_units: int) -> str:
    """One line for the log: what stays on the device and how the batch is cut."""
    where = {"default": "one UNet half on the device at a time", "turbo": "whole UNet on the device",
             "stream": f"{len(plan.resident)} of {n_units} UNet blocks resident, the rest streamed"}[plan.mode]
    batch = f"{plan.batch} image(s) at once, " if plan.batch else ""
    return f"memory: {where}; {batch}--unet_bs {plan.unet_bs}{'; tiled VAE' if plan.tile else ''}"
