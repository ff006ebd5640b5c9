"""Device-memory meters: the peak bytes a phase of a run holds on the compute device.

- `CudaMeter` reads the CUDA caching allocator (`max_memory_allocated`, reset per phase).
- `MetaMeter` *is* the planner's device: every tensor on torch's `meta` device stands for one a CUDA
  run would hold, so the live meta storages are the planned device memory. It watches every op
  through a `TorchDispatchMode`, counts each new meta storage once (views share it), rounded up as
  the CUDA caching allocator rounds a block (512 bytes), and frees it when the last tensor using it
  dies.
- `NullMeter` for devices with nothing to read (CPU: the host is the device).

All expose `phase_start()` and `phase_peak()`, so `Offloader.phase` measures every phase the same way.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes


def cuda_block_bytes(nbytes: int) -> int:
    return -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK


class NullMeter:
    """Nothing to measure (the compute device is the host)."""

    def phase_start(self) -> None:
        pass

    def phase_peak(self) -> int | None:
        return None


class CudaMeter:
    def __init__(self, device: torch.device):
        self.device = device

    def phase_start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def phase_peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


class MetaMeter(TorchDispatchMode):
    """Live bytes of meta-device storages while active (`with MetaMeter() as m:`), and their peak.

    Only storages created while the meter is active are counted: enter it before anything is put
    on the meta device.
    """

    def __init__(self):
        super().__init__()
        self.live = 0  # bytes of live meta storages
        self.peak = 0  # since the meter started
        self._phase_peak = 0  # since the last phase_start()
        self._storages: dict[int, int] = {}  # storage id -> bytes counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_meta:
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        # One StorageImpl per allocation, shared by views and by Parameters wrapping a tensor; its
        # Python object lives exactly as long as it does, so it tells when the memory is freed.
        key = storage._cdata
        if key in self._storages:
            return
        self._storages[key] = cuda_block_bytes(storage.nbytes())
        self.live += self._storages[key]
        self.peak = max(self.peak, self.live)
        self._phase_peak = max(self._phase_peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._storages.pop(key)

    def phase_start(self) -> None:
        self._phase_peak = self.live

    def phase_peak(self) -> int:
        return self._phase_peak


def meter_for(device: torch.device):
    """The meter of a run on `device` (a `MetaMeter` must already be active for meta runs)."""
    if device.type == "cuda":
        return CudaMeter(device)
    return NullMeter()
