"""Planning device memory without a GPU: runs of the real pipeline on torch's `meta` device.

`predict` runs text encoding, one sampling step and the decode of one batch with the weights and
activations on `meta`, under a `MetaMeter`: the live meta storages are what a CUDA run would hold,
so its figures are the planned peak device bytes of each phase and the host->device bytes of a
step (a sampling step's are the same at every step). The meter replays repeated ops and module
calls from their recorded traces, so a plan takes a fraction of a second once warm; results are
cached. `plan_budget` searches the settings that fit a `--vram` budget for the one with the lowest
modelled step time (`step_seconds`): images at once, `--unet_bs`, resident UNet blocks (a prefix of
the blocks in run order) and tiled VAE encoding/decoding.
"""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass, field

import torch

from ..model.attention import auto_policy, using_policy
from ..model.config import SDConfig
from ..model.fragments import TEXT_ENCODER
from .memory import MetaMeter, cuda_block_bytes, replayable
from .offload import Offloader, fragment_bytes, unet_units

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
def _meta_fragments(cfg: SDConfig, dtype: torch.dtype, fp8: str | None = None, controls: int = 0):
    """The fragments with every weight on `meta`: the host masters of a planning run cost nothing.
    `fp8` ("unet", "all"): those fragments' Linear/Conv2d weights in fp8, as `Engine.load` stores them.
    Their pure parts (the text encoder, each UNet block, the VAE's halves) are `replayable`: a
    repeated call (another chunk of rows, another tile, another predict) replays its memory trace.
    `controls`: that many full-size ControlNets for the UNet (`controlnet0`, ...), 3-channel hints."""
    from ..custom.adapters import with_adapters
    from ..model.controlnet import ControlNet
    from ..model.fragments import VAE, build_fragments

    with torch.device("meta"):
        fragments = {name: m.to(dtype) for name, m in with_adapters(build_fragments(cfg), cfg).items()}
        fragments.update((f"controlnet{i}", ControlNet(cfg.unet).eval().requires_grad_(False).to(dtype))
                         for i in range(controls))
    if fp8:
        from ..model.fp8 import store_fragments_fp8

        store_fragments_fp8(fragments, fp8)
    parts = [p for _, m in unet_units(fragments) for p in (m if isinstance(m, torch.nn.ModuleList) else [m])]
    parts += [fragments[TEXT_ENCODER]]
    # the VAE: the encoder whole; the decoder part by part (its forward runs them: a streamed part's
    # weights arrive outside the call replayed)
    vae = fragments[VAE]
    parts += [vae.encoder, vae.quant_conv, vae.post_quant_conv]
    parts += [m for _, modules in vae.decoder.parts()[:-1] for m in modules]
    for m in parts:
        replayable(m)
    return fragments


# Sampling steps a planning run takes so that the sampler's state carried between steps (previous
# predictions of the multistep samplers) has reached its full size: every longer run peaks the same
# (tests/test_planner.py checks each sampler against 3 more steps). Others: 2 (a first and a later step).
SETTLED_STEPS = {"plms": 5, "lms": 5, "dpm2": 3, "dpm2_a": 3, "dpmpp_2m": 3}


def predict(cfg: SDConfig, dtype: torch.dtype, plan: MemoryPlan, height: int, width: int, batch: int,
            guided: bool = True, encode: bool = False, *, precision: str = "autocast",
            sampler: str = "ddim", fp8: str | None = None, safety=None, controls: int = 0) -> tuple[dict[str, int], int]:
    """(planned peak device bytes per phase, host->device bytes per UNet evaluation) of a CUDA run
    with `plan` sampling `batch` images at once at `height` x `width` with `sampler`, computed in
    `precision` (`dtype` is its weights' dtype: `weight_dtype(meta, precision)`). With `encode`, an
    img2img run (the init image encoded, then sampled from); a 9-channel UNet plans inpainting.

    A short run on meta through the real pipeline: text encoding, (encoding,) `SETTLED_STEPS` steps
    of the sampler, then decoding the batch's latents (a run of its own: a real run holds nothing
    else on the device then). Its peaks are exactly those of a run of any number of steps, and every
    evaluation moves the same bytes (`Offloader.phase_bytes - setup_bytes`): one per step for most
    samplers; heun, dpm2, dpm2_a, dpmpp_2s_a and dpmpp_sde evaluate twice per step (not at the last),
    plms twice at its first. Units loaded once per sampling loop (resident blocks, --turbo's UNet)
    are not per-evaluation bytes. `fp8`: the weights `Engine.load` stores in fp8 ("unet", "all").
    `safety`: the safety checker's shapes (`model.safety.SafetyConfig`), whose phase after decoding
    checks the batch's images at once (`_safety`). `controls`: full-size ControlNets acting at every
    step on a 3-channel hint of the render's size (engine/control.py)."""
    encodes = encode or cfg.unet.in_channels != cfg.channels  # 9 channels: inpainting encodes the masked image
    peaks, moved = _sample(cfg, dtype, plan.mode, plan.resident, plan.unet_bs, plan.tile and encodes, height, width,
                           batch, guided, encode, precision, sampler, fp8, controls)
    peaks = {**peaks, "decode": _decode(cfg, dtype, plan.tile, height, width, batch, precision)}
    if safety is not None:
        peaks["safety"] = _safety(cfg, dtype, safety, batch, precision)
    return peaks, moved


@functools.lru_cache(maxsize=256)
def _safety(cfg, dtype, safety, batch, precision) -> int:
    """Peak of the safety phase: the checker's weights (one unit, nothing else on the device then)
    and its activations on `batch` images of its input size."""
    from ..model.checkpoint import parameters_on_meta
    from ..model.safety import SAFETY, SafetyChecker
    from .pipeline import Pipeline

    with parameters_on_meta():
        checker = SafetyChecker(safety)
    checker = checker.to("meta", dtype)
    meter = MetaMeter()
    pipe = Pipeline(cfg, Offloader({SAFETY: checker}, torch.device("meta"), meter=meter), dtype=dtype,
                    precision=precision)
    with using_policy(auto_policy("cuda")), meter:
        pipe.safety_flags(torch.zeros(batch, 3, safety.image_size, safety.image_size))
    return pipe.engine.peaks["safety"]


def _planning(cfg, dtype, mode, resident, unet_bs, tile, precision, fp8=None, controls=0, size=None):
    """A meta pipeline for the CUDA run planned, and the meter to run it under; with `controls`
    ControlNets acting at every step on hints of `size` (height, width), on the host as in a real run."""
    from .control import ActiveNet, Control, ControlUnit
    from .pipeline import Pipeline

    meter = MetaMeter()
    fragments = _meta_fragments(cfg, dtype, fp8, controls)
    engine = Offloader(fragments, torch.device("meta"), mode, resident, meter=meter)
    pipe = Pipeline(cfg, engine, dtype=dtype, unet_bs=unet_bs, tile=tile, precision=precision)
    if controls:
        pipe.control = Control([ActiveNet(f"controlnet{i}", fragments[f"controlnet{i}"], torch.zeros(1, 3, *size),
                                          ControlUnit("plan")) for i in range(controls)], engine)
    return pipe, meter


@functools.lru_cache(maxsize=4096)
def _sample(cfg, dtype, mode, resident, unet_bs, tile, height, width, batch, guided, encode, precision,
            sampler="ddim", fp8=None, controls=0):
    """({text, encode, sample: peak}, bytes per evaluation) of a run's phases up to sampling (`predict`)."""
    from .pipeline import SampleSettings

    pipe, meter = _planning(cfg, dtype, mode, resident, unet_bs, tile, precision, fp8, controls, (height, width))
    with using_policy(auto_policy("cuda")), meter:  # the kernels of the CUDA run planned
        settings = SampleSettings(sampler, SETTLED_STEPS.get(sampler, 2), scale=7.5 if guided else 1.0)
        seeds = list(range(batch))
        image = (1, 3, height, width)  # the init image (and mask) live on the host, as in a real run
        if cfg.unet.in_channels != cfg.channels:  # a 9-channel inpainting UNet samples with mask and masked image
            pipe.inpaint_latents("plan", "", seeds, torch.empty(image), torch.zeros(1, 1, height, width), settings)
        elif encode:
            pipe.img2img_latents("plan", "", seeds, torch.empty(image), settings, strength=1.0)
        else:
            pipe.txt2img_latents("plan", "", seeds, height, width, settings)
    engine = pipe.engine
    moved = engine.phase_bytes["sample"] - engine.setup_bytes["sample"]
    assert moved % pipe.unet_evaluations == 0, "every evaluation moves the same bytes"
    return dict(engine.peaks), moved // pipe.unet_evaluations


@functools.lru_cache(maxsize=1024)
def _decode(cfg, dtype, tile, height, width, batch, precision) -> int:
    """Peak of decoding `batch` sampled latents (`predict`)."""
    pipe, meter = _planning(cfg, dtype, "default", (), 1, tile, precision)
    f = cfg.downsample_factor
    with using_policy(auto_policy("cuda")), meter:
        pipe.decode(torch.zeros(batch, cfg.channels, height // f, width // f, device="meta"))  # fp32, as sampled
    return pipe.engine.peaks["decode"]


def explain_peak(cfg: SDConfig, dtype: torch.dtype, plan: MemoryPlan, height: int, width: int, batch: int,
                 guided: bool = True, *, precision: str = "autocast", fp8: str | None = None,
                 sampler: str = "ddim") -> dict[str, tuple[int, list[tuple[int, int, str]]]]:
    """What is live on the device at each phase's planned peak of a txt2img run (`predict`'s run, with
    nothing replayed): phase -> (peak bytes, [(bytes, count, what)], largest first). `what` is a unit's
    weights (`weights of unet_out.output_blocks.0.0`) or an activation: the module that made it, the op,
    its shape and dtype; equal entries are counted together."""
    from .memory import explaining
    from .pipeline import SampleSettings

    out = {}
    for phases in ("run", "decode"):  # decode is a run of its own, as `predict` plans it
        pipe, _ = _planning(cfg, dtype, plan.mode if phases == "run" else "default", plan.resident, plan.unet_bs,
                            plan.tile, precision, fp8 if phases == "run" else None)
        meter = MetaMeter(explain=True)
        pipe.engine.meter = meter
        modules = {f"{n}.{k}" if k else n: m for n, f in pipe.engine.fragments.items() for k, m in f.named_modules()}
        f = cfg.downsample_factor
        with using_policy(auto_policy("cuda")), meter, explaining(meter, modules):
            if phases == "run":
                settings = SampleSettings(sampler, SETTLED_STEPS.get(sampler, 2), scale=7.5 if guided else 1.0)
                pipe.txt2img_latents("plan", "", list(range(batch)), height, width, settings)
            else:
                pipe.decode(torch.zeros(batch, cfg.channels, height // f, width // f, device="meta"))
        for phase, live in pipe.engine.explained.items():
            if phases == "decode" or phase != "decode":
                counted: dict[str, list[int]] = {}
                for nbytes, what in live:
                    counted.setdefault(what, [0, 0])
                    counted[what][0] += nbytes
                    counted[what][1] += 1
                rows = sorted(((b, n, w) for w, (b, n) in counted.items()), key=lambda r: -r[0])
                out[phase] = (pipe.engine.peaks[phase], rows)
    return out


@functools.lru_cache(maxsize=256)
def skip_bytes(cfg: SDConfig, dtype: torch.dtype, height: int, width: int, precision: str = "autocast") -> int:
    """Device bytes of the skip connections one latent row keeps from the UNet's input half for its
    output half, at `height` x `width` (each rounded as the CUDA allocator rounds it). Block-major
    sampling keeps those of every row of a step at once (`Pipeline._unet`), so rows x this is a
    lower bound of the sampling peak. Measured by running the input half's blocks on meta."""
    from ..model.fragments import UNET_IN
    from .pipeline import PRECISIONS
    from ..model.unet import Carry
    from ..model.upcast import UpcastMode

    upcast = PRECISIONS[precision].upcast
    compute = torch.float32 if upcast else dtype
    f, unet, half = cfg.downsample_factor, cfg.unet, _meta_fragments(cfg, dtype)[UNET_IN]
    with using_policy(auto_policy("cuda")), MetaMeter(), UpcastMode() if upcast else contextlib.nullcontext():
        c = Carry(torch.zeros(1, unet.in_channels, height // f, width // f, dtype=compute, device="meta"),
                  torch.zeros(1, 77, unet.context_dim, dtype=compute, device="meta"), torch.zeros(1, device="meta"))
        for _, step in half.steps():
            step(c)
        return sum(cuda_block_bytes(s.untyped_storage().nbytes()) for s in c.skips)


# The time model of the budget search (`step_seconds`). It ranks settings; it does not predict a GPU's
# wall time. Host->device copies at PCIe 3.0 x16's practical speed; a fixed cost per UNet pass (chunk
# of rows through the whole UNet) besides its arithmetic: ~1,500 kernel launches and a read of the
# UNet's 1.6 GiB of fp16 weights from device memory. The arithmetic itself is the same for every
# setting (the same images and rows), so it is left out; so are loads made once per sampling loop.
BUS_BYTES_PER_SECOND = 12e9
PASS_SECONDS = 0.015


def _halvings(n: int) -> list[int]:
    out = [n]
    while out[-1] > 1:
        out.append((out[-1] + 1) // 2)
    return out


def step_seconds(n_samples: int, batch: int, unet_bs: int, streamed_bytes: int, guided: bool = True) -> float:
    """Modelled seconds of one sampling step of all `n_samples` images, `batch` at once: each batch
    streams `streamed_bytes` (the non-resident UNet blocks, once per step: block-major streaming)
    over the bus and makes ceil(rows / unet_bs) UNet passes, rows = 2 per image when guided."""
    sizes = [batch] * (n_samples // batch) + ([n_samples % batch] if n_samples % batch else [])
    rows = 2 if guided else 1
    return sum(streamed_bytes / BUS_BYTES_PER_SECOND + -(-size * rows // unet_bs) * PASS_SECONDS for size in sizes)


def plan_budget(cfg: SDConfig, dtype: torch.dtype, budget: int, height: int, width: int, n_samples: int,
                guided: bool = True, encode: bool = False, *, precision: str = "autocast",
                sampler: str = "ddim", fp8: str | None = None, safety=None, controls: int = 0) -> MemoryPlan:
    """The fastest settings, by `step_seconds`, whose planned peak in every phase is at most `budget`.

    Settings: images at once b (n_samples, then halvings), --unet_bs u (rows of b, then halvings),
    the first k UNet blocks in run order resident (the rest streamed; all of them is --turbo) and
    tiled VAE encoding/decoding (only when untiled does not fit: tiles are slower). The modelled step
    time falls with more resident blocks (fewer bytes streamed per step), larger b (the streamed
    bytes are shared by more images) and larger u (fewer passes); memory rises with each.

    Search (branch and bound, every figure from `predict`): (b, u) pairs in order of their best
    possible time (everything resident); a pair is skipped when even that cannot beat the best plan
    found, or when a pair with at most as many images and at most as large a u did not fit with
    nothing resident (memory grows with b and u), or when the skip connections of its rows alone
    (`skip_bytes`) exceed the budget. For a pair that fits, a binary search finds the most resident
    blocks that fit (memory grows with them), starting from the fewest that could beat the best plan
    so far. Tiling is decided once per b (the VAE phases depend on b and tiling alone).
    """
    fragments = _meta_fragments(cfg, dtype, fp8, controls)
    units = [u for u, _ in unet_units(fragments)]
    unit_bytes = [fragment_bytes(m) for _, m in unet_units(fragments)]
    streamed = [sum(unit_bytes[k:]) for k in range(len(units) + 1)]  # k resident blocks -> bytes per step
    rows = 2 if guided else 1
    pairs = [(b, u) for b in _halvings(n_samples) for u in _halvings(b * rows)]
    pairs.sort(key=lambda p: (step_seconds(n_samples, *p, 0, guided), -p[0]))

    def plan_of(b, u, k, tile):
        mode, resident = ("turbo", ()) if k == len(units) else ("stream", tuple(units[:k]))
        peaks, _ = predict(cfg, dtype, MemoryPlan(mode, resident, b, u, tile), height, width, b, guided, encode,
                           precision=precision, sampler=sampler, fp8=fp8, safety=safety, controls=controls)
        return MemoryPlan(mode, resident, b, u, tile, peaks)

    def sampling_fits(b, u):  # with nothing resident (a run of the phases up to sampling: no decode, cheaper)
        peaks, _ = _sample(cfg, dtype, "stream", (), u, bool(tiles.get(b)), height, width, b, guided, encode,
                           precision, sampler, fp8, controls)
        return peaks["sample"] <= budget

    def seconds(b, u, k):
        return step_seconds(n_samples, b, u, streamed[k], guided)

    # memory grows with b and u: a pair (b0, u0) that does not fit with nothing resident rules out every
    # pair with b >= b0 and u >= u0; so do the skip connections of b0's rows alone over the budget
    row_skips = skip_bytes(cfg, dtype, height, width, precision)
    unfit = [(b, 1) for b in _halvings(n_samples) if b * rows * row_skips > budget][-1:]
    best, best_seconds = None, float("inf")
    tiles: dict[int, bool | None] = {}  # b -> tiled VAE (only if untiled does not fit); None: neither fits
    for b, u in pairs:
        if seconds(b, u, len(units)) >= best_seconds:
            break  # sorted by this bound: no later pair can beat the best either
        if any(b >= b0 and u >= u0 for b0, u0 in unfit) or not sampling_fits(b, u):
            unfit.append((b, u))
            continue
        if b not in tiles:  # the other phases depend on b and tiling alone
            tiles[b] = next((tile for tile in (False, True) if plan_of(b, u, 0, tile).peak() <= budget), None)
        if tiles[b] is None:
            unfit.append((b, 1))
            continue
        # from the fewest resident blocks that would beat the best so far, the most that fit
        need = next(k for k in range(len(units) + 1) if seconds(b, u, k) < best_seconds)
        found, lo, hi = None, need, len(units)
        while lo <= hi:
            k = (lo + hi) // 2
            candidate = plan_of(b, u, k, tiles[b])
            if candidate.peak() <= budget:
                found, lo = candidate, k + 1
            else:
                hi = k - 1
        if found is not None:
            k = len(units) if found.mode == "turbo" else len(found.resident)
            best, best_seconds = found, seconds(b, u, k)
    if best is None:
        lowest = -(-plan_of(1, 1, 0, True).peak() // 2**20)  # MiB, rounded up: a budget that plans
        raise PlanError(f"--vram {gib(budget)} is too small for {width}x{height}: the smallest budget that "
                        f"plans it is --vram {lowest}M ({lowest / 1024:.2f} GiB); give at least that or a smaller size")
    return best


def choose_plan(cfg: SDConfig, dtype: torch.dtype, *, turbo: bool, lowvram: bool, vram: int | None,
                unet_bs: int, height: int, width: int, n_samples: int, guided: bool,
                encode: bool = False, precision: str = "autocast", sampler: str = "ddim",
                fp8: str | None = None, safety=None, controls: int = 0) -> MemoryPlan:
    """The memory settings of a run: --turbo, --lowvram, --vram SIZE, or the four-fragment default;
    `safety`: the safety checker's shapes, when the run has one (its phase must fit a budget too)."""
    if vram is not None:
        return plan_budget(cfg, dtype, vram, height, width, n_samples, guided, encode, precision=precision,
                           sampler=sampler, fp8=fp8, safety=safety, controls=controls)
    if lowvram:  # tiles only change images larger than one tile (512x512 pixels)
        return MemoryPlan("stream", (), None, unet_bs, tile=True)
    return MemoryPlan("turbo" if turbo else "default", (), None, unet_bs)


def describe(plan: MemoryPlan, n_units: int) -> str:
    """One line for the log: what stays on the device and how the batch is cut."""
    where = {"default": "one UNet half on the device at a time", "turbo": "whole UNet on the device",
             "stream": f"{len(plan.resident)} of {n_units} UNet blocks resident, the rest streamed"}[plan.mode]
    batch = f"{plan.batch} image(s) at once, " if plan.batch else ""
    return f"memory: {where}; {batch}--unet_bs {plan.unet_bs}{'; tiled VAE' if plan.tile else ''}"
