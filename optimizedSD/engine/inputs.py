"""The images a run starts from: the init image of img2img and inpainting, and the inpainting mask.

Read as the reference pipelines read them (CompVis `load_img`, diffusers' `VaeImageProcessor`):
resized with Lanczos when the size differs, then pixels / 255 * 2 - 1. An image with transparency is
composited on white first; grayscale, palette and CMYK images become RGB. A mask becomes grayscale
and is binarised at half intensity: white (>= 128) is repainted, black kept.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MASK_THRESHOLD = 128  # mask pixels at or above this (of 255) are repainted
MAX_INPUT_SIDE = 8192
MAX_INPUT_PIXELS = MAX_INPUT_SIDE ** 2  # an init image or mask past this is refused before decoding


class InputError(Exception):
    """An input image that cannot be used; the message names the file and the fix."""


def open_image(source: str | Path | bytes, what: str) -> Image.Image:
    """The image at `source` (a path, or the bytes of an image file), fully read (so a truncated file
    fails here, not later). An image of more than MAX_INPUT_PIXELS is refused from its header, before
    it is decoded."""
    if isinstance(source, (bytes, bytearray)):
        name, opened = f"({len(source)} bytes)", io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{what} not found: {path}; check the path")
        name, opened = str(path), path
    try:
        with Image.open(opened) as im:
            check_pixels(im.size, f"{what} {name}")
            im.load()
            return im.copy()
    except Image.DecompressionBombError:  # PIL's own guard, past twice its MAX_IMAGE_PIXELS
        raise InputError(f"{what} {name} is larger than {MAX_INPUT_PIXELS:,} pixels "
                         f"({MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}); scale it down first") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} {name} is not an image PIL can read; use a png, jpg or webp file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read {what} {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                         f"the file may be truncated or corrupt") from None


def check_pixels(size: tuple[int, int], what: str) -> None:
    """Refuse an image of more than MAX_INPUT_PIXELS (from its size alone)."""
    w, h = size
    if w * h > MAX_INPUT_PIXELS:
        raise InputError(f"{what} is {w}x{h}, more than {MAX_INPUT_PIXELS:,} pixels ({MAX_INPUT_SIDE}x"
                         f"{MAX_INPUT_SIDE}); scale it down first")


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB; transparency (RGBA, LA, palette with a transparent colour) composited on white."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def default_size(im: Image.Image, multiple: int = 8) -> tuple[int, int]:
    """(width, height) of `im` rounded down to a multiple of `multiple` (at least `multiple`)."""
    return tuple(max(multiple, v // multiple * multiple) for v in im.size)


def resized(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    return im if im.size == size else im.resize(size, resample=Image.LANCZOS)


def load_mask(mask: str | Path | Image.Image, size: tuple[int, int]) -> tuple[Image.Image, bool]:
    """(mask, a file or an image, as a binary "L" image of `size`: 255 repaint, 0 keep; whether it
    had to be resized)."""
    if isinstance(mask, Image.Image):
        check_pixels(mask.size, "mask")
    im = mask if isinstance(mask, Image.Image) else open_image(mask, "mask")
    gray = im.convert("RGBA").convert("L") if im.mode == "P" else im.convert("L")
    was = gray.size
    gray = resized(gray, size)
    binary = gray.point(lambda v: 255 if v >= MASK_THRESHOLD else 0)
    return binary, was != size


def image_tensor(im: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1]."""
    a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2.0 - 1.0


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """Binary "L" mask -> (1, 1, H, W) float32: 1 repaint, 0 keep."""
    return torch.from_numpy((np.asarray(mask) >= MASK_THRESHOLD).astype(np.float32))[None, None]


def paste_back(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """`generated` where the mask is white, `original` (its exact pixels) everywhere else."""
    return Image.composite(generated, original.convert("RGB"), mask)


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """Decoded VAE batch (B, 3, H, W) in [-1, 1], any float dtype/device → B RGB images.

    Math in float32 on the CPU: round(clamp((x + 1) / 2, 0, 1) * 255) (round half to even,
    so 0 → 127.5 → 128); ±inf clamp, NaN (e.g. an fp16 VAE overflow) counts as 0 (grey 128).
    The caller's tensor is not modified.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"to_pil expects a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float32)
    x = torch.nan_to_num((x + 1) / 2, nan=0.5).clamp(0, 1)
    arr = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in arr]
