"""Where each fragment lives: one engine moves unchanged modules between host and compute device.

The CPU copy of every weight is the master. Putting a fragment on the device swaps each parameter
and buffer for a device copy; taking it off puts the CPU master back and lets the device copy be
freed, so weights never travel device -> host. Model code never calls `.to(device)`.

Which fragments stay on the device during a phase is data: `RESIDENT[mode][phase]`. A fragment not
resident for the current phase visits the device only for the duration of one `engine.use(name)`.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .fragments import FRAGMENTS, TEXT_ENCODER, UNET_IN, UNET_OUT, VAE

PHASES = ("text", "sample", "decode", "encode")

# mode -> phase -> fragments kept on the device for the whole phase.
RESIDENT = {
    # Four fragments, one on the device at a time: each UNet half visits for its share of every step.
    "default": {"text": (TEXT_ENCODER,), "sample": (), "decode": (VAE,), "encode": (VAE,)},
    # --turbo: both UNet halves stay for the whole sampling loop.
    "turbo": {"text": (TEXT_ENCODER,), "sample": (UNET_IN, UNET_OUT), "decode": (VAE,), "encode": (VAE,)},
}
MODES = tuple(RESIDENT)


class Offloader:
    """Moves fragments to `device` on demand; counts host->device bytes moved."""

    def __init__(self, fragments: dict[str, nn.Module], device: torch.device, mode: str = "default"):
        if mode not in RESIDENT:
            raise ValueError(f"unknown offload mode {mode!r}; choose one of {MODES}")
        self.fragments = fragments
        self.device = torch.device(device)
        self.mode = mode
        self.on_device: set[str] = set()
        self.bytes_moved = 0
        self._phase: str | None = None
        # The host masters, captured once: fragment -> [(owner module, kind, name, cpu parameter/buffer)].
        self._masters = {name: _tensors(module) for name, module in fragments.items()}

    @property
    def offloading(self) -> bool:
        """False when the compute device is the host itself: nothing ever moves."""
        return self.device.type != "cpu"

    def _load(self, name: str) -> None:
        if name in self.on_device or not self.offloading:
            return
        for owner, kind, attr, master in self._masters[name]:
            copy = master.to(self.device, non_blocking=True)
            getattr(owner, kind)[attr] = nn.Parameter(copy, requires_grad=False) if kind == "_parameters" else copy
            self.bytes_moved += master.numel() * master.element_size()
        self.on_device.add(name)

    def _drop(self, name: str) -> None:
        if name not in self.on_device:
            return
        for owner, kind, attr, master in self._masters[name]:
            getattr(owner, kind)[attr] = master  # the device copy is released, never copied back
        self.on_device.discard(name)

    def _resident(self) -> tuple[str, ...]:
        return RESIDENT[self.mode].get(self._phase, ()) if self._phase else ()

    @contextmanager
    def phase(self, phase: str):
        """Keep this mode's resident fragments for `phase` on the device until the phase ends."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self._phase = phase
        try:
            for name in self._resident():
                if name in self.fragments:
                    self._load(name)
            yield self
        finally:
            for name in list(self.on_device):
                self._drop(name)
            self._phase = None

    @contextmanager
    def use(self, name: str):
        """The fragment `name`, on the device for the duration of the block."""
        if name not in self.fragments:
            raise KeyError(f"fragment {name!r} is not loaded")
        self._load(name)
        try:
            yield self.fragments[name]
        finally:
            if name not in self._resident():
                self._drop(name)


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


assert set(FRAGMENTS) >= {n for mode in RESIDENT.values() for names in mode.values() for n in names}
