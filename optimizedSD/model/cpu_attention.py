"""Our CPU attention kernels (kernels/attention.c), bf16 and fp32, where they beat torch's.

- bf16, on CPUs with AVX512-BF16 and no AMX: torch's flash kernel runs SD's attention there at a quarter
  of the CPU's bf16 rate (its bf16 products take the emulated path unless AMX is there). Ours computes the
  same maths (fp32 scores and softmax, the probabilities rounded to bf16 for the product with v, fp32 sums)
  on the CPU's bf16 dot-product instruction. On AMX CPUs torch's kernel (oneDNN's AMX products) is kept.
- fp32, on CPUs with AVX512F, for head dims up to FP32_MAX_HEAD_DIM (SD's UNet at 64² and 32²): the same
  maths in fp32 on fp32 FMAs. At larger head dims (160, the VAE's 512) torch's kernel is faster.
Everything else (other devices and dtypes, masks, autograd) goes to torch's SDPA as before. Figures:
docs/benchmarks.md, `bench.py --attention`.

The C file is compiled once with the system C compiler (`cc`, or $CC) into the user cache
($XDG_CACHE_HOME or ~/.cache, `optimizedSD/`), named by a hash of the source and flags, and loaded with
ctypes; it needs nothing but libc and pthreads. Without a compiler, or where the build fails, torch's
SDPA is used and `status()` says why. OPTIMIZEDSD_CPU_ATTENTION=torch turns the kernels off.
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

SOURCE = Path(__file__).with_name("kernels") / "attention.c"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-fPIC", "-shared",
         "-pthread"]
SWITCH = "OPTIMIZEDSD_CPU_ATTENTION"  # "torch": never use these kernels
FUNCTIONS = {torch.bfloat16: "osd_attention_bf16", torch.float32: "osd_attention_f32"}
NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
FP32_MAX_HEAD_DIM = 80  # measured (bench.py --attention): ours 0.73x torch's time at d 40, 0.88x at 80, 1.2x at 160

_kernels: dict = {}  # dtype -> the loaded function, once decided
_why: dict = {}      # dtype -> why torch's kernel is used instead, once decided


def _cpu_wants(dtype: torch.dtype) -> str | None:
    """None where this CPU should run our kernel for `dtype`, else why not."""
    cpu = torch.cpu
    if dtype == torch.float32:
        return None if torch.backends.cpu.get_cpu_capability() == "AVX512" else "this CPU has no AVX512"
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
    target = cache_dir() / f"attention-{tag}.so"
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


def load_kernel(dtype: torch.dtype = torch.bfloat16):
    """The C function for `dtype` (the library built first if it is not in the cache); OSError where it
    cannot be built."""
    fn = getattr(ctypes.CDLL(str(_build())), FUNCTIONS[dtype])
    i64p = ctypes.POINTER(ctypes.c_int64)
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6 + [i64p] * 4 + [ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _load(dtype: torch.dtype):
    """The kernel this process uses for `dtype`, else None (and `_why[dtype]` says why); decided once."""
    if dtype in _kernels or dtype in _why:
        return _kernels.get(dtype)
    why = "turned off by OPTIMIZEDSD_CPU_ATTENTION=torch" if os.environ.get(SWITCH) == "torch" else _cpu_wants(dtype)
    if why is None:
        try:
            _kernels[dtype] = load_kernel(dtype)
            return _kernels[dtype]
        except OSError as e:
            why = f"the kernel could not be built: {e}"
    _why[dtype] = why
    return None


def status() -> str:
    """One line: which kernel bf16 and fp32 attention on this CPU use, and why."""
    parts = []
    for dtype, name in NAMES.items():
        parts.append(f"{name} attention: optimizedSD's kernel" if _load(dtype) is not None
                     else f"{name} attention: torch's kernel ({_why[dtype]})")
    return "; ".join(parts)


def handles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attention` below takes these inputs: bf16 (an even head dim) or fp32 (head dims up to
    FP32_MAX_HEAD_DIM) on the CPU,
    (B, h, N, d) with d equal for q and k, each last dim contiguous, no autograd, on a CPU the kernel is for."""
    if not (q.device.type == k.device.type == v.device.type == "cpu" and q.dtype == k.dtype == v.dtype
            and q.dtype in FUNCTIONS):
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[-1] != k.shape[-1]:
        return False
    if q.shape[-1] % 2 if q.dtype == torch.bfloat16 else max(q.shape[-1], v.shape[-1]) > FP32_MAX_HEAD_DIM:
        return False
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or min(q.shape[2], k.shape[2], v.shape[-1]) < 1:
        return False
    if any(t.stride(-1) != 1 for t in (q, k, v)) or (torch.is_grad_enabled() and
                                                      any(t.requires_grad for t in (q, k, v))):
        return False
    return _load(q.dtype) is not None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for inputs `handles` takes: (B, h, N, dv), a view of a (B, N, h, dv)
    tensor (so the caller's transpose back to tokens is free). `kernel`: the C function (`load_kernel`),
    by default the one this process uses for q's dtype."""
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[-1]
    out = torch.empty(b, n, h, dv, dtype=q.dtype).permute(0, 2, 1, 3)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v, out)]
    with record_function(f"optimizedSD::attention_{NAMES[q.dtype]}"):  # a row of its own in --profile-ops
        failed = (kernel or _kernels[q.dtype])(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, n, m,
                                               d, dv, *strides, d ** -0.5, torch.get_num_threads())
    if failed:
        raise MemoryError("out of memory in the CPU attention kernel")
    return out
