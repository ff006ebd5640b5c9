"""Reading small weight files (LoRAs, embeddings, adapters, VAEs) safely: `.safetensors`, or a pickle
loaded with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers,
so a file that would run code fails before running it. Errors are one line, raised as the caller's
exception class, naming the file and saying what it is not.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

SAFETENSORS = ".safetensors"
PICKLES = (".pt", ".pth", ".ckpt", ".bin")


def load_pickle(path: Path, error: type[Exception], what: str) -> object:
    """The object pickled in `path` (tensors on the CPU)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).splitlines()[0][:160] if str(e) else "not plain tensors"
        raise error(f"refusing to unpickle {path}: it holds more than tensors ({detail}); it is not a plain "
                    f"{what} (convert it to .safetensors with a tool you trust)") from None
    except Exception as e:
        raise error(f"cannot read {what} {path}: {_first_line(e)}; the file is truncated or corrupt") from None


def read_tensors(path: str | Path, error: type[Exception], what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(name -> tensor, the .safetensors header's `__metadata__` or {}) of a flat weights file; a pickle's
    top-level dict (or its `state_dict`) keeps only its tensors."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
        except Exception as e:
            raise error(f"cannot read {what} {path}: {_first_line(e)}; the file is truncated or corrupt") from None
    if suffix not in PICKLES:
        raise error(f"unsupported {what} file {path}: expected .safetensors, {', '.join(PICKLES)}")
    obj = load_pickle(path, error, what)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise error(f"{path} holds a {type(obj).__name__}, not a dict of tensors; it is not a {what}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}, {}


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:160] if lines else type(e).__name__
