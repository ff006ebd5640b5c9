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
from contextlib import contextmanager

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

    Speed: torch computes many meta outputs in Python (its reference decompositions: about 0.5 ms
    for an elementwise op, 10 ms for a group_norm), and a planned run repeats the same ops on the
    same shapes many times (every chunk of rows, every tile). An op that allocates fresh outputs
    (no output aliases an input, no argument is mutated) on meta inputs is computed once per
    signature (op, every tensor's shape, strides and dtype, every other argument); later calls
    allocate outputs of the recorded shapes, strides and dtypes directly (`_OUTPUTS`). Views,
    in-place ops and anything touching another device always run the real op. Likewise a module
    made `replayable` runs once per call signature; a later identical call replays its recorded
    memory trace: the rise of live bytes above the start (its peak) and fresh outputs of the recorded
    shapes (`_Replayed`). Both give the same figures as running everything (tests/test_memory.py).
    """

    _OUTPUTS: dict = {}  # op signature -> `_Outputs` to remake, or None (always run the op)

    def __init__(self, explain: bool = False):
        super().__init__()
        # explain: label every storage (`label`, else the op and module that made it) and keep the
        # live set at each phase's peak (`at_peak`); modules are run, never replayed (slower)
        self.explain = explain
        self._labels: dict[int, str] = {}  # storage id -> what it is (explain)
        self._at_phase_peak: list[tuple[int, str]] = []  # (bytes, label) live at the phase's peak (explain)
        self.modules: list[str] = []  # explain: the module names being run, outermost first (`explaining`)
        self.live = 0  # bytes of live meta storages
        self.peak = 0  # since the meter started
        self._phase_peak = 0  # since the last phase_start()
        self._recordings: list[_Recording] = []  # the `_Replayed` calls being recorded, outermost first
        self._storages: dict[int, int] = {}  # storage id -> bytes counted

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def reach(self, nbytes: int) -> None:
        """Live bytes reached `nbytes` for a moment (a replayed call's peak)."""
        self.peak = max(self.peak, nbytes)
        if self.explain and nbytes > self._phase_peak:
            self._at_phase_peak = [(n, self._labels.get(k, "?")) for k, n in self._storages.items()]
        self._phase_peak = max(self._phase_peak, nbytes)
        for r in self._recordings:
            r.peak = max(r.peak, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = _signature(func, args, kwargs)
        recorded = self._OUTPUTS.get(key) if key is not None else None
        if recorded is not None:
            out = recorded.make()
        else:
            out = func(*args, **kwargs)
            if key is not None and key not in self._OUTPUTS:
                self._OUTPUTS[key] = _Outputs.record(out, (args, kwargs))
        for t in (out,) if isinstance(out, torch.Tensor) else _leaves(out):
            if isinstance(t, torch.Tensor) and t.is_meta:
                self._track(t.untyped_storage(), func, t)
        return out

    def _track(self, storage, func=None, t=None) -> None:
        # One StorageImpl per allocation, shared by views and by Parameters wrapping a tensor; its
        # Python object lives exactly as long as it does, so it tells when the memory is freed.
        key = storage._cdata
        if key in self._storages:
            return
        self._storages[key] = cuda_block_bytes(storage.nbytes())
        if self.explain:
            where = self.modules[-1] if self.modules else ""
            op = getattr(func, "__name__", str(func)).split(".")[0]
            self._labels[key] = f"{where} {op} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}".strip()
        self.live += self._storages[key]
        self.reach(self.live)
        for r in self._recordings:
            r.alive.add(key)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._storages.pop(key)
        self._labels.pop(key, None)
        for r in self._recordings:
            if key in r.alive:
                r.alive.discard(key)
            else:
                r.foreign = True

    def phase_start(self) -> None:
        self._phase_peak = self.live
        if self.explain:
            self._at_phase_peak = [(n, self._labels.get(k, "?")) for k, n in self._storages.items()]

    def phase_peak(self) -> int:
        return self._phase_peak

    def at_peak(self) -> list[tuple[int, str]]:
        """explain: (bytes, label) of every storage live at the current phase's peak, largest first."""
        return sorted(self._at_phase_peak, key=lambda x: -x[0])

    def label(self, tensor: torch.Tensor, text: str) -> None:
        """explain: name what `tensor`'s storage is (e.g. the weight of a unit moved to the device)."""
        if self.explain and tensor.is_meta:
            self._labels[tensor.untyped_storage()._cdata] = text


_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
_PURE: dict = {}  # op -> True when it allocates fresh outputs: no output aliases an input, nothing mutated


def _pure(func) -> bool:
    if func not in _PURE:
        schema = getattr(func, "_schema", None)
        _PURE[func] = (schema is not None and not schema.is_mutable
                       and all(r.alias_info is None for r in schema.returns))
    return _PURE[func]


def _leaves(x):
    """The leaves of an op's arguments or outputs: flat tuples and lists are the common case."""
    if isinstance(x, (tuple, list)) and not any(isinstance(v, (tuple, list, dict)) for v in x):
        return x
    return tree_flatten(x)[0]


def _key(x):
    """A hashable stand-in for one argument (a meta tensor: its shape, strides and dtype), or None."""
    if isinstance(x, torch.Tensor):
        return (x.shape, x.stride(), x.dtype) if x.is_meta else None
    if isinstance(x, _SCALARS):
        return (type(x), x)  # 1, 1.0 and True are equal keys, but not equal arguments (dtypes differ)
    if isinstance(x, (tuple, list)):
        parts = tuple(_key(v) for v in x)
        return None if None in parts else (type(x), parts)
    if isinstance(x, dict):
        parts = tuple((k, _key(v)) for k, v in x.items())
        return None if any(v is None for _, v in parts) else (dict, parts)
    return None


def _signature(func, args, kwargs):
    """A hashable key for `func` on these arguments, or None when its outputs must be computed: the
    op may alias or mutate, a tensor is not on meta, or an argument is of another kind."""
    if not _pure(func):
        return None
    key = _key((args, kwargs))
    return None if key is None else (func, key)


class _Outputs:
    """How to remake an op's recorded outputs: a tensor, or a flat tuple/list of tensors and other
    values, each tensor remade by `empty_strided` from its (shape, stride, dtype)."""

    def __init__(self, kind, leaves):
        self.kind, self.leaves = kind, leaves  # kind: None for a lone tensor, else tuple or list

    def make(self):
        made = [torch.empty_strided(*leaf[1:], dtype=leaf[0], device="meta") if type(leaf) is _Shape else leaf
                for leaf in self.leaves]
        return made[0] if self.kind is None else self.kind(made)

    @classmethod
    def record(cls, out, inputs):
        """The recipe for `out`, or None when `empty_strided` cannot remake it exactly: a tensor not
        on meta, sharing a storage with another output or with an input (`_unsafe_view` does,
        though its schema declares no alias), offset into one, or with a storage of another size."""
        if isinstance(out, torch.Tensor):
            kind, leaves = None, [out]
        elif type(out) in (tuple, list) and not any(isinstance(v, (tuple, list, dict)) for v in out):
            kind, leaves = type(out), list(out)
        else:
            return None
        storages = {x.untyped_storage()._cdata for x in _leaves(inputs) if isinstance(x, torch.Tensor)}
        recorded = []
        for x in leaves:
            if not isinstance(x, torch.Tensor):
                recorded.append(x)
                continue
            if not x.is_meta or x.storage_offset() or x.untyped_storage()._cdata in storages:
                return None
            storages.add(x.untyped_storage()._cdata)
            # the storage `empty_strided` allocates for this shape and stride (computed: no allocation)
            span = 0 if x.numel() == 0 else 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride()))
            if span * x.element_size() != x.untyped_storage().nbytes():
                return None
            recorded.append(_Shape((x.dtype, tuple(x.shape), tuple(x.stride()))))
        return cls(kind, recorded)


class _Shape(tuple):
    """(dtype, shape, stride) of a recorded meta output."""


_ACTIVE: list[MetaMeter] = []  # the meters entered, innermost last


def replayable(module: torch.nn.Module) -> None:
    """Let the active `MetaMeter` replay repeated calls of `module` (see `_Replayed`). Only for
    modules used on meta (the planner's), whose forward is a pure function of its arguments."""
    if not isinstance(module.__dict__.get("forward"), _Replayed):
        module.forward = _Replayed(module, module.forward)


class _Recording:
    """What happened on the device during a call being recorded: its peak, the storages it
    allocated that are still alive, and whether it freed one it did not allocate."""

    def __init__(self, live: int):
        self.start = self.peak = live
        self.alive: set[int] = set()
        self.foreign = False


class _Replayed:
    """A module's forward whose memory trace is recorded once per call signature under a MetaMeter:
    the module, every argument (tensors by shape, strides and dtype, all on meta), the attention
    policy, the VAE's row banding and the torch-function modes active (e.g. `UpcastMode`). A later call with that signature
    raises the meter's peak to start + the recorded rise and returns fresh outputs of the recorded
    shapes, without running an op (never while autograd records). A trace is kept only when the call
    was pure on the device: it
    freed nothing it had not allocated, and what it allocated and left alive is exactly its outputs
    (fresh storages, no input's); then replaying is what running it again would do. Other calls
    always run."""

    _TRACES: dict = {}  # signature -> (rise of live bytes above the start, `_Outputs`), or None

    def __init__(self, module, forward):
        self.module, self.forward = module, forward

    def _graph(self, args, kwargs) -> bool:
        """Autograd would record this call (its saved tensors outlive it): never replayed."""
        return torch.is_grad_enabled() and (
            any(p.requires_grad for p in self.module.parameters())
            or any(isinstance(x, torch.Tensor) and x.requires_grad for x in _leaves((args, kwargs))))

    def __call__(self, *args, **kwargs):
        meter = _ACTIVE[-1] if _ACTIVE else None
        key = None if meter is None or meter.explain or self._graph(args, kwargs) else _key((args, kwargs))
        if key is None:
            return self.forward(*args, **kwargs)
        from torch.overrides import _get_current_function_mode_stack

        from ..model.attention import get_policy
        from ..model.vae import get_banding

        key = (self.module, key, get_policy(), get_banding(), tuple(type(m) for m in _get_current_function_mode_stack()))
        trace = self._TRACES.get(key)
        if trace is not None:
            rise, outputs = trace
            meter.reach(meter.live + rise)
            return outputs.make()
        record = _Recording(meter.live)
        meter._recordings.append(record)
        try:
            out = self.forward(*args, **kwargs)
        finally:
            meter._recordings.remove(record)
        if key not in self._TRACES:
            outputs = _Outputs.record(out, (args, kwargs))
            made = {t.untyped_storage()._cdata for t in ((out,) if isinstance(out, torch.Tensor) else _leaves(out))
                    if isinstance(t, torch.Tensor)}
            pure = outputs is not None and not record.foreign and record.alive == made
            self._TRACES[key] = (record.peak - record.start, outputs) if pure else None
        return out


def label(tensor: torch.Tensor, text: str) -> None:
    """Name `tensor`'s storage for the innermost active meter that explains (else nothing happens)."""
    if _ACTIVE and _ACTIVE[-1].explain:
        _ACTIVE[-1].label(tensor, text)


@contextmanager
def explaining(meter: MetaMeter, modules: dict):
    """While active, `meter` labels each allocation with the innermost of `modules` (name -> module)
    running when it was made (global forward hooks; for `MetaMeter(explain=True)` only)."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    names = {id(m): n for n, m in modules.items()}

    def enter(module, args):
        if id(module) in names:
            meter.modules.append(names[id(module)])

    def leave(module, args, out):
        if id(module) in names and meter.modules:
            meter.modules.pop()

    handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
    try:
        yield meter
    finally:
        for h in handles:
            h.remove()


def meter_for(device: torch.device):
    """The meter of a run on `device` (a `MetaMeter` must already be active for meta runs)."""
    if device.type == "cuda":
        return CudaMeter(device)
    return NullMeter()
