"""Where each fragment lives: one engine moves unchanged modules between host and compute device.

The CPU copy of every weight is the master. Putting a unit on the device swaps each parameter and
buffer for a device copy; taking it off puts the CPU master back and lets the device copy be
freed, so weights never travel device -> host. Model code never calls `.to(device)`.

Units: the text encoder is its layers (`text_encoder.layers.N`) and the rest (`text_encoder`); the VAE is two, `vae.encoder` (encoder and quant_conv: only
img2img and inpainting use it) and `vae.decoder` (post_quant_conv and decoder); each UNet half is
split into its blocks (`unet_in.time_embed`, `unet_in.input_blocks.0` ... `unet_in.middle_block`,
`unet_out.output_blocks.0` ... `unet_out.out`), in the order they run. A ControlNet (fragment
`controlnet0`, `controlnet1`, ...) is split the same way, each block (`controlnet0.input_blocks.3`:
the block and its zero conv) just before the UNet input-half block it mirrors (`unet_units`), so it
streams, prefetches and stays resident (--turbo, a --vram prefix) as the UNet's blocks do.

Modes (which units stay on the device during a phase is data: `RESIDENT[mode][phase]`):
- "default": the four fragments, one on the device at a time; each UNet half visits the device
  whole for its share of every step (the ControlNets acting at the step with the input half).
- "turbo": both UNet halves stay on the device for the whole sampling loop.
- "stream": the UNet units in `resident` stay for the sampling loop; every other UNet block is
  streamed: put on the device when the pipeline enters it (`block(unit)`) and dropped when it leaves,
  while the next streamed block is prefetched (on CUDA: from pinned memory on a side stream,
  synchronised with an event). The pipeline runs each block on every chunk of rows of a model
  evaluation before the next block (block-major), so one evaluation moves each streamed block once.
  `resident=()` is the lowest-memory setting (`--lowvram`); a budget (`--vram`) picks `resident`.

Bytes moved are counted per phase (`phase_bytes`); the part loaded when a phase begins (its resident
units: e.g. the whole UNet of --turbo, once per sampling loop) is also in `setup_bytes`, so
`phase_bytes - setup_bytes` of "sample" is what the model evaluations moved.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..model.fragments import FRAGMENTS, TEXT_ENCODER, UNET_IN, UNET_OUT, VAE
from ..model.unet import block_started
from .memory import NullMeter, label

PHASES = ("text", "sample", "decode", "encode", "safety")  # safety: the safety checker, after decoding, if any
UNET_HALVES = (UNET_IN, UNET_OUT)
# The VAE's two units and the children each moves.
VAE_ENCODER, VAE_DECODER = f"{VAE}.encoder", f"{VAE}.decoder"
VAE_UNITS = {VAE_ENCODER: ("encoder", "quant_conv"), VAE_DECODER: ("post_quant_conv", "decoder")}

# mode -> phase -> fragments kept on the device for the whole phase ("stream" adds its `resident` units).
RESIDENT = {
    "default": {"text": (TEXT_ENCODER,), "sample": (), "decode": (VAE_DECODER,), "encode": (VAE_ENCODER,)},
    "turbo": {"text": (TEXT_ENCODER,), "sample": UNET_HALVES, "decode": (VAE_DECODER,), "encode": (VAE_ENCODER,)},
    "stream": {"text": (TEXT_ENCODER,), "sample": (), "decode": (VAE_DECODER,), "encode": (VAE_ENCODER,)},
}
MODES = tuple(RESIDENT)
# ControlNets are fragments named controlnet0, controlnet1, ... (`control_fragments`): each of their
# blocks is a unit streamed just before the UNet input-half block it mirrors (`unet_units`).
CONTROLNET = "controlnet"


def control_fragments(fragments) -> list[str]:
    """The ControlNet fragments' names, in the order they run."""
    names = [n for n in fragments if n.startswith(CONTROLNET) and n[len(CONTROLNET):].isdigit()]
    return sorted(names, key=lambda n: int(n[len(CONTROLNET):]))


def _control_units(name: str, net: nn.Module) -> list[tuple[str, str, list[nn.Module]]]:
    """(UNet input-half step it runs before, unit name, modules) of every block of ControlNet `name`."""
    from ..model.controlnet import unet_step_of, unit_modules as control_unit_modules

    return [(unet_step_of(block), f"{name}.{block}", modules) for block, modules in control_unit_modules(net)]


def _unet_unit_modules(fragments: dict[str, nn.Module]) -> list[tuple[str, list[nn.Module]]]:
    """(unit, modules) of every UNet and ControlNet block, in run order: each ControlNet block just
    before the UNet input-half block it mirrors (nets in order), as `Pipeline._unet` runs them."""
    controls = [u for n in control_fragments(fragments) for u in _control_units(n, fragments[n])]
    out = []
    for half in UNET_HALVES:
        if half not in fragments:
            continue
        for step, layer in fragments[half].units():
            block = block_started(step)
            if half == UNET_IN and block is not None:
                out += [(unit, modules) for before, unit, modules in controls if before == block]
            out.append((f"{half}.{step}", [layer]))
    return out


def unet_units(fragments: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """(unit name, module) of every UNet block (and ControlNet block, `_unet_unit_modules`), in the
    order one step runs them; a ControlNet block's module is its first (with its zero conv)."""
    return [(u, ms[0] if len(ms) == 1 else nn.ModuleList(ms)) for u, ms in _unet_unit_modules(fragments)]


def unit_modules(fragments: dict[str, nn.Module]) -> dict[str, list[nn.Module]]:
    """unit -> the modules whose weights it moves, fragment by fragment."""
    out: dict[str, list[nn.Module]] = {}
    for name, module in fragments.items():
        if name in UNET_HALVES:
            out.update((u, [m]) for u, m in unet_units({name: module}))
        elif name in control_fragments({name: module}):
            out.update((u, ms) for _, u, ms in _control_units(name, module))
        elif name == VAE:
            out.update((u, [getattr(module, child) for child in children]) for u, children in VAE_UNITS.items())
        elif name == TEXT_ENCODER:  # its layers one by one, so a clip skip leaves the last ones on the host
            model = module.transformer.text_model
            out[name] = [model.embeddings, model.final_layer_norm]
            out.update((text_layer_unit(i), [layer]) for i, layer in enumerate(model.encoder.layers))
        else:
            out[name] = [module]
    return out


def text_layer_unit(i: int) -> str:
    """The unit of the text encoder's layer `i`."""
    return f"{TEXT_ENCODER}.layers.{i}"


def units_of(fragments: dict[str, nn.Module]) -> dict[str, list[str]]:
    """fragment -> its units."""
    return {name: [u for u in unit_modules({name: m})] for name, m in fragments.items()}


class Offloader:
    """Moves fragments and blocks to `device` on demand; counts host->device bytes moved and the
    peak device memory of each phase (through `meter`)."""

    def __init__(self, fragments: dict[str, nn.Module], device: torch.device, mode: str = "default",
                 resident: tuple[str, ...] = (), meter=None, copy_on_host: bool = False):
        if mode not in RESIDENT:
            raise ValueError(f"unknown offload mode {mode!r}; choose one of {MODES}")
        self.fragments = fragments
        self.device = torch.device(device)
        self.mode = mode
        self.meter = meter or NullMeter()
        self.copy_on_host = copy_on_host  # move even when the device is the host (tests run every path)
        self.units = units_of(fragments)
        modules = unit_modules(fragments)
        unknown = set(resident) - set(modules)
        if unknown:
            raise ValueError(f"unknown resident units {sorted(unknown)}")
        self.resident = tuple(resident) if mode == "stream" else ()
        self.on_device: set[str] = set()  # units
        self.bytes_moved = 0
        self.peaks: dict[str, int] = {}  # phase -> peak device bytes (where the meter can tell)
        self.explained: dict[str, list] = {}  # phase -> [(bytes, what)] live at its peak (a meter that explains)
        self.phase_bytes: dict[str, int] = {}  # phase -> host->device bytes moved during it
        self.setup_bytes: dict[str, int] = {}  # phase -> of those, the resident units loaded as it began
        self._phase: str | None = None
        self.failed_phase: str | None = None  # the phase the last exception left (out-of-memory retries)
        # The host masters, captured once: unit -> [(owner module, kind, name, cpu parameter/buffer)].
        self._masters = {u: [t for m in ms for t in _tensors(m)] for u, ms in modules.items()}
        self._prefetched: dict[str, tuple] = {}  # unit -> (event or None, [device copies])
        self._order = [u for u, _ in unet_units(fragments)]
        self._streamed = [u for u in self._order if u not in self.resident] if mode == "stream" else []
        # unit -> the first streamed block after it in run order (None after the last)
        self._next_streamed = {u: next((v for v in self._order[i + 1:] if v in self._streamed), None)
                               for i, u in enumerate(self._order)}
        self.idle: set[str] = set()  # units the current evaluation skips (not prefetched): `Pipeline._unet` sets it
        self._side = None
        if self._streamed and self.offloading and self.device.type == "cuda":
            self._pin(self._streamed)
            self._side = torch.cuda.Stream(self.device)

    def close(self) -> None:
        """Every unit off the device (the engine makes a new Offloader over the same fragments when
        the memory plan changes)."""
        for unit in list(self.on_device):
            self._drop(unit)
        self._prefetched.clear()

    @property
    def offloading(self) -> bool:
        """False when the compute device is the host itself: nothing ever moves."""
        return self.device.type != "cpu" or self.copy_on_host

    # ---- moving units ----------------------------------------------------------------------------
    def _copies(self, unit: str) -> list[torch.Tensor]:
        copies = []
        for *_, master in self._masters[unit]:
            copies.append(master.to(self.device, non_blocking=True, copy=True))  # meta->meta too
            self.bytes_moved += master.numel() * master.element_size()
            label(copies[-1], f"weights of {unit}")  # planning with --explain-peak: what this storage is
        return copies

    def _load(self, unit: str) -> None:
        if unit in self.on_device or not self.offloading:
            return
        event, copies = self._prefetched.pop(unit, (None, None))
        if copies is None:
            copies = self._copies(unit)
        elif event is not None:  # the copy ran on the side stream: compute waits for it, not the host
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for c in copies:
                c.record_stream(stream)  # freed only after the compute stream is done with it
        for (owner, kind, attr, _), copy in zip(self._masters[unit], copies):
            getattr(owner, kind)[attr] = nn.Parameter(copy, requires_grad=False) if kind == "_parameters" else copy
        self.on_device.add(unit)

    def _drop(self, unit: str) -> None:
        if unit not in self.on_device:
            return
        for owner, kind, attr, master in self._masters[unit]:
            getattr(owner, kind)[attr] = master  # the device copy is released, never copied back
        self.on_device.discard(unit)

    def _prefetch(self, unit: str) -> None:
        if unit in self.on_device or unit in self._prefetched:
            return
        if self._side is None:  # meta: allocated now, as the CUDA copy would be; no side stream to use
            self._prefetched[unit] = (None, self._copies(unit))
            return
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            copies = self._copies(unit)
            event = torch.cuda.Event()
            event.record(self._side)
        self._prefetched[unit] = (event, copies)

    def _pin(self, units) -> None:
        """Streamed weights live in pinned host memory, so their copies can overlap compute."""
        for u in units:
            pinned = []
            for owner, kind, attr, master in self._masters[u]:
                p = master.pin_memory()
                p = nn.Parameter(p, requires_grad=False) if kind == "_parameters" else p
                getattr(owner, kind)[attr] = p
                pinned.append((owner, kind, attr, p))
            self._masters[u] = pinned

    # ---- streaming -------------------------------------------------------------------------------
    @contextmanager
    def block(self, unit: str):
        """The UNet block `unit` runs inside this context (on every chunk of rows of one evaluation).
        While sampling in stream mode: a streamed block is loaded (or its prefetched copy taken) and
        dropped at the end; the next streamed block in run order is prefetched meanwhile. Not across
        evaluations: the first streamed block of the next one is prefetched when it begins, so each
        evaluation moves each streamed block exactly once. Otherwise nothing happens here."""
        streaming = self._phase == "sample" and bool(self._streamed) and self.offloading
        if not streaming:
            yield
            return
        if unit in self._streamed:
            self._load(unit)
        following = self._next_streamed[unit]
        while following in self.idle:  # a ControlNet that does not act in this evaluation
            following = self._next_streamed[following]
        if following:
            self._prefetch(following)  # copied while this block computes
        try:
            yield
        finally:
            if unit in self._streamed:
                self._drop(unit)

    # ---- phases and use --------------------------------------------------------------------------
    def _resident_units(self) -> set[str]:
        if not self._phase:
            return set()
        units = {u for n in RESIDENT[self.mode].get(self._phase, ()) for u in self._units_named(n)}
        if self._phase == "sample" and UNET_IN in RESIDENT[self.mode]["sample"]:  # --turbo: the ControlNets too
            units |= {u for n in control_fragments(self.fragments) for u in self._units_named(n)}
        if self._phase == "sample":
            units |= set(self.resident)
        return units

    @contextmanager
    def phase(self, phase: str, leave: tuple[str, ...] = ()):
        """Keep this mode's resident units for `phase` (but those in `leave`) on the device until the
        phase ends; record the phase's peak device memory and the bytes it moved."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self._phase = phase
        moved, setup = self.bytes_moved, 0
        self.meter.phase_start()
        try:
            resident = self._resident_units() - set(leave)
            for unit in self._order + list(self._masters):  # UNet blocks in run order, then the rest
                if unit in resident:
                    self._load(unit)
            setup = self.bytes_moved - moved
            yield self
        except BaseException:
            self.failed_phase = phase
            raise
        finally:
            for unit in list(self.on_device):
                self._drop(unit)
            self._prefetched.clear()
            peak = self.meter.phase_peak()
            if peak is not None:
                if getattr(self.meter, "explain", False) and peak > self.peaks.get(phase, -1):
                    self.explained[phase] = self.meter.at_peak()
                self.peaks[phase] = max(self.peaks.get(phase, 0), peak)
            self.phase_bytes[phase] = self.phase_bytes.get(phase, 0) + self.bytes_moved - moved
            self.setup_bytes[phase] = self.setup_bytes.get(phase, 0) + setup
            self._phase = None

    def _units_named(self, name: str) -> list[str]:
        """A fragment's units, or the unit `name` itself; [] for what is not loaded."""
        return self.units.get(name) or ([name] if name in self._masters else [])

    @contextmanager
    def _parts_visited(self, unit: str, module: nn.Module, keep: list[nn.Module]):
        """The unit `unit` (not loaded) on the device part by part while `module` runs: `keep` for the
        whole visit, each of `module.parts()` only while it runs (through `module.visit`)."""
        parts = dict(module.parts())
        kept = [t for m in keep for t in _tensors(m)]
        self._swap_in(unit.split(".")[0] + ".post_quant_conv" if keep else unit, kept)
        module.visit = lambda part: self._visiting(f"{unit}.{part}", [t for m in parts[part] for t in _tensors(m)])
        try:
            yield
        finally:
            module.visit = None
            self._swap_out(kept)

    @contextmanager
    def _visiting(self, part: str, tensors):
        self._swap_in(part, tensors)
        try:
            yield
        finally:
            self._swap_out(tensors)

    def _swap_in(self, unit: str, tensors) -> None:
        """Device copies of host masters `tensors` [(owner, kind, attr, master)] in their owners' places."""
        for owner, kind, attr, master in tensors:
            copy = master.to(self.device, non_blocking=True, copy=True)
            self.bytes_moved += master.numel() * master.element_size()
            label(copy, f"weights of {unit}")
            getattr(owner, kind)[attr] = nn.Parameter(copy, requires_grad=False) if kind == "_parameters" else copy

    @staticmethod
    def _swap_out(tensors) -> None:
        for owner, kind, attr, master in tensors:
            getattr(owner, kind)[attr] = master

    @contextmanager
    def use(self, name: str, leave: tuple[str, ...] = (), with_controls: bool = False, parts: bool = False):
        """The fragment `name`, or the fragment holding unit `name` (e.g. `vae.decoder`) with only
        that unit, on the device for the duration of the block (streamed UNet blocks come and go
        inside it); the units in `leave` stay on the host (the text encoder's layers a clip skip
        does not run). `with_controls`: the ControlNets acting now (not `idle`) come with it (the UNet
        input half's visit in the default mode). `parts` (the VAE decoder, `VAE_DECODER`): instead of
        the whole unit, each of the decoder's `parts()` is on the device only while it runs (the lowest
        memory: the decoder's largest part is a few MiB against its 94 MiB, fp16)."""
        units = self._units_named(name)
        if not units:
            raise KeyError(f"fragment {name!r} is not loaded")
        if parts and name == VAE_DECODER and self.offloading and name not in self.on_device:
            vae = self.fragments[VAE]
            with self._parts_visited(name, vae.decoder, [vae.post_quant_conv]):
                yield vae
            return
        if with_controls:
            units = units + [u for n in control_fragments(self.fragments) for u in self._units_named(n)
                             if u not in self.idle]
        visiting = [u for u in units if (u not in self._streamed or self._phase != "sample") and u not in leave]
        for u in visiting:
            self._load(u)
        try:
            yield self.fragments[name.split(".")[0]]
        finally:
            resident = self._resident_units()
            for u in visiting:
                if u not in resident:
                    self._drop(u)


def _tensors(module: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    out = []
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            for attr, tensor in getattr(owner, kind).items():
                if tensor is not None:
                    out.append((owner, kind, attr, tensor))
    return out


def fragment_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for *_, t in _tensors(module))


assert set(FRAGMENTS) | set(VAE_UNITS) >= {n for mode in RESIDENT.values() for names in mode.values() for n in names}
