"""The invisible watermark of the CompVis reference script (`scripts/txt2img.py`), opt-in (`--watermark`).

The reference embeds the bytes of "StableDiffusionV1" with the `invisible-watermark` library
(`imwatermark`), method `dwtDct`, into every image and grid after decoding and before saving:

    wm_encoder = WatermarkEncoder()
    wm_encoder.set_watermark('bytes', "StableDiffusionV1".encode('utf-8'))
    img = cv2.cvtColor(np.array(img), cv2.COLOR_RGB2BGR)     # put_watermark: PIL RGB -> BGR array
    img = wm_encoder.encode(img, 'dwtDct')
    img = Image.fromarray(img[:, :, ::-1])                   # BGR -> RGB

`apply` is that procedure (`ImageWriter` calls it on every image it encodes); `decode` reads a payload
back with the library's `WatermarkDecoder`. The library is imported only when a watermark is asked
for: it needs OpenCV and PyWavelets (requirements.txt). Its limits (`request.check_watermark`
refuses a request beyond them): images of at least 256 x 256 pixels, and every payload bit needs a
4x4 block of the image's half-size Haar approximation to hold it.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from ..engine.request import WATERMARK, WATERMARK_METHOD, RequestError, watermark_library

METADATA_KEY = "Watermark"  # its value: `dwtDct StableDiffusionV1` (method, payload)


def _library():
    missing = watermark_library()
    if missing:
        raise RequestError(missing)
    import cv2
    from imwatermark import WatermarkDecoder, WatermarkEncoder

    return cv2, WatermarkEncoder, WatermarkDecoder


def apply(image: Image.Image, payload: str = WATERMARK) -> Image.Image:
    """`image` with `payload` embedded, exactly as the reference's `put_watermark` (module docstring)."""
    cv2, WatermarkEncoder, _ = _library()
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", payload.encode("utf-8"))
    bgr = cv2.cvtColor(np.array(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    bgr = encoder.encode(bgr, WATERMARK_METHOD)
    return Image.fromarray(bgr[:, :, ::-1])


def decode(image: Image.Image, bits: int) -> bytes:
    """The `bits`-bit payload read from `image` by the library's decoder (RGB -> BGR as the encoder)."""
    cv2, _, WatermarkDecoder = _library()
    bgr = cv2.cvtColor(np.array(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    return WatermarkDecoder("bytes", bits).decode(bgr, WATERMARK_METHOD)


def watermark_metadata(payload: str | None) -> dict[str, str]:
    """The infotext field of a watermarked image: `Watermark: dwtDct StableDiffusionV1`."""
    return {METADATA_KEY: f"{WATERMARK_METHOD} {payload}"} if payload else {}


def payload_in_metadata(text: str | None) -> str | None:
    """The payload a `Watermark` field names (`dwtDct TEXT` -> TEXT), or None."""
    prefix = WATERMARK_METHOD + " "
    return text[len(prefix):] if text and text.startswith(prefix) else None
