"""What to render, and the one place that decides whether it can be rendered.

A `Request` is a plain object that every front builds (the CLIs from flags, the browser UI from its
widgets, a cluster worker from a job): one prompt, `n_iter` batches of `n_samples` images, image i
seeded `seed + i`. `complete` fills what the request leaves to the model (sampler, scale, size,
strength; the demo model has its own defaults), reads and sizes the init image and the mask, and
checks every value with `check`. A bad value is a `RequestError` with one line that says what is
wrong and what to do. The rule and its words are the same for every front; only the name of the
field is the front's own (`CLI_LABELS`: `--H`; `UI_LABELS`: `Height`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from PIL import Image

from ..model.config import SDConfig
from ..sampling.ksamplers import KSAMPLERS
from ..sampling.samplers import SAMPLERS, Schedule, make_plan, strength_steps

KINDS = ("txt2img", "img2img", "inpaint")
MEMORY_MODES = ("default", "lowvram", "turbo")  # or a --vram budget such as "2G"
SEED_LIMIT = 2 ** 63
DEMO_SIZE = 64  # what the demo model was trained at
DEMO_SCALE = 3.0  # its guidance scale: at 7.5 the multistep samplers (lms, plms) diverge on it in 20 steps
DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 1.0}

CLI_LABELS = {"prompt": "--prompt", "negative_prompt": "--negative_prompt", "seed": "--seed",
              "n_samples": "--n_samples", "n_iter": "--n_iter", "sampler": "--sampler", "karras": "--karras",
              "steps": "--ddim_steps", "scale": "--scale", "eta": "--ddim_eta", "width": "--W", "height": "--H",
              "strength": "--strength", "unet_bs": "--unet_bs", "memory": "--vram", "init_image": "--init-img",
              "mask": "--mask", "watermark": "--watermark", "prompt_syntax": "--prompt_syntax",
              "clip_skip": "--clip_skip", "pad_conds": "--pad_conds"}
UI_LABELS = {"prompt": "Prompt", "negative_prompt": "Negative prompt", "seed": "Seed", "n_samples": "Batch size",
             "n_iter": "Batch count", "sampler": "Sampler", "karras": "Karras", "steps": "Steps",
             "scale": "CFG scale", "eta": "DDIM eta", "width": "Width", "height": "Height",
             "strength": "Denoising strength", "unet_bs": "UNet batch", "memory": "Memory",
             "init_image": "Image", "mask": "Mask", "watermark": "Watermark", "prompt_syntax": "Prompt syntax",
             "clip_skip": "Clip skip", "pad_conds": "Pad conds"}
# The CompVis reference script's invisible watermark (outputs/watermark.py): its payload and method, and
# the limits of the invisible-watermark library (`check_watermark`).
WATERMARK = "StableDiffusionV1"
WATERMARK_METHOD = "dwtDct"
WATERMARK_MIN_PIXELS = 256 * 256  # imwatermark refuses smaller images ("image too small")

# The hires fix's fields (engine/hires.py), as the CLI and the browser UI name them.
CLI_LABELS.update(hr_scale="--hr_scale", hr_upscaler="--hr_upscaler", hr_steps="--hr_steps",
                  hr_denoise="--hr_denoise", hr_resize_x="--hr_resize_x", hr_resize_y="--hr_resize_y",
                  hires="--hr_scale / --hr_resize_x / --hr_resize_y")
UI_LABELS.update(hr_scale="Upscale by", hr_upscaler="Upscaler", hr_steps="Hires steps",
                 hr_denoise="Hires denoising strength", hr_resize_x="Resize width to", hr_resize_y="Resize height to",
                 hires="Hires. fix")


class RequestError(ValueError):
    """A request that cannot be rendered; the message is one line: what is wrong and what to do."""


@dataclass(frozen=True)
class Request:
    """One prompt, `n_iter` batches of `n_samples` images; image i is seeded `seed + i`.

    None means "the model's default" (`complete`): sampler plms (ddim for the demo model), scale 7.5
    (3), size 512x512 (64x64) for txt2img and the init image's size rounded down to a multiple of 8
    otherwise, strength 0.75 (img2img) or 1.0 (inpaint), a random seed. `init_image` and `mask` are
    PIL images or paths; `complete` opens paths and leaves RGB / binary "L" images of the run's size.
    `memory` is "default", "lowvram", "turbo" or a device-memory budget such as "2G" or "1536M".
    """
    prompt: str
    kind: str = "txt2img"
    negative_prompt: str = ""
    seed: int | None = None
    n_samples: int = 1
    n_iter: int = 1
    sampler: str | None = None
    karras: bool = False
    steps: int = 50
    scale: float | None = None
    eta: float = 0.0
    width: int | None = None
    height: int | None = None
    strength: float | None = None
    init_image: Image.Image | str | Path | None = None
    mask: Image.Image | str | Path | None = None
    long_prompts: bool = False
    fixed_code: bool = False  # every image starts from the first image's noise
    memory: str = "default"
    unet_bs: int | None = None  # None: the device's (`ModelSpec.complete`)
    init_image_name: str | None = None  # for the metadata; `complete` takes it from a path
    mask_name: str | None = None
    loras: tuple[tuple[str, float], ...] = ()  # (LoRA file, weight), besides the prompt's <lora:NAME:WEIGHT> tags
    # hires fix (txt2img, engine/hires.py): on when hr_scale is given or a resize is
    hr_scale: float | None = None  # the second pass's size: the base size times this
    hr_upscaler: str = "latent"  # latent, latent-nearest or lanczos (hires.UPSCALERS)
    hr_steps: int = 0  # the second pass's steps (0: the base's)
    hr_denoise: float = 0.7  # its denoising strength (the webui's "Denoising strength")
    hr_resize_x: int = 0  # or a size to resize to (0: from the other side and the aspect)
    hr_resize_y: int = 0
    watermark: str | None = None  # the invisible watermark's payload (WATERMARK: the reference's); None: none
    prompt_syntax: str = "webui"  # "webui": emphasis, editing, BREAK (docs/prompts.md); "plain": as written
    clip_skip: int = 1  # the text encoder's N-th hidden state from the end (the webui's "Clip skip")
    pad_conds: bool = False  # pad the shorter of prompt and negative with empty chunks (webui "Pad conds")
    controls: tuple = ()  # control.ControlUnit per ControlNet (file, control image, weight, start/end, mode)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n_iter * self.n_samples)]

    @property
    def guided(self) -> bool:
        """Whether the UNet also runs on the negative prompt: scale > 1 (as diffusers; at <= 1 it is skipped)."""
        return self.scale > 1.0

    def sampler_name(self) -> str:
        """The sampler as our metadata and CLI name it, e.g. `euler_a karras`."""
        return self.sampler + (" karras" if self.karras else "")


def with_defaults(r: Request, demo: bool = False) -> Request:
    """`r` with the model's defaults where it says None (the seed stays None: `complete` draws it)."""
    changes = {}
    if r.sampler is None:
        changes["sampler"] = "ddim" if demo else "plms"  # plms, as CompVis
    if r.scale is None:
        changes["scale"] = DEMO_SCALE if demo else 7.5
    if r.unet_bs is None:  # the device's default is set before this (`ModelSpec.complete`); else 1
        changes["unet_bs"] = 1
    if r.kind == "txt2img":
        size = DEMO_SIZE if demo else 512
        changes.update(width=size if r.width is None else r.width, height=size if r.height is None else r.height)
    elif r.strength is None:
        changes["strength"] = DEFAULT_STRENGTH.get(r.kind)
    return replace(r, **changes)


def complete(r: Request, cfg: SDConfig, *, demo: bool = False, labels: dict = CLI_LABELS,
             notify: Callable[[str], None] = lambda message: None, seed: Callable[[], int] | None = None) -> Request:
    """`r` with its defaults filled, its init image and mask read and sized, checked (`check`).

    `notify` hears what was changed on the way (an image resized). `seed` draws a seed when the
    request has none (default: a random 32-bit one)."""
    import random

    r = with_defaults(r, demo)
    if r.seed is None:
        r = replace(r, seed=seed() if seed else random.randrange(2 ** 32))
    if r.kind != "txt2img":
        r = _read_images(r, cfg.downsample_factor, labels, notify)
    check(r, cfg, labels)
    # Whole numbers given for the real-valued fields (a form's 3 for 3.0) are the same request, and are
    # recorded the same way (`scale: 3.0`) whichever front made it.
    return replace(r, scale=float(r.scale), eta=float(r.eta),
                   strength=None if r.strength is None else float(r.strength))


def check(r: Request, cfg: SDConfig, labels: dict = CLI_LABELS) -> None:
    """Raise RequestError with one line for the first thing wrong in a completed request."""
    L = labels
    if r.kind not in KINDS:
        raise RequestError(f"unknown kind {r.kind!r}; choose one of {', '.join(KINDS)}")
    check_prompt(r.prompt, L["prompt"])
    check_prompt(r.negative_prompt, L["negative_prompt"], empty_ok=True)
    check_text_options(r, cfg, L)
    if r.sampler not in SAMPLERS:
        raise RequestError(f"unknown {L['sampler']} {r.sampler!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    for name in ("n_samples", "n_iter", "unet_bs"):
        _integer(getattr(r, name), L[name], 1)
    _integer(r.steps, L["steps"], 1, cfg.timesteps, f"the model's schedule has {cfg.timesteps} steps")
    if r.sampler == "lcm":
        _integer(r.steps, L["steps"], 1, 50, "lcm walks its 50-step distillation schedule; 4-8 are usual")
    _number(r.scale, L["scale"])
    _number(r.eta, L["eta"], low=0.0)
    if r.eta and r.sampler != "ddim":
        raise RequestError(f"{L['eta']} applies to {L['sampler']} ddim only (got {L['sampler']} {r.sampler})")
    if r.karras and r.sampler not in KSAMPLERS:
        raise RequestError(f"{L['karras']} applies to the k-samplers only ({', '.join(KSAMPLERS)}), "
                           f"not {L['sampler']} {r.sampler}")
    if not isinstance(r.seed, int) or not 0 <= r.seed < SEED_LIMIT - len(r.seeds):
        raise RequestError(f"{L['seed']} must be a whole number between 0 and 2^63-1 (less the number of images), "
                           f"got {r.seed}")
    if r.kind != "txt2img" and r.init_image is None:  # before the size, which defaults to the image's
        raise RequestError(f"{r.kind} needs an init image; give {L['init_image']}")
    check_size(r.width, r.height, cfg, L)
    check_memory(r.memory, L["memory"])
    if r.watermark is not None:
        check_watermark(r.watermark, r.width, r.height, L.get("watermark", CLI_LABELS["watermark"]))
    check_hires(r, cfg, L)
    if r.kind == "txt2img":
        return
    _number(r.strength, L["strength"])
    if not 0 < r.strength <= 1:
        raise RequestError(f"{L['strength']} must be in (0, 1] (1 = from pure noise), got {r.strength}")
    steps = make_plan(Schedule(cfg.linear_start, cfg.linear_end, cfg.timesteps), r.sampler, r.steps,
                      karras=r.karras).steps
    if strength_steps(steps, r.strength) == 0:
        raise RequestError(f"{L['strength']} {r.strength} of {steps} steps runs no sampling step; raise "
                           f"{L['strength']} to at least {1 / steps:.3g} or use more {L['steps']}")
    if r.kind == "inpaint" and r.mask is None:
        raise RequestError(f"inpainting needs a mask (white: repaint, black: keep); give {L['mask']}")


def check_hires(r: Request, cfg: SDConfig, labels: dict = CLI_LABELS) -> None:
    """The hires fix's fields (engine/hires.py): only for txt2img, a scale above 0 or a resize, a known
    upscaler, steps and a strength that run at least one step, a target size the model takes."""
    from .hires import UPSCALERS, target_of, wanted

    L = {k: labels.get(k, CLI_LABELS[k]) for k in ("hr_scale", "hr_upscaler", "hr_steps", "hr_denoise",
                                                    "hr_resize_x", "hr_resize_y")}
    defaults = Request("")
    if not wanted(r):
        given = [L[k] for k in ("hr_upscaler", "hr_steps", "hr_denoise") if getattr(r, k) != getattr(defaults, k)]
        if given:
            raise RequestError(f"{', '.join(given)} apply to the hires fix; add {L['hr_scale']} (e.g. 2) or "
                               f"{L['hr_resize_x']}/{L['hr_resize_y']}")
        return
    if r.kind != "txt2img":
        raise RequestError(f"the hires fix ({L['hr_scale']}, {L['hr_resize_x']}, {L['hr_resize_y']}) is for "
                           f"txt2img; for {r.kind} give the larger size itself")
    if r.hr_scale is not None:
        _number(r.hr_scale, L["hr_scale"])
        if r.hr_scale <= 0:
            raise RequestError(f"{L['hr_scale']} must be more than 0 (2 doubles the size), got {r.hr_scale:g}")
    for name in ("hr_resize_x", "hr_resize_y"):
        _integer(getattr(r, name), L[name], 0)
    if r.hr_upscaler not in UPSCALERS:
        raise RequestError(f"unknown {L['hr_upscaler']} {r.hr_upscaler!r}; choose one of {', '.join(UPSCALERS)}")
    _integer(r.hr_steps, L["hr_steps"], 0, 50 if r.sampler == "lcm" else cfg.timesteps, "0: the base steps")
    _number(r.hr_denoise, L["hr_denoise"])
    if not 0 < r.hr_denoise <= 1:
        raise RequestError(f"{L['hr_denoise']} must be in (0, 1] (1 = from pure noise), got {r.hr_denoise}")
    steps = make_plan(Schedule(cfg.linear_start, cfg.linear_end, cfg.timesteps), r.sampler, r.hr_steps or r.steps,
                      karras=r.karras).steps
    if strength_steps(steps, r.hr_denoise) == 0:
        raise RequestError(f"{L['hr_denoise']} {r.hr_denoise} of {steps} steps runs no sampling step; raise it to "
                           f"at least {1 / steps:.3g} or use more {L['hr_steps']}")
    width, height = target_of(r, cfg.downsample_factor).pixels(cfg.downsample_factor)
    if not _big_enough(cfg, height // cfg.downsample_factor, width // cfg.downsample_factor):
        side = smallest_side(cfg)
        raise RequestError(f"the hires fix's size {width}x{height} is too small for this model (at least "
                           f"{side}x{side}); raise {L['hr_scale']} or the resize")


def check_prompt(prompt: str, label: str, empty_ok: bool = False) -> None:
    """A prompt is text; its weighted sub-prompts' weights must not sum to zero or less."""
    from ..sampling.prompts import parse_weighted

    if not isinstance(prompt, str):
        raise RequestError(f"{label} must be text, got {type(prompt).__name__}")
    if not empty_ok:  # a prompt (not a negative one) may name LoRAs: <lora:NAME:WEIGHT>, not drawn
        from ..custom.lora import LoraError, extract_lora_tags

        try:
            prompt = extract_lora_tags(prompt)[0]
        except LoraError as e:
            raise RequestError(f"{label}: {e}") from None
        if not prompt.strip():
            raise RequestError(f"{label} is empty; write what to draw")
    try:
        parse_weighted(prompt)
    except ValueError as e:
        raise RequestError(f"{label}: {e}") from None


def check_text_options(r: Request, cfg: SDConfig, L: dict) -> None:
    """--prompt_syntax, --clip_skip, --pad_conds, and the prompt editing steps of the webui syntax."""
    from .conditioning import SYNTAXES, check_prompt as check_schedule, schedule_steps

    if r.prompt_syntax not in SYNTAXES:
        raise RequestError(f"unknown {L['prompt_syntax']} {r.prompt_syntax!r}; choose one of {', '.join(SYNTAXES)}")
    depth = cfg.text.num_hidden_layers
    _integer(r.clip_skip, L["clip_skip"], 1, depth, f"the text encoder has {depth} layers; 1 uses the last, 2 the one before")
    if r.prompt_syntax == "webui" and r.sampler in SAMPLERS:
        steps = schedule_steps(r.steps, r.sampler) if isinstance(r.steps, int) and r.steps > 0 else 1
        for name in ("prompt", "negative_prompt"):
            try:
                check_schedule(getattr(r, name), steps, L[name])
            except ValueError as e:
                raise RequestError(str(e)) from None


def check_size(width, height, cfg: SDConfig, labels: dict = CLI_LABELS) -> None:
    """Width and height are positive multiples of the VAE's factor, large enough for the model."""
    f = cfg.downsample_factor
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % f:
            v = v if isinstance(v, int) else 0
            lo, hi = max(f, v // f * f), (v // f + 1) * f
            raise RequestError(f"{labels[name]} {v} is not a positive multiple of {f}; try {lo} or {hi}")
    side = smallest_side(cfg)
    if not _big_enough(cfg, height // f, width // f):
        raise RequestError(f"{labels['width']} {width} x {labels['height']} {height} is too small for this model; "
                           f"use at least {side}x{side}")


def given_watermark(text: str | None) -> str | None:
    """The payload a front's watermark text asks for: without the spaces around it; empty: none."""
    return (text or "").strip() or None


def watermark_library() -> str | None:
    """None when the invisible-watermark library (`imwatermark`, with OpenCV and PyWavelets) can be
    imported; else the line that says what to install."""
    import importlib.util

    missing = [name for name in ("imwatermark", "cv2", "pywt") if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"the watermark needs the invisible-watermark library (missing: {', '.join(missing)}): pip install "
            "invisible-watermark (see requirements.txt for the headless OpenCV)")


def watermark_capacity(width: int, height: int) -> int:
    """Payload bits `dwtDct` can hold in a width x height image: one per 4x4 block of the Haar
    approximation (half size) of the image's crop to multiples of 4."""
    return ((height // 4 * 4) // 2 // 4) * ((width // 4 * 4) // 2 // 4)


def check_watermark(payload, width: int, height: int, label: str) -> None:
    """A watermark payload is non-empty text whose bits the run's images can hold, the library installed."""
    if not isinstance(payload, str) or not payload:
        raise RequestError(f"{label} must be a non-empty text (default {WATERMARK}), got {payload!r}")
    if width * height < WATERMARK_MIN_PIXELS:
        raise RequestError(f"{label}: {WATERMARK_METHOD} needs images of at least 65536 pixels (256x256), "
                           f"got {width}x{height}; render larger or drop {label}")
    bits, room = 8 * len(payload.encode("utf-8")), watermark_capacity(width, height)
    if bits > room:
        raise RequestError(f"{label} {payload[:40]!r} is {bits} bits, more than {WATERMARK_METHOD} can hold in a "
                           f"{width}x{height} image ({room} bits); use a shorter payload")
    missing = watermark_library()
    if missing:
        raise RequestError(f"{label}: {missing}")


def check_memory(memory: str, label: str) -> int | None:
    """None for the named modes, the budget in bytes for a size such as "2G"."""
    from .planner import parse_size

    if memory in MEMORY_MODES:
        return None
    try:
        return parse_size(memory)
    except ValueError as e:
        raise RequestError(f"{label}: {e} (or one of {', '.join(MEMORY_MODES)})") from None


@functools.cache
def _min_group_sizes(cfg: SDConfig) -> tuple[int, int]:
    """The fewest channels any GroupNorm of the UNet, and of the VAE, normalises together."""
    import torch

    from ..model.checkpoint import parameters_on_meta
    from ..model.fragments import UNET_IN, UNET_OUT, VAE, build_fragments

    with parameters_on_meta():  # shapes only, no init
        fragments = build_fragments(cfg, (UNET_IN, UNET_OUT, VAE))

    def fewest(*modules):
        return min(m.num_channels // m.num_groups for f in modules for m in f.modules()
                   if isinstance(m, torch.nn.GroupNorm))
    return fewest(fragments[UNET_IN], fragments[UNET_OUT]), fewest(fragments[VAE])


def _big_enough(cfg: SDConfig, h: int, w: int) -> bool:
    """Whether every GroupNorm sees more than one value per group for an h x w latent (torch refuses
    one). Conservative: the fewest channels per group anywhere times the smallest map (the UNet's
    deepest level, after len(channel_mult) - 1 stride-2 halvings; the VAE's latent-sized maps)."""
    unet, vae = _min_group_sizes(cfg)
    halvings = len(cfg.unet.channel_mult) - 1
    deep = math.ceil(h / 2 ** halvings) * math.ceil(w / 2 ** halvings)
    return unet * deep > 1 and vae * h * w > 1


@functools.cache
def smallest_side(cfg: SDConfig) -> int:
    """The smallest square image side (pixels) the model can take."""
    f = cfg.downsample_factor
    return next(f * n for n in range(1, 1 << 12) if _big_enough(cfg, n, n))


def _integer(v, label: str, low: int, high: int | None = None, why: str = "") -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise RequestError(f"{label} must be a whole number, got {v!r}")
    if v < low:
        raise RequestError(f"{label} must be at least {low}, got {v}")
    if high is not None and v > high:
        raise RequestError(f"{label} must be at most {high} ({why}), got {v}")


def _number(v, label: str, low: float | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RequestError(f"{label} must be a finite number, got {v}")
    if low is not None and v < low:
        raise RequestError(f"{label} must be {low:g} or more, got {v}")


def _read_images(r: Request, f: int, labels: dict, notify) -> Request:
    """img2img/inpaint: the init image as RGB and the mask as binary "L", both at the run's size;
    the size defaults to the image's, rounded down to a multiple of `f`."""
    from .inputs import InputError, check_pixels, default_size, load_mask, open_image, resized, to_rgb

    if r.init_image is None:
        return r
    names = {}
    for field, name in (("init_image", "init_image_name"), ("mask", "mask_name")):
        if isinstance(getattr(r, field), (str, Path)) and getattr(r, name) is None:
            names[name] = Path(getattr(r, field)).name
    r = replace(r, **names)
    try:
        image = r.init_image
        if isinstance(image, Image.Image):  # decoded by a front (the UI, the API): still held to the limit
            check_pixels(image.size, "init image")
        image = to_rgb(open_image(image, "init image") if not isinstance(image, Image.Image) else image)
        w, h = default_size(image, f)
        width, height = (w if r.width is None else r.width), (h if r.height is None else r.height)
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0
                and width % f == 0 and height % f == 0):
            return replace(r, init_image=image, width=width, height=height)  # check() names the bad size
        if (width, height) != image.size:
            notify(f"note: init image {image.size[0]}x{image.size[1]} resized to {width}x{height} (Lanczos)")
            image = resized(image, (width, height))
        mask = r.mask
        if r.kind == "inpaint" and mask is not None:
            mask, was_resized = load_mask(mask, image.size)
            if was_resized:
                notify(f"note: mask resized to the image's {image.size[0]}x{image.size[1]}")
    except InputError as e:
        raise RequestError(str(e)) from None
    return replace(r, init_image=image, mask=mask, width=width, height=height)
