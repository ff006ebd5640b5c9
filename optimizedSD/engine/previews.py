"""Live previews of a render: every N sampling steps, the images the current latents would decode to.

The engine reports each step's denoised latents (the sampler's callback `denoised`: the x0 estimate,
scaled latents (B, 4, h, w)); a `Previewer` turns every N-th into a `Preview` of RGB images for the
fronts, which only show it (the browser UI) or write it (the CLI's `--preview_every`):

- by default a linear map of the 4 latent channels to RGB (`approx_rgb`): ComfyUI's SD 1.x
  `latent_rgb_factors` (comfy/latent_formats.py `SD15`), on the host, at latent size (h x w): no
  weights, no device memory;
- with `--taesd PATH` TAESD's decoder (model/taesd.py), a fragment of its own (`TAESD`) that the
  offload engine puts on the device for the preview and takes off again, like any streamed unit:
  full-size images (8h x 8w).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

TAESD = "taesd"  # the fragment name of the TAESD decoder when the engine has one
# SD 1.x latent channel -> (R, G, B), for scaled latents; the result is read as [-1, 1] (ComfyUI `SD15`)
LATENT_RGB_FACTORS = ((0.3512, 0.2297, 0.3227),
                      (0.3250, 0.4974, 0.2350),
                      (-0.2829, 0.1762, 0.2721),
                      (-0.2120, -0.2616, -0.7177))


@dataclass
class Preview:
    """The images of a render's current batch at sampling step `step` of `total`, image j seeded `seeds[j]`."""
    step: int
    total: int
    seeds: list[int]
    images: list[Image.Image]
    method: str  # "approx" or "taesd"


def approx_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> (B, 3, h, w) in about [-1, 1], fp32 on the host (`LATENT_RGB_FACTORS`)."""
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32)
    return torch.einsum("bchw,cr->brhw", latents.detach().float().cpu(), factors)


def preview_images(latents: torch.Tensor, engine=None) -> tuple[list[Image.Image], str]:
    """(RGB images, method) of scaled latents: TAESD when `engine` (an `offload.Offloader`) holds its
    fragment, else `approx_rgb`."""
    from .inputs import to_pil

    if engine is not None and TAESD in engine.fragments:
        with engine.use(TAESD) as decoder:
            dtype = next(decoder.parameters()).dtype
            images = decoder(latents.detach().to(engine.device, dtype)).float()
        return to_pil(images), "taesd"
    return to_pil(approx_rgb(latents)), "approx"


class Previewer:
    """Calls `on_preview(Preview)` every `every` steps of a render (`Engine.render`'s `on_preview`)."""

    def __init__(self, on_preview: Callable[[Preview], None], every: int = 1):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"previews every N steps takes a whole N >= 1, got {every!r}")
        self.on_preview, self.every = on_preview, every
        self.seeds: list[int] = []  # the batch being sampled (the engine sets it)

    def step(self, done: int, total: int, info: dict, engine=None) -> None:
        """Step `done` of `total` finished with the sampler's callback `info` (its `denoised`)."""
        if done % self.every and done != total:
            return
        with torch.no_grad():
            images, method = preview_images(info["denoised"], engine)
        self.on_preview(Preview(done, total, list(self.seeds), images, method))


def read_taesd(path, dtype: torch.dtype):
    """The TAESD decoder of `path` (None: None), or a one-line `RequestError`."""
    from ..model.taesd import TaesdError, load_taesd
    from .request import RequestError

    if path is None:
        return None
    try:
        return load_taesd(path, dtype)
    except TaesdError as e:
        raise RequestError(str(e)) from None
