"""Load an original-layout SD v1 checkpoint (.ckpt/.pt/.pth or .safetensors) into its fragments.

Everything that can be wrong is found from key names and shapes before a single weight is assigned:
the model family (`detect_family`), keys no fragment owns, keys a fragment misses, and shapes that
differ from the config. Then each fragment, built with its parameters on the meta device (no memory,
no random init), takes the checkpoint's tensors with `load_state_dict(strict=True, assign=True)`,
so host RAM holds one copy of the weights:
- .safetensors (`safe_open`) and .ckpt (`torch.load(mmap=True, weights_only=True)`) are both read
  key by key from a file mapping. A tensor already in the requested dtype is assigned as is: it
  stays backed by the mapping and its pages load on first use. Others are converted one at a time,
  and on Linux the source's whole pages are then unmapped from this process (`madvise(MADV_DONTNEED)`
  on pages it never wrote): without that, every fp32 page read stays mapped and counted in the
  resident set until the load ends, and an fp32 -> fp16 load peaks at 3x the fp16 weights. The
  pages stay in the kernel's page cache, so the next load reads memory, not the disk.
- Keys the requested fragments do not need (the EMA copy without --ema, the UNet's own weights
  with it) are never read. Only a legacy non-zip .ckpt is read into RAM whole.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import pickle
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .config import SDConfig
from .fragments import (FRAGMENTS, SKIPPED_KEYS, TEXT_ENCODER, UNET_IN, UNET_OUT, UNET_PREFIX,
                        build_fragment, checkpoint_key, fragment_of)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
EMA_PREFIX = "model_ema."  # LitEma: model_ema.<unet key without "model." and without dots>
UNET_FRAGMENTS = (UNET_IN, UNET_OUT)
LIGHTNING_CALLBACK = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"

# family -> UNet input channels of the SD v1 variants this code can run (the config decides which)
_CHANNELS = {"sd-v1": 4, "sd-v1-inpainting": 9, "instruct-pix2pix": 8}
_FAMILIES = {
    "sd-v1": "an SD v1 text-to-image checkpoint (4-channel UNet)",
    "sd-v1-inpainting": "an SD v1 inpainting checkpoint (9-channel UNet); use optimized_inpaint.py",
    "instruct-pix2pix": "an InstructPix2Pix checkpoint (8-channel UNet), which is not supported",
    "sd-2": "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, 1024-wide context); "
            "only SD v1 (1.x) checkpoints are supported",
    "sdxl": "an SDXL checkpoint; only SD v1 (1.x) checkpoints are supported",
    "unknown": "a checkpoint whose UNet takes {channels} input channels, not an SD v1 model",
    "not-sd": "not a Stable Diffusion checkpoint in the original layout (no model.diffusion_model.* "
              "keys); diffusers folders, VAE-only, LoRA and embedding files cannot be loaded here",
}


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; the message says why and what to do."""


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor key of a checkpoint with its shape (a .safetensors file reads only its header)."""
    with _open(Path(path)) as (shapes, _, _):
        return dict(shapes)


def detect_family(shapes: dict[str, tuple[int, ...]]) -> str:
    """Name the model family from key names and shapes alone.

    Returns "sd-v1", "sd-v1-inpainting", "instruct-pix2pix", "sd-2", "sdxl", "not-sd" (no UNet
    keys at all) or "unknown" (an SD-like UNet with other input channels).
    """
    if any(k.startswith(("conditioner.embedders.", UNET_PREFIX + "label_emb.")) for k in shapes):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):  # OpenCLIP text tower
        return "sd-2"
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        return "not-sd"
    to_k = shapes.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if to_k is not None and len(to_k) == 2 and to_k[1] == 1024:  # (inner, context_dim)
        return "sd-2"
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")  # (out, in, 3, 3)
    channels = conv_in[1] if conv_in is not None and len(conv_in) == 4 else 4
    return {c: f for f, c in _CHANNELS.items()}.get(channels, "unknown")


def load_fragments(path: str | Path, cfg: SDConfig, names=FRAGMENTS, dtype: torch.dtype = torch.float32,
                   ema: bool = False, channels_last: bool = False) -> dict[str, nn.Module]:
    """Load fragments `names` from the checkpoint at `path`: CPU modules in eval mode, no grad, in `dtype`;
    with `channels_last`, the convolution weights (4-d) of every fragment but the text encoder in
    that memory format (copied from the file as they are read, so no second copy is ever held).

    `ema=True` takes the UNet weights from the checkpoint's `model_ema.*` copy. Raises
    CheckpointError, before any weight is assigned, for anything that does not fit `cfg`.
    Checkpoints hold no adapters: the UNet is built without `cfg.unet.adapters`
    (`adapters.load_adapter_folder` adds them).
    """
    path = Path(path)
    cfg = cfg.with_adapters(None)
    names = tuple(names)
    with _open(path) as (shapes, read, mapped):
        family = detect_family(shapes)
        if _CHANNELS.get(family) != cfg.unet.in_channels:
            raise CheckpointError(_family_message(path, family, shapes, cfg))
        with parameters_on_meta():
            modules = {name: build_fragment(name, cfg) for name in names}
        expected = {name: {k: tuple(v.shape) for k, v in m.state_dict().items()} for name, m in modules.items()}
        plan = _plan(path, shapes, expected, ema)
        for name, module in modules.items():
            last = channels_last and name != TEXT_ENCODER
            state = {local: _convert(read(key), dtype, mapped, last) for local, key in plan[name].items()}
            module.load_state_dict(state, strict=True, assign=True)
            del state
            _finish(name, module, dtype)
    return modules


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file by its key, as stored (views of a file mapping where the
    format allows), unchecked: for converters that want the original layout whole."""
    with _open(Path(path)) as (shapes, read, _):
        return {key: read(key) for key in shapes}


def empty_fragments(cfg: SDConfig, names=FRAGMENTS, dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Fragments `names` as `load_fragments` gives them, but with uninitialised weights and no file
    read: real CPU tensors in `dtype`, allocated and never written (the planner's host copies)."""
    with parameters_on_meta():
        modules = {name: build_fragment(name, cfg) for name in names}
    for name, module in modules.items():
        state = {k: torch.empty(v.shape, dtype=dtype if v.is_floating_point() else v.dtype)
                 for k, v in module.state_dict().items()}
        module.load_state_dict(state, strict=True, assign=True)
        _finish(name, module, dtype)
    return modules


def _plan(path: Path, shapes: dict, expected: dict[str, dict], ema: bool) -> dict[str, dict[str, str]]:
    """fragment -> {local key: checkpoint key to read}, after checking keys and shapes."""
    ema_unet = ema and any(name in expected for name in UNET_FRAGMENTS)
    ema_names = {}
    if ema_unet:
        unet_keys = {k for k in shapes if k.startswith(UNET_PREFIX)}
        unet_keys |= {checkpoint_key(n, k) for n in UNET_FRAGMENTS for k in expected.get(n, ())}
        ema_names = {_ema_key(k): k for k in unet_keys}
        if not any(k.startswith(EMA_PREFIX) and k not in SKIPPED_KEYS for k in shapes):
            raise CheckpointError(f"{path} has no EMA weights (model_ema.*): it is EMA-only or was saved "
                                  f"without an EMA copy; drop --ema")
    plan: dict[str, dict[str, str]] = {name: {} for name in expected}
    unknown = []
    for key in shapes:
        if key.startswith(EMA_PREFIX) and key not in SKIPPED_KEYS:
            if not ema_unet:
                continue
            if key not in ema_names:
                unknown.append(key)
                continue
            name, local = fragment_of(ema_names[key])
        else:
            try:
                place = fragment_of(key)
            except KeyError:
                unknown.append(key)
                continue
            if place is None:
                continue
            name, local = place
            if ema_unet and name in UNET_FRAGMENTS:
                continue  # these weights come from the EMA copy
            if name == TEXT_ENCODER and not local.startswith("transformer.text_model."):
                local = "transformer.text_model." + local[len("transformer."):]  # older transformers' layout
        if name not in plan:
            continue
        if local in plan[name]:
            raise CheckpointError(f"{path} holds {plan[name][local]} and {key}, two copies of the same "
                                  f"weight; remove one (re-export the checkpoint)")
        plan[name][local] = key
    if unknown:
        raise CheckpointError(f"{path} has {len(unknown)} key(s) no SD v1 model part uses: {_some(unknown)}; it "
                              f"is not a plain SD v1 checkpoint, or not the architecture of the config (--config)")
    missing = [_ema_key(checkpoint_key(n, k)) if ema_unet and n in UNET_FRAGMENTS else checkpoint_key(n, k)
               for n, keys in expected.items() for k in keys if k not in plan[n]]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} key(s) the model needs: {_some(missing)}; "
                              f"the file is incomplete, or the model config does not match it (--config)")
    for name, places in plan.items():
        for local, key in places.items():
            if shapes[key] != expected[name][local]:
                raise CheckpointError(
                    f"{path}: {key} has shape {shapes[key]} in the checkpoint but {expected[name][local]} "
                    f"in the model config; pass the checkpoint's YAML with --config")
    return plan


def _ema_key(unet_key: str) -> str:
    """`model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def _some(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _family_message(path: Path, family: str, shapes: dict, cfg: SDConfig) -> str:
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight") or (0, "?")
    message = f"{path} is {_FAMILIES[family].format(channels=conv_in[1])}"
    if family == "sd-v1":  # an SD v1 variant, but the config asks for another one
        message += (f", but the config expects a {cfg.unet.in_channels}-channel UNet; "
                    f"use a matching checkpoint or --config")
    return message


def _convert(tensor: torch.Tensor, dtype: torch.dtype, mapped: bool = False, channels_last: bool = False) -> torch.Tensor:
    """`tensor` in `dtype`, and channels-last when 4-d and asked (no copy when it already is); a
    converted source read from a file mapping (`mapped`) has its pages unmapped from this process
    once copied."""
    layout = torch.channels_last if channels_last and tensor.dim() == 4 else torch.preserve_format
    if not tensor.is_floating_point() or (tensor.dtype == dtype and layout == torch.preserve_format):
        return tensor
    out = tensor.to(dtype=dtype, memory_format=layout)
    if mapped:
        _unmap_pages(tensor)
    return out


def _unmap_pages(tensor: torch.Tensor) -> None:
    """Drop this process's mapping of the whole pages of `tensor`'s bytes (Linux `MADV_DONTNEED`; a
    no-op elsewhere), so they leave its resident set. They are pages of a file mapping this code
    only read, so a later touch maps the same bytes again, and they stay in the page cache
    (`MADV_PAGEOUT`, used before, also evicted them there: every run read the checkpoint from disk)."""
    if not sys.platform.startswith("linux") or _libc() is None:
        return
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc().madvise(first, last - first, mmap.MADV_DONTNEED)  # best effort: an error only means the pages stay


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def _finish(name: str, module: nn.Module, dtype: torch.dtype) -> None:
    """Buffers no checkpoint holds (non-persistent, computed on the CPU at build) take `dtype` too."""
    for owner in module.modules():
        for key, buf in owner._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                owner._buffers[key] = buf.to(dtype)
    on_meta = [k for k, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if on_meta:  # a bug in the model code, not in the checkpoint
        raise RuntimeError(f"fragment {name}: {_some(on_meta)} still on the meta device after loading")
    module.eval().requires_grad_(False)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with every parameter on the meta device and every buffer computed on the CPU.

    Parameters cost nothing and are replaced by the checkpoint's tensors (`assign=True`); buffers
    no checkpoint holds (non-persistent ones) get their real values.
    Patches `nn.Module.register_parameter` while it runs, as accelerate's `init_empty_weights` does;
    a parameter's uninitialised CPU storage exists only until it is registered. The `nn.init`
    functions do nothing meanwhile (as transformers' `no_init_weights`): initialising meta tensors is
    wasted work, and the first one loads torch's meta kernels, over a second of a CPU run.
    """
    register = nn.Module.register_parameter
    inits = {name: getattr(nn.init, name) for name in _INITS}

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    for name in _INITS:
        setattr(nn.init, name, _no_init)
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        for name, fn in inits.items():
            setattr(nn.init, name, fn)


# the nn.init functions torch's layers and ours initialise parameters with
_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
          "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


def _no_init(tensor, *args, **kwargs):
    return tensor


# -- reading files ------------------------------------------------------------------------------

@contextmanager
def _open(path: Path) -> Iterator[tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor], bool]]:
    """Yield (shapes of every tensor key, read(key) -> tensor, whether the tensors are views of a
    file mapping) for a checkpoint file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except Exception as e:
            raise _unreadable(path, e) from None

        def read(key: str) -> torch.Tensor:
            try:
                return handle.get_tensor(key)
            except Exception as e:
                raise _unreadable(path, e) from None

        with handle:
            yield shapes, read, True
    elif suffix in PICKLE_SUFFIXES:
        state, mapped = _torch_load(path)
        yield {k: tuple(v.shape) for k, v in state.items()}, state.pop, mapped  # pop: drop each once assigned
    else:
        raise CheckpointError(f"unsupported checkpoint file {path}: expected .safetensors, .ckpt, .pt or .pth")


def _torch_load(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors of a pickled checkpoint, with or without Lightning's `state_dict` wrapper, and
    whether they are views of a file mapping (all but the legacy non-zip format).

    `weights_only=True` refuses every global except tensors, plain containers and the data-only
    classes of `_safe_globals`, so a pickle that would run code fails before running it.
    """
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                obj, mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
            except RuntimeError as e:
                if "mmap can only be used" not in str(e):
                    raise
                obj, mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=False), False  # legacy
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"optimizedSD refuses to unpickle {found.group(1)} in {path}: not a plain weights file "
                f"(unpickling it could run code); convert it to .safetensors with a tool you trust") from None
        raise _unreadable(path, e.__context__ or e) from None
    except Exception as e:
        raise _unreadable(path, e) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; it is not an SD checkpoint")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}, mapped


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = re.split(r"(?<=\.)\s", lines[0])[0][:160] if lines else type(error).__name__  # first sentence
    return CheckpointError(f"cannot read checkpoint {path}: file is truncated or corrupt ({detail}); "
                           f"download it again")


class _LightningCallback:
    """Stands in for Lightning's ModelCheckpoint when unpickling: its saved fields become plain data."""


def _safe_globals() -> list:
    """The data-only globals real SD checkpoints pickle besides tensors, and nothing else."""
    allowed: list = [(_LightningCallback, LIGHTNING_CALLBACK)]
    try:
        import numpy as np
    except ImportError:
        return allowed
    core = np._core if hasattr(np, "_core") else np.core  # numpy.core became numpy._core in 2.0
    scalar = core.multiarray.scalar
    allowed += [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: dtype instances unpickle as these classes
    allowed += [getattr(dtypes, n) for n in getattr(dtypes, "__all__", ())]
    return allowed
