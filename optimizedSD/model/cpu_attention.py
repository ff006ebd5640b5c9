"""The bf16 attention kernel for CPUs with AVX512-BF16 and no AMX (kernels/attention_bf16.c).

On such a CPU torch's flash kernel runs SD's attention at a quarter of the CPU's bf16 rate (its bf16
products take the emulated path unless AMX is there); this kernel computes the same maths (fp32 scores
and softmax, the probabilities rounded to bf16 for the product with v, fp32 sums) on the CPU's bf16
dot-product instruction, 2-2.5x faster (docs/benchmarks.md). On AMX CPUs torch's own kernel (oneDNN's
AMX products) is kept, and everything else (fp32, other devices) goes to torch's SDPA as before.

The C file is compiled once with the system C compiler (`cc`, or $CC) into the user cache
($XDG_CACHE_HOME or ~/.cache, `optimizedSD/`), named by a hash of the source and flags, and loaded with
ctypes; it needs nothing but libc and pthreads. Without a compiler, or where the build fails, torch's
SDPA is used and `status()` says why. OPTIMIZEDSD_CPU_ATTENTION=torch turns the kernel off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.profiler import record_function

SOURCE = Path(__file__).with_name("kernels") / "attention_bf16.c"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-fPIC", "-shared",
         "-pthread"]
SWITCH = "OPTIMIZEDSD_CPU_ATTENTION"  # "torch": never use this kernel

_lib = None  # the loaded function, once built
_why = None  # why it is not used, once known


def _cpu_wants_it() -> str | None:
    cpu = torch.cpu
    if not getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "this CPU has no AVX512-BF16"
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "this CPU has AMX, which torch's own kernel uses"
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optimizedSD"


def _build() -> Path:
    """The shared library for this source and these flags: from the cache, else compiled into it."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler (cc) found")
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"attention_bf16-{tag}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        built = Path(work) / target.name
        run = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
        if run.returncode:
            last = (run.stderr or run.stdout or "no output").strip().splitlines()[-1]
            raise OSError(f"{compiler} failed: {last}")
        os.replace(built, target)  # whole or not at all, for a process building beside this one
    return target


def load_kernel():
    """The kernel's C function (built first if it is not in the cache); OSError where it cannot be built."""
    fn = ctypes.CDLL(str(_build())).osd_attention_bf16
    i64p = ctypes.POINTER(ctypes.c_int64)
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6 + [i64p] * 4 + [ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _load():
    """The kernel where this process uses it, else None (and `_why` says why); decided once."""
    global _lib, _why
    if _lib is not None or _why is not None:
        return _lib
    _why = "turned off by OPTIMIZEDSD_CPU_ATTENTION=torch" if os.environ.get(SWITCH) == "torch" else _cpu_wants_it()
    if _why is None:
        try:
            _lib = load_kernel()
        except OSError as e:
            _why = f"the kernel could not be built: {e}"
    return _lib


def status() -> str:
    """One line: which kernel bf16 attention on this CPU uses, and why."""
    if _load() is not None:
        return "bf16 attention: optimizedSD's AVX512-BF16 kernel"
    return f"bf16 attention: torch's kernel ({_why})"


def handles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attention` below takes these inputs: bf16 on the CPU, (B, h, N, d) with an even d equal
    for q and k, each last dim contiguous, no autograd, on a CPU the kernel is for."""
    if not (q.device.type == k.device.type == v.device.type == "cpu"
            and q.dtype == k.dtype == v.dtype == torch.bfloat16):
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[-1] % 2 or q.shape[-1] != k.shape[-1]:
        return False
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or min(q.shape[2], k.shape[2], v.shape[-1]) < 1:
        return False
    if any(t.stride(-1) != 1 for t in (q, k, v)) or (torch.is_grad_enabled() and
                                                      any(t.requires_grad for t in (q, k, v))):
        return False
    return _load() is not None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for inputs `handles` takes: (B, h, N, dv), a view of a (B, N, h, dv)
    tensor (so the caller's transpose back to tokens is free). `kernel`: the C function (`load_kernel`),
    by default the one this process uses."""
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[-1]
    out = torch.empty(b, n, h, dv, dtype=q.dtype).permute(0, 2, 1, 3)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v, out)]
    with record_function("optimizedSD::attention_bf16"):  # a row of its own in --profile-ops
        failed = (kernel or _lib)(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, n, m, d, dv,
                                  *strides, d ** -0.5, torch.get_num_threads())
    if failed:
        raise MemoryError("out of memory in the CPU attention kernel")
    return out
