"""Control images: brought to the render's size, then made into the map a ControlNet reads.

Resize modes, as the webui's ControlNet extension names them:
- "just resize": stretched to the render's width and height;
- "crop and resize" (the default): scaled to cover the render's size, then its middle cut out;
- "resize and fill": scaled to fit inside it, the rest filled with the median colour of the scaled
  image's border pixels (the extension's `OUTER_FIT`).
Scaling is Lanczos. The extension resizes the preprocessed map; here the image is resized first
and the map made at the render's size, so a canny map has the render's own pixel edges.

Preprocessors that need no model weights:
- "none": the image is the map (a ready-made pose skeleton, depth or edge map);
- "invert": 255 - image (black lines on white, the webui's "invert (from white bg & black line)");
- "canny": OpenCV's `cv2.Canny(image, low, high)` (aperture 3, L1 gradient) on the RGB image, as the
  extension's canny annotator calls it, reimplemented in numpy: 3x3 Sobel derivatives per channel
  (replicated border), at each pixel the channel with the largest |dx| + |dy| (the first on ties),
  non-maximum suppression along the gradient direction binned with tan(22.5 deg) in OpenCV's
  fixed point, hysteresis (weak pixels above `low` kept when 8-connected to a pixel above `high`).
  cv2.Canny does not blur first, and neither does this.
The map is an RGB image of the render's size; a ControlNet reads it as (1, 3, H, W) in [0, 1].
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESIZE_MODES = {"just resize": "Just Resize", "crop and resize": "Crop and Resize",
                "resize and fill": "Resize and Fill"}  # ours -> the webui's label
PREPROCESSORS = ("none", "canny", "invert")
# ours -> the ControlNet extension's name for it (its UI and its /controlnet/module_list?alias_names=true)
PREPROCESSOR_LABELS = {"none": "none", "canny": "canny", "invert": "invert (from white bg & black line)"}
CANNY_SHIFT = 15
TG22 = int(0.4142135623730950488016887242097 * (1 << CANNY_SHIFT) + 0.5)  # tan(22.5 deg), fixed point


def resize_to(image: Image.Image, width: int, height: int, mode: str = "crop and resize") -> Image.Image:
    """`image` (RGB) at width x height by `mode` (see the module docstring)."""
    w, h = image.size
    if (w, h) == (width, height):
        return image
    if mode == "just resize":
        return image.resize((width, height), Image.LANCZOS)
    if mode == "crop and resize":
        k = max(width / w, height / h)
        sw, sh = max(width, round(w * k)), max(height, round(h * k))
        scaled = image.resize((sw, sh), Image.LANCZOS)
        left, top = (sw - width) // 2, (sh - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    if mode == "resize and fill":
        k = min(width / w, height / h)
        sw, sh = min(width, max(1, round(w * k))), min(height, max(1, round(h * k)))
        scaled = np.asarray(image.resize((sw, sh), Image.LANCZOS))
        border = np.concatenate([scaled[0], scaled[-1], scaled[:, 0], scaled[:, -1]])
        out = np.tile(np.median(border, axis=0).astype(np.uint8)[None, None], (height, width, 1))
        top, left = (height - sh) // 2, (width - sw) // 2
        out[top:top + sh, left:left + sw] = scaled
        return Image.fromarray(out)
    raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")


def preprocess(image: Image.Image, preprocessor: str = "none", low: int = 100, high: int = 200) -> Image.Image:
    """The map of `image` (RGB) by `preprocessor`, as an RGB image of the same size."""
    if preprocessor == "none":
        return image.convert("RGB")
    if preprocessor == "invert":
        return Image.fromarray(255 - np.asarray(image.convert("RGB")))
    if preprocessor == "canny":
        edges = canny(np.asarray(image.convert("RGB")), low, high)
        return Image.fromarray(np.repeat(edges[..., None], 3, axis=-1))
    raise ValueError(f"unknown preprocessor {preprocessor!r}; choose one of {', '.join(PREPROCESSORS)}")


def control_map(image: Image.Image, width: int, height: int, resize: str = "crop and resize",
                preprocessor: str = "none", low: int = 100, high: int = 200) -> Image.Image:
    """The map a ControlNet reads for a render of width x height."""
    return preprocess(resize_to(image.convert("RGB"), width, height, resize), preprocessor, low, high)


def hint_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB map -> (1, 3, H, W) float32 in [0, 1] (the ControlNet's input, as diffusers' and the webui's)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]


# ---- Canny, as OpenCV's cv::Canny (imgproc/src/canny.cpp) ----------------------------------------
def _sobel(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives (dx, dy) as int32, replicated border (OpenCV's BORDER_REPLICATE)."""
    p = np.pad(channel.astype(np.int32), 1, mode="edge")
    dx = (p[:-2, 2:] - p[:-2, :-2]) + 2 * (p[1:-1, 2:] - p[1:-1, :-2]) + (p[2:, 2:] - p[2:, :-2])
    dy = (p[2:, :-2] - p[:-2, :-2]) + 2 * (p[2:, 1:-1] - p[:-2, 1:-1]) + (p[2:, 2:] - p[:-2, 2:])
    return dx, dy


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Edges (H, W) uint8, 255 on an edge, of an (H, W) or (H, W, C) uint8 image: cv2.Canny(image, low,
    high) with aperture 3 and the L1 gradient (see the module docstring)."""
    if image.ndim == 2:
        image = image[..., None]
    low, high = int(np.floor(low)), int(np.floor(high))
    if low > high:
        low, high = high, low
    per = [_sobel(image[..., c]) for c in range(image.shape[-1])]
    dxs, dys = np.stack([d for d, _ in per]), np.stack([d for _, d in per])  # (C, H, W)
    mags = np.abs(dxs) + np.abs(dys)
    pick = mags.argmax(axis=0)[None]  # the first channel of largest magnitude
    dx, dy, mag = (np.take_along_axis(a, pick, 0)[0] for a in (dxs, dys, mags))
    h, w = mag.shape
    m = np.pad(mag, 1)  # zero outside the image, as OpenCV's magnitude buffer

    def at(oy, ox):  # the magnitude of the neighbour at offset (oy, ox)
        return m[1 + oy:1 + oy + h, 1 + ox:1 + ox + w]

    x, y = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << CANNY_SHIFT
    tg22x = x * TG22
    tg67x = tg22x + (x << (CANNY_SHIFT + 1))
    s = np.where((dx ^ dy) < 0, -1, 1)
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    diagonal = ~horizontal & ~vertical
    is_max = np.zeros((h, w), bool)
    is_max |= horizontal & (mag > at(0, -1)) & (mag >= at(0, 1))
    is_max |= vertical & (mag > at(-1, 0)) & (mag >= at(1, 0))
    # s = -1: the upper-right and lower-left neighbours; s = 1: upper-left and lower-right
    diag = np.where(s < 0, (mag > at(-1, 1)) & (mag > at(1, -1)), (mag > at(-1, -1)) & (mag > at(1, 1)))
    is_max |= diagonal & diag
    weak = is_max & (mag > low)
    strong = weak & (mag > high)
    return np.where(_hysteresis(strong, weak), 255, 0).astype(np.uint8)


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """The weak pixels 8-connected (through weak pixels) to a strong one."""
    keep = torch.from_numpy(strong)[None, None].float()
    allowed = torch.from_numpy(weak)[None, None].float()
    while True:
        grown = keep
        for _ in range(8):  # a few dilations per convergence check
            grown = F.max_pool2d(grown, 3, stride=1, padding=1) * allowed
        if torch.equal(grown, keep):
            return keep[0, 0].bool().numpy()
        keep = grown
