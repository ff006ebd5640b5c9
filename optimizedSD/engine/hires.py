"""Hires fix (the AUTOMATIC1111 webui's txt2img "Hires. fix"): render at the base size, upscale, then an
img2img pass at the larger size with its own steps and denoising strength.

    base pass      noise (B, 4, h, w) -> sampler, `steps`                    -> latents (B, 4, h, w)
    upscale        latent:          F.interpolate(bilinear, antialias=False)  -> (B, 4, H/8, W/8)
                   latent-nearest:  F.interpolate(nearest)
                   lanczos:         decode -> 8-bit RGB -> PIL Lanczos -> encode (a posterior sample)
    second pass    SDEdit from the upscaled latents: the last int(denoise x n) of an n-step plan
                   (n = hr_steps, 0: the base steps), x = init + sigma * noise at the first of them

The webui's "Latent" upscaler is bilinear without antialiasing and "Latent (nearest)" nearest
(`modules/shared_items.py` `latent_upscale_modes`); its target size is `calculate_target_resolution`'s:
`hr_scale` times the base size, or `hr_resize_x`/`hr_resize_y` (one of them 0: the other side keeps
the aspect; both: resize to cover, then crop the middle in latent space). Sizes are floored to the
latent grid (multiples of 8 pixels).

Randomness: image i's CPU generator draws the base noise, the base sampler's noise, then (lanczos)
the posterior sample of the upscaled image, then the second pass's noise: what diffusers'
StableDiffusionImg2ImgPipeline draws when handed that generator after its txt2img pipeline
(`tests/test_hires.py`). The second pass's step count is diffusers' (`strength_steps`), which the
webui's `img2img_fix_steps` off differs from by one step.

The conditioning is computed once for both passes. Memory: `Engine.plan` plans a hires request at
its larger size (the second pass bounds the first), `Engine._plan_only` predicts both passes.
This module imports nothing above it and not `request.py` (which imports it for its checks).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

# our name -> (F.interpolate mode or None for decode + Lanczos + encode, the webui's label)
UPSCALERS = {"latent": ("bilinear", "Latent"), "latent-nearest": ("nearest", "Latent (nearest)"),
             "lanczos": (None, "Lanczos")}
DEFAULT_DENOISE = 0.7  # the webui's denoising_strength default


def wanted(r) -> bool:
    """Whether request `r` asks for the hires fix (`hr_scale` given, or a resize)."""
    return r.hr_scale is not None or bool(r.hr_resize_x) or bool(r.hr_resize_y)


@dataclass(frozen=True)
class Target:
    """Where the second pass works: the latent size (h, w) after cropping, and the crop (rows, columns)
    taken off the upscaled latents (its first half at the top/left, as the webui's truncation)."""
    latent: tuple[int, int]
    upscaled: tuple[int, int]  # latent size before the crop
    crop: tuple[int, int]

    def pixels(self, f: int) -> tuple[int, int]:
        """(width, height) of the final image."""
        return self.latent[1] * f, self.latent[0] * f


def target(width: int, height: int, scale: float | None, resize_x: int, resize_y: int, f: int) -> Target:
    """The webui's `calculate_target_resolution` on the latent grid of factor `f`."""
    tx = ty = 0
    if not resize_x and not resize_y:
        up_x, up_y = int(width * scale), int(height * scale)
    elif not resize_y:
        up_x, up_y = resize_x, resize_x * height // width
    elif not resize_x:
        up_x, up_y = resize_y * width // height, resize_y
    else:
        if width / height < resize_x / resize_y:
            up_x, up_y = resize_x, resize_x * height // width
        else:
            up_x, up_y = resize_y * width // height, resize_y
        tx, ty = (up_x - resize_x) // f, (up_y - resize_y) // f
    up = (up_y // f, up_x // f)
    return Target((up[0] - ty, up[1] - tx), up, (ty, tx))


def target_of(r, f: int) -> Target:
    return target(r.width, r.height, r.hr_scale, r.hr_resize_x, r.hr_resize_y, f)


def _crop(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """The webui's truncation: rows ty // 2 off the top and (ty + 1) // 2 off the bottom, likewise columns."""
    ty, tx = crop
    return x[..., ty // 2:x.shape[-2] - (ty + 1) // 2, tx // 2:x.shape[-1] - (tx + 1) // 2]


def upscale_latents(latents: torch.Tensor, upscaler: str, t: Target) -> torch.Tensor:
    """Latents (B, C, h, w) -> (B, C, *t.latent) by a latent upscaler (bilinear or nearest)."""
    mode = UPSCALERS[upscaler][0]
    return _crop(F.interpolate(latents, size=t.upscaled, mode=mode, **({"antialias": False} if mode == "bilinear"
                                                                       else {})), t.crop)


def lanczos(image, t: Target, f: int):
    """A PIL image resized (Lanczos) to the upscaled size, then cropped as the latents would be."""
    from PIL import Image

    up = image.resize((t.upscaled[1] * f, t.upscaled[0] * f), Image.LANCZOS)
    ty, tx = t.crop
    left, top = tx // 2 * f, ty // 2 * f
    return up.crop((left, top, left + t.latent[1] * f, top + t.latent[0] * f))


def second_pass_settings(settings, hr_steps: int):
    """The second pass's sampler settings: the base's, with `hr_steps` steps (0: the base's)."""
    return replace(settings, steps=hr_steps or settings.steps)


def hires_latents(pipe, prompt: str, negative_prompt: str, seeds: list[int], width: int, height: int, settings,
                  r, fixed_noise: torch.Tensor | None = None, callback=None) -> torch.Tensor:
    """The final latents (B, C, *target.latent) of a hires-fix txt2img of `pipe` (`engine.pipeline.Pipeline`);
    `r` gives the hires fields (hr_scale, hr_resize_x/y, hr_upscaler, hr_steps, hr_denoise)."""
    from .inputs import image_tensor, to_pil

    f, c = pipe.cfg.downsample_factor, pipe.cfg.channels
    cond, uncond, generators = pipe._start(prompt, negative_prompt, seeds)
    noise = pipe._noise(generators, (1, c, height // f, width // f), fixed_noise)
    latents = pipe.sample(cond, uncond, noise, generators, settings, callback)
    t = target_of(r, f)
    if UPSCALERS[r.hr_upscaler][0] is not None:
        init = upscale_latents(latents, r.hr_upscaler, t)
    else:
        images = to_pil(pipe.decode(latents))
        del latents  # not on the device while the larger image is encoded
        init = torch.cat([pipe.encode(image_tensor(lanczos(im, t, f)), [g]) for im, g in zip(images, generators)])
    noise = pipe._noise(generators, (1, c, *t.latent), None)
    return pipe.sample(cond, uncond, noise, generators, second_pass_settings(settings, r.hr_steps), callback,
                       init=init, strength=r.hr_denoise)


def second_pass_steps(schedule, r) -> int:
    """Sampling steps the second pass of `r` walks (0 without the hires fix)."""
    from ..sampling.samplers import make_plan, strength_steps

    if not wanted(r):
        return 0
    return strength_steps(make_plan(schedule, r.sampler, r.hr_steps or r.steps, karras=r.karras).steps, r.hr_denoise)


# ---- metadata --------------------------------------------------------------------------------
def hires_metadata(r) -> dict:
    """The webui's infotext keys of a hires-fix request: `Denoising strength` (our `strength` key),
    `Hires upscale` or `Hires resize`, `Hires steps` (when not the base's), `Hires upscaler`; and
    `size`, the base size, as the webui's `Size`."""
    if not wanted(r):
        return {}
    meta = {"strength": r.hr_denoise, "size": f"{r.width}x{r.height}"}
    if r.hr_resize_x or r.hr_resize_y:
        meta["Hires resize"] = f"{r.hr_resize_x}x{r.hr_resize_y}"
    else:
        meta["Hires upscale"] = f"{r.hr_scale:g}"
    if r.hr_steps:
        meta["Hires steps"] = r.hr_steps
    meta["Hires upscaler"] = UPSCALERS[r.hr_upscaler][1]
    return meta


def hires_fields(parsed: dict) -> tuple[dict, list[str]]:
    """(`Request` fields, notes) of the hires keys of a parsed infotext (`infotext.parse`); ({}, [])
    when it has none. Its `Denoising strength` is then the second pass's (`hr_denoise`)."""
    if "Hires upscale" not in parsed and "Hires resize" not in parsed:
        return {}, []
    fields, notes = {}, []
    labels = {label.lower(): ours for ours, (_, label) in UPSCALERS.items()}
    upscaler = parsed.get("Hires upscaler", "Latent")
    if upscaler.lower() in labels:
        fields["hr_upscaler"] = labels[upscaler.lower()]
    else:
        notes.append(f"hires upscaler {upscaler!r} is not one of ours ({', '.join(l for _, l in UPSCALERS.values())})")
    try:
        if "Hires resize" in parsed:
            x, y = parsed["Hires resize"].lower().split("x")
            fields.update(hr_resize_x=int(x), hr_resize_y=int(y))
        else:
            fields["hr_scale"] = float(parsed["Hires upscale"])
        fields["hr_steps"] = int(parsed.get("Hires steps", 0))
        fields["hr_denoise"] = float(parsed.get("Denoising strength", DEFAULT_DENOISE))
    except ValueError:
        notes.append("hires values that are not numbers: " + ", ".join(
            f"{k}: {parsed[k]}" for k in ("Hires upscale", "Hires resize", "Hires steps", "Denoising strength")
            if k in parsed))
    return fields, notes


# ---- memory ----------------------------------------------------------------------------------
def planned_request(r, f: int):
    """The request whose memory plan covers both passes of `r`: the second pass at the larger size (an
    img2img one for lanczos, which encodes); every shape of the first pass is smaller. `r` itself
    without the hires fix."""
    if not wanted(r):
        return r
    width, height = target_of(r, f).pixels(f)
    return replace(r, width=max(width, r.width), height=max(height, r.height),
                   kind="img2img" if UPSCALERS[r.hr_upscaler][0] is None else r.kind)


def pass_requests(r, schedule, f: int):
    """(first, second): requests without the hires fix whose plans on `meta` are the two passes of `r`
    (`Engine._plan_only`): the base txt2img, and the second pass at the larger size: an img2img of
    `hr_denoise` for lanczos (it encodes), a txt2img of the steps it walks for the latent upscalers
    (same shapes, same bytes per step)."""
    off = dict(hr_scale=None, hr_resize_x=0, hr_resize_y=0, hr_steps=0, hr_denoise=DEFAULT_DENOISE,
               hr_upscaler="latent")
    width, height = target_of(r, f).pixels(f)
    second = dict(width=width, height=height, **off)
    if UPSCALERS[r.hr_upscaler][0] is None:
        second.update(kind="img2img", steps=r.hr_steps or r.steps, strength=r.hr_denoise)
    else:
        second.update(steps=second_pass_steps(schedule, r))
    return replace(r, **off), replace(r, **second)
