"""Command-line front end shared by the optimized_* scripts: flags, validation, the run loop.

Every user error ends as one line `error: ...` on stderr and exit status 2 (1 for running out of
memory), and is found before anything is written.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

from .config import SDConfig, ConfigError
from .samplers import SAMPLERS, make_plan
from .ksamplers import KSAMPLERS

ROOT = Path(__file__).resolve().parent.parent  # the repo, or the CompVis checkout we were dropped into
COMPVIS_CKPT = Path("models/ldm/stable-diffusion-v1/model.ckpt")
DEMO_CKPT, DEMO_CONFIG = Path("weights/demo.safetensors"), Path("configs/demo.yaml")  # under ROOT; train_demo.py
DEMO_SIZE = 64  # what the demo model was trained at
DEMO_SCALE = 3.0  # its guidance scale: at 7.5 the multistep samplers (lms, plms) diverge on it in 20 steps
CKPT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")


class UsageError(Exception):
    """A bad flag value, file or environment: reported as one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, like every other error of the tool."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


# What each script makes: its name, description, output folder and default --strength.
KINDS = {
    "txt2img": ("optimized_txt2img.py", "Text to image with Stable Diffusion v1 in four fragments, on little VRAM.",
                "outputs/txt2img-samples", None),
    "img2img": ("optimized_img2img.py", "Image to image (SDEdit) with Stable Diffusion v1 in four fragments, "
                "on little VRAM.", "outputs/img2img-samples", 0.75),
    "inpaint": ("optimized_inpaint.py", "Inpainting with Stable Diffusion v1 (plain or 9-channel inpainting "
                "checkpoints) in four fragments, on little VRAM.", "outputs/inpaint-samples", 1.0),
}


def build_parser(kind: str = "txt2img") -> argparse.ArgumentParser:
    from .pipeline import PRECISIONS

    prog, description, outdir, strength = KINDS[kind]
    p = Parser(prog=prog, description=description)
    p.set_defaults(kind=kind)
    a = p.add_argument
    if kind != "txt2img":
        a("--init-img", dest="init_img", type=str, required=True,
          help="the image to start from (png, jpg, webp, ...); transparency is composited on white")
    if kind == "inpaint":
        a("--mask", type=str, required=True,
          help="what to repaint: white (gray >= 128) is repainted, black kept; any image mode, resized to the image")
    if kind != "txt2img":
        a("--strength", type=float, default=strength,
          help="in (0, 1]: how much of the sampling runs, i.e. how far from the image the result may go "
               f"(1 = from pure noise; default {strength})")
    a("--prompt", type=str, default="a painting of a virus monster playing guitar",
      help="what to draw; weighted sub-prompts allowed: 'a tabby cat:0.25 a white duck:0.75'")
    a("--negative_prompt", type=str, default="", help="what to steer away from (weights allowed too)")
    a("--long_prompts", action="store_true",
      help="encode prompts longer than 75 tokens whole, in 75-token chunks encoded separately and concatenated "
           "(as AUTOMATIC1111's webui); default: cut at 75 tokens with a warning, as the reference pipeline")
    a("--from-file", dest="from_file", type=str, default=None,
      help="read prompts from this file, one per line (blank lines skipped); overrides --prompt")
    a("--outdir", type=str, default=outdir,
      help="images go to OUTDIR/<prompt>/seed_<seed>_<NNNNN>.<format>; existing files are never overwritten")
    a("--skip_grid", action="store_true", help="do not save a grid of each prompt's images")
    a("--skip_save", action="store_true", help="do not save the individual images (only the grid)")
    a("--format", type=str, default="png", choices=["png", "jpg"], help="image file format")
    a("--sampler", type=str, default=None, choices=sorted(SAMPLERS),
      help="sampling method: ddim, plms (CompVis) or a k-diffusion sampler: " + ", ".join(KSAMPLERS)
           + " (default: plms; ddim with --demo)")
    a("--karras", action="store_true", help="Karras et al. 2022 sigma schedule (k-samplers only)")
    a("--plms", action="store_true", help="same as --sampler plms")
    a("--ddim_steps", type=int, default=50, help="number of sampling steps")
    a("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic); ddim only")
    a("--scale", type=float, default=None,
      help=f"classifier-free guidance scale (1 = no guidance; default: 7.5, or {DEMO_SCALE:g} with --demo)")
    a("--n_samples", type=int, default=5, help="images generated at once (one batch)")
    a("--n_iter", type=int, default=1, help="batches per prompt")
    a("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    size_help = (" (default: 512, or 64 with --demo)" if kind == "txt2img" else
                 " (default: the init image's, rounded down to a multiple of 8)")
    a("--H", type=int, default=None, help="image height in pixels, a multiple of 8" + size_help)
    a("--W", type=int, default=None, help="image width in pixels, a multiple of 8" + size_help)
    a("--C", type=int, default=4, help="latent channels (must match the model: 4 for SD v1)")
    a("--f", type=int, default=8, help="downsampling factor (must match the model: 8 for SD v1)")
    a("--seed", type=int, default=None, help="seed of the first image; image i uses seed+i (default: random)")
    a("--fixed_code", action="store_true", help="every image starts from the first image's noise")
    a("--unet_bs", type=int, default=None,
      help="latents passed through each UNet half at once (default: 1; on the CPU 2, an image's guided pair)")
    a("--turbo", action="store_true", help="keep both UNet halves on the device while sampling (faster, more VRAM)")
    a("--lowvram", action="store_true",
      help="stream the UNet block by block and encode/decode in VAE tiles: the lowest device memory (slower)")
    a("--vram", type=str, default=None, metavar="SIZE",
      help="device memory budget, e.g. 2G or 1536M: keeps as much of the UNet on the device as fits, streams "
           "the rest block by block, and picks --unet_bs, images at once and tiled VAE encoding/decoding to fit")
    a("--json", action="store_true", help="print the run's figures (memory per phase, timings) as one JSON object")
    a("--precision", type=str, default="autocast", choices=PRECISIONS,
      help="autocast: fp16 weights and autocast on CUDA (the CPU and MPS run fp32, exactly); full: fp32; "
           "bf16 (CPU only): bf16 weights and CPU autocast, faster where the CPU has AMX/AVX512-BF16, not exact")
    a("--device", type=str, default=None,
      help="cuda, cuda:N, mps or cpu (default: cuda if available, else mps, else cpu); meta: plan a CUDA run "
           "shape-only (no checkpoint read, no image written) and print its peak device memory per phase")
    a("--ckpt", type=str, default=None,
      help=f"checkpoint (.ckpt or .safetensors); default: {COMPVIS_CKPT} if present, else the one file in weights/")
    a("--config", type=str, default=None,
      help="CompVis-style model YAML (e.g. configs/v1-inference.yaml); default: SD v1's built-in config")
    a("--ema", action="store_true", help="use the EMA weights of a full (non-pruned) checkpoint")
    a("--demo", action="store_true",
      help=f"use the bundled demo model ({DEMO_CKPT}, {DEMO_CONFIG}): a tiny model trained on coloured shapes, "
           "e.g. 'a red circle on a blue background, top left'; draws 64x64 images in seconds on a CPU")
    return p


# ---- validation: everything that can be checked before a model is loaded ----------------------
def read_prompts(args) -> list[str]:
    """The prompts to render (--prompt, or each non-blank line of --from-file, stripped), with
    their sub-prompt weights and those of --negative_prompt checked."""
    check_weights(args.negative_prompt, "--negative_prompt")
    if args.from_file is None:
        if not args.prompt.strip():
            raise UsageError("--prompt is empty; give a prompt or --from-file")
        check_weights(args.prompt, "--prompt")
        return [args.prompt]
    try:
        lines = Path(args.from_file).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"prompt file not found: {args.from_file}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompt file {args.from_file}: {e}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            check_weights(line.strip(), f"{args.from_file} line {number}")
            prompts.append(line.strip())
    if not prompts:
        raise UsageError(f"prompt file {args.from_file} has no prompts; write one prompt per line")
    return prompts


def check_weights(prompt: str, where: str) -> None:
    """Weighted sub-prompts whose weights sum to zero or less are a usage error, found up front."""
    from .prompts import parse_weighted

    try:
        parse_weighted(prompt)
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None


def find_checkpoint(arg: str | None) -> Path:
    if arg:
        path = Path(arg)
        if not path.is_file():
            raise UsageError(f"checkpoint not found: {arg}; check the --ckpt path")
        return path
    for base in dict.fromkeys([Path.cwd(), ROOT]):
        if (base / COMPVIS_CKPT).is_file():
            return base / COMPVIS_CKPT
    for base in dict.fromkeys([Path.cwd(), ROOT]):
        found = sorted(p for p in (base / "weights").glob("*")
                       if p.suffix in CKPT_SUFFIXES and p.is_file() and p.name != DEMO_CKPT.name)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise UsageError(f"several checkpoints in {base / 'weights'} ({names}); pick one with --ckpt")
    raise UsageError(f"no checkpoint found: put sd-v1-4.ckpt (or a .safetensors file) in weights/ "
                     f"or at {COMPVIS_CKPT}, or pass --ckpt PATH (or --demo for the bundled demo model)")


def check_outdir(outdir: str) -> None:
    """Fail early, without creating anything, if OUTDIR cannot be created or written."""
    path = Path(outdir).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot create output directory {outdir}: {probe} is a file; choose another --outdir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {probe} is not writable; choose another --outdir")


def read_inputs(args, f: int, log) -> dict:
    """img2img/inpaint: the init image (and mask) at the run's size, read and checked up front;
    --H/--W default to the image's size rounded down to a multiple of 8. {} for txt2img."""
    if args.kind == "txt2img":
        return {}
    from .inputs import InputError, default_size, load_mask, open_image, resized, to_rgb

    if not 0 < args.strength <= 1:
        raise UsageError(f"--strength must be in (0, 1] (1 = from pure noise), got {args.strength}")
    try:
        image = to_rgb(open_image(args.init_img, "init image"))
        w, h = default_size(image, f)
        args.W, args.H = (w if args.W is None else args.W), (h if args.H is None else args.H)
        check_size(args, f)
        if (args.W, args.H) != image.size:
            log(f"note: init image {image.size[0]}x{image.size[1]} resized to {args.W}x{args.H} (Lanczos)")
            image = resized(image, (args.W, args.H))
        inputs = {"image": image}
        if args.kind == "inpaint":
            inputs["mask"], was_resized = load_mask(args.mask, image.size)
            if was_resized:
                log(f"note: mask resized to the image's {image.size[0]}x{image.size[1]}")
    except InputError as e:
        raise UsageError(str(e)) from None
    return inputs


def check_size(args, f: int) -> None:
    """--H and --W (None: not known yet, taken from the init image later) are positive multiples of f."""
    for name in ("H", "W"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % f):
            lo, hi = max(f, v // f * f), (v // f + 1) * f
            raise UsageError(f"--{name} {v} is not a positive multiple of {f}; try {lo} or {hi}")


def validate(args, cfg: SDConfig) -> None:
    if args.plms:
        args.sampler = "plms"
    f = cfg.downsample_factor
    if args.f != f:
        raise UsageError(f"--f {args.f} does not match the model's downsampling factor {f}")
    if args.C != cfg.channels:
        raise UsageError(f"--C {args.C} does not match the model's {cfg.channels} latent channels")
    check_size(args, f)
    for name in ("ddim_steps", "n_samples", "n_iter", "unet_bs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.n_rows < 0:
        raise UsageError(f"--n_rows must be 0 (automatic) or more, got {args.n_rows}")
    if args.ddim_eta < 0:
        raise UsageError(f"--ddim_eta must be 0 or more, got {args.ddim_eta}")
    if args.ddim_eta and args.sampler != "ddim":
        raise UsageError(f"--ddim_eta applies to --sampler ddim only (got --sampler {args.sampler})")
    if args.karras and args.sampler not in KSAMPLERS:
        raise UsageError(f"--karras applies to the k-samplers only ({', '.join(KSAMPLERS)}), "
                         f"not --sampler {args.sampler}")
    modes = [flag for flag, on in (("--turbo", args.turbo), ("--lowvram", args.lowvram), ("--vram", args.vram)) if on]
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} exclude each other; pick one")
    if args.vram is not None:
        from .planner import parse_size

        try:
            args.vram_bytes = parse_size(args.vram)
        except ValueError as e:
            raise UsageError(f"--vram: {e}") from None
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise UsageError(f"--seed must be between 0 and 2^63-1, got {args.seed}")


def resolve_device(name: str | None) -> torch.device:
    from .pipeline import pick_device

    try:
        device = pick_device(name)
    except RuntimeError as e:
        raise UsageError(f"unknown --device {name!r} ({e}); use cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    if device.type not in ("cuda", "mps", "cpu", "meta"):
        raise UsageError(f"unsupported --device {name}; use cuda, cuda:N, mps, cpu or meta")
    return device


def check_bf16(device: torch.device, log) -> None:
    """--precision bf16: the CPU only; say so when this CPU has no bf16 hardware (torch emulates it)."""
    from .pipeline import BF16_DEVICES, native_bf16

    if device.type not in BF16_DEVICES:
        raise UsageError(f"--precision bf16 runs on the CPU only, not on --device {device}; "
                         f"use --precision autocast (fp16) or full there")
    if not native_bf16():
        log("note: this CPU has neither AVX512-BF16 nor AMX: bf16 is emulated and may be slower than --precision full")


def load_config(path: str | None) -> SDConfig:
    return SDConfig.from_yaml(path) if path else SDConfig()


# ---- the run --------------------------------------------------------------------------------
def run(args) -> int:
    figures = generate(args)
    if args.json:
        import json

        print(json.dumps(figures), flush=True)
    return 0


def generate(args) -> dict:
    """The whole run of parsed `args` (txt2img, img2img or inpaint: `args.kind`); returns its figures
    (time, memory per phase)."""
    from contextlib import nullcontext

    from tqdm import tqdm

    from .attention import auto_policy, using_policy
    from .checkpoint import empty_fragments, load_fragments
    from .fragments import FRAGMENTS
    from .images import ImageWriter, ensure_writable, file_hash, to_pil
    from .inputs import image_tensor, mask_tensor, paste_back
    from .memory import MetaMeter, meter_for
    from .offload import Offloader, unet_units
    from .pipeline import Pipeline, SampleSettings, default_unet_bs, weight_dtype
    from .planner import PlanError, choose_plan, describe
    from .samplers import strength_steps
    from .tokenizer import VocabNotFoundError, get_tokenizer

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    kind = args.kind
    use_demo(args)
    cfg = load_config(args.config)
    validate(args, cfg)
    prompts = read_prompts(args)
    inputs = read_inputs(args, cfg.downsample_factor, log)
    device = resolve_device(args.device)
    planning = device.type == "meta"  # shape-only: a CUDA run planned, nothing read or written
    ckpt = None if planning else find_checkpoint(args.ckpt)
    if kind == "inpaint" and ckpt is not None:
        cfg = inpainting_config(cfg, ckpt)
    if not planning:
        check_outdir(args.outdir)
    try:
        get_tokenizer()  # a missing CLIP vocabulary is an install problem, found before any output
    except VocabNotFoundError as e:
        raise UsageError(str(e)) from None
    settings = SampleSettings(sampler=args.sampler, steps=args.ddim_steps, scale=args.scale, eta=args.ddim_eta,
                              karras=args.karras)
    steps = make_plan(Pipeline.schedule_of(cfg), settings.sampler, settings.steps, karras=settings.karras).steps
    if kind != "txt2img":
        walked = strength_steps(steps, args.strength)
        if walked == 0:
            raise UsageError(f"--strength {args.strength} of {steps} steps runs no sampling step; raise --strength "
                             f"to at least {1 / steps:.3g} or use more --ddim_steps")
        steps = walked
    seed = args.seed if args.seed is not None else random.randrange(2 ** 32)
    if args.precision == "bf16":
        check_bf16(device, log)
    dtype = weight_dtype(device, args.precision)
    unet_bs = args.unet_bs or default_unet_bs(device)
    try:
        plan = choose_plan(cfg, dtype, turbo=args.turbo, lowvram=args.lowvram, vram=getattr(args, "vram_bytes", None),
                           unet_bs=unet_bs, height=args.H, width=args.W, n_samples=args.n_samples,
                           guided=args.scale != 1.0, encode=kind != "txt2img")
    except PlanError as e:
        raise UsageError(str(e)) from None
    log(f"device: {device}; seed: {seed}; checkpoint: {ckpt or 'none (planning)'}")

    if planning:
        fragments = empty_fragments(cfg, FRAGMENTS, dtype)
    else:
        fragments = load_fragments(ckpt, cfg, names=FRAGMENTS, dtype=dtype, ema=args.ema)
    log(describe(plan, len(unet_units(fragments))))
    if not planning:
        ensure_writable(args.outdir)
        meta = dict(negative_prompt=args.negative_prompt, steps=args.ddim_steps,
                    sampler=args.sampler + (" karras" if args.karras else ""),
                    scale=args.scale, checkpoint=ckpt.name, checkpoint_hash=file_hash(ckpt))
        if args.long_prompts:
            meta.update(long_prompts=True)
        if kind != "txt2img":
            meta.update(init_image=Path(args.init_img).name, strength=args.strength)
        if kind == "inpaint":
            meta.update(mask=Path(args.mask).name)
    f = cfg.downsample_factor
    fixed = None
    if args.fixed_code:
        fixed = torch.randn((1, cfg.channels, args.H // f, args.W // f), generator=torch.Generator("cpu").manual_seed(seed))
    image = image_tensor(inputs["image"]) if inputs else None
    mask = mask_tensor(inputs["mask"]) if kind == "inpaint" else None

    def latents_of(pipe, prompt, chunk, callback):
        if kind == "txt2img":
            return pipe.txt2img_latents(prompt, args.negative_prompt, chunk, args.H, args.W, settings,
                                        fixed_noise=fixed, callback=callback)
        if kind == "img2img":
            return pipe.img2img_latents(prompt, args.negative_prompt, chunk, image, settings, args.strength,
                                        fixed_noise=fixed, callback=callback)
        return pipe.inpaint_latents(prompt, args.negative_prompt, chunk, image, mask, settings, args.strength,
                                    fixed_noise=fixed, callback=callback)

    meter = MetaMeter() if planning else meter_for(device)
    start, written, index, dirs, sampled_steps, sample_seconds = time.perf_counter(), 0, 0, [], 0, 0.0
    policy = auto_policy("cuda" if planning else device)  # meta plans the CUDA run's kernels
    with using_policy(policy), meter if planning else nullcontext():
        engine = Offloader(fragments, device, plan.mode, plan.resident, meter=meter)
        pipe = Pipeline(cfg, engine, dtype=dtype, unet_bs=plan.unet_bs, tile=plan.tile)
        pipe.long_prompts = args.long_prompts
        batch_size = plan.batch or args.n_samples
        for prompt in prompts:
            writer = None if planning else ImageWriter(args.outdir, prompt, fmt=args.format, metadata=meta)
            images = []
            for _ in range(args.n_iter):
                seeds = [seed + index + j for j in range(args.n_samples)]
                index += args.n_samples
                done = 0
                while done < len(seeds):
                    chunk = seeds[done:done + batch_size]
                    try:
                        with tqdm(total=steps, desc=f"sampling seeds {chunk[0]}-{chunk[-1]}", leave=False,
                                  disable=planning) as bar:
                            t0 = time.perf_counter()
                            latents = latents_of(pipe, prompt, chunk, lambda _: bar.update(1))
                            sample_seconds += time.perf_counter() - t0
                    except torch.cuda.OutOfMemoryError:
                        if engine.failed_phase == "encode" and not pipe.tile:
                            _tile_vae(pipe, "out of GPU memory while encoding the init image; retrying with tiled VAE")
                        else:
                            batch_size = _smaller(pipe, batch_size, len(chunk))
                        continue
                    sampled_steps += steps
                    x = _decode_retrying(pipe, latents)
                    done += len(chunk)
                    if planning:
                        continue
                    batch = to_pil(x)
                    if kind == "inpaint":  # the unmasked pixels are the init image's, exactly
                        batch = [paste_back(im, inputs["image"], inputs["mask"]) for im in batch]
                    images += batch
                    if not args.skip_save:
                        for s, im in zip(chunk, batch):
                            writer.save(im, s)
                            written += 1
            if writer and not args.skip_grid:
                writer.save_grid(images, args.n_rows or args.n_samples)
            if writer:
                dirs.append(str(writer.dir))
    seconds = time.perf_counter() - start
    total = len(prompts) * args.n_iter * args.n_samples
    figures = dict(device=str(device), width=args.W, height=args.H, images=total, seconds=round(seconds, 3),
                   seconds_per_image=round(seconds / total, 3),
                   seconds_per_step=round(sample_seconds / max(1, sampled_steps), 4), mode=plan.mode,
                   resident_blocks=len(plan.resident), unet_bs=pipe.unet_bs, images_at_once=batch_size,
                   tiled_vae=pipe.tile, peak_bytes={k: v for k, v in engine.peaks.items()},
                   host_to_device_bytes_per_step=engine.phase_bytes.get("sample", 0) // max(1, sampled_steps),
                   fp16_decodes_redone_in_fp32=pipe.redone_in_fp32)
    if pipe.redone_in_fp32:
        warn(f"note: {pipe.redone_in_fp32} fp16 decode(s) overflowed and were redone in fp32")
    log(_memory_line(figures, planning))
    if not planning:
        where = dirs[0] if len(set(dirs)) == 1 else f"{len(set(dirs))} folders under {args.outdir}"
        log(f"wrote {written} images{'' if args.skip_grid else ' and ' + str(len(prompts)) + ' grid(s)'} to {where} "
            f"in {seconds:.1f} s ({seconds / total:.2f} s/image)")
    return figures


def use_demo(args) -> None:
    """--demo: the bundled demo model and its config (unless --ckpt/--config say otherwise), its
    64x64 size for txt2img, the ddim sampler and guidance scale 3; without it 512x512, plms and 7.5,
    unless flags say otherwise."""
    if args.demo:
        for flag, path in (("ckpt", DEMO_CKPT), ("config", DEMO_CONFIG)):
            if getattr(args, flag) is None:
                if not (ROOT / path).is_file():
                    raise UsageError(f"the demo model's {path} is missing from {ROOT}; "
                                     f"run python optimizedSD/train_demo.py to make it")
                setattr(args, flag, str(ROOT / path))
    if args.sampler is None:  # plms, as CompVis
        args.sampler = "ddim" if args.demo else "plms"
    if args.scale is None:
        args.scale = DEMO_SCALE if args.demo else 7.5
    if args.kind == "txt2img":
        size = DEMO_SIZE if args.demo else 512
        args.H, args.W = (size if args.H is None else args.H), (size if args.W is None else args.W)


def inpainting_config(cfg: SDConfig, ckpt: Path) -> SDConfig:
    """`cfg` with a 9-channel UNet when `ckpt` is an inpainting checkpoint (sd-v1-5-inpainting)."""
    from dataclasses import replace

    from .checkpoint import checkpoint_shapes, detect_family

    if detect_family(checkpoint_shapes(ckpt)) == "sd-v1-inpainting":
        return replace(cfg, unet=replace(cfg.unet, in_channels=2 * cfg.channels + 1))
    return cfg


def _memory_line(figures: dict, planning: bool) -> str:
    from .planner import gib

    peaks = figures["peak_bytes"]
    if not peaks:
        return f"peak device memory: not measured on {figures['device']}"
    phases = ", ".join(f"{k} {gib(v)}" for k, v in peaks.items())
    moved = gib(figures["host_to_device_bytes_per_step"])
    return f"{'planned ' if planning else ''}peak device memory: {phases}; host->device per sampling step {moved}"


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _smaller(pipe, batch_size: int, chunk: int) -> int:
    """After running out of GPU memory while sampling: halve --unet_bs, else the images at once."""
    torch.cuda.empty_cache()
    if pipe.unet_bs > 1:
        pipe.unet_bs //= 2
        warn(f"out of GPU memory while sampling; retrying with --unet_bs {pipe.unet_bs}")
        return batch_size
    if chunk > 1:
        warn(f"out of GPU memory while sampling; retrying {chunk // 2} image(s) at once")
        return chunk // 2
    raise torch.cuda.OutOfMemoryError("out of memory at --unet_bs 1 with one image at once")


def _decode_retrying(pipe, latents):
    """Decode; on running out of GPU memory, switch to tiled decoding once and retry."""
    try:
        return pipe.decode(latents)
    except torch.cuda.OutOfMemoryError:
        if pipe.tile:
            raise
        _tile_vae(pipe, "out of GPU memory while decoding; retrying with tiled VAE decode")
        return pipe.decode(latents)


def _tile_vae(pipe, message: str) -> None:
    """After running out of GPU memory in the VAE: free the cache, encode/decode in tiles from now on, say so."""
    torch.cuda.empty_cache()
    pipe.tile = True
    warn(message)


def main(argv=None, kind: str = "txt2img") -> int:
    args = build_parser(kind).parse_args(argv)
    from .checkpoint import CheckpointError
    from .images import OutputError

    try:
        return run(args)
    except (UsageError, ConfigError, CheckpointError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print(f"error: out of GPU memory at {args.W}x{args.H}, even with --unet_bs 1 and one image at once; "
              "try --lowvram, a smaller --vram or a smaller size", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
