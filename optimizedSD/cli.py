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

ROOT = Path(__file__).resolve().parent.parent  # the repo, or the CompVis checkout we were dropped into
COMPVIS_CKPT = Path("models/ldm/stable-diffusion-v1/model.ckpt")
CKPT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")


class UsageError(Exception):
    """A bad flag value, file or environment: reported as one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, like every other error of the tool."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=description)
    a = p.add_argument
    a("--prompt", type=str, default="a painting of a virus monster playing guitar",
      help="what to draw; weighted sub-prompts allowed: 'a tabby cat:0.25 a white duck:0.75'")
    a("--negative_prompt", type=str, default="", help="what to steer away from (weights allowed too)")
    a("--from-file", dest="from_file", type=str, default=None,
      help="read prompts from this file, one per line (blank lines skipped); overrides --prompt")
    a("--outdir", type=str, default="outputs/txt2img-samples",
      help="images go to OUTDIR/<prompt>/seed_<seed>_<NNNNN>.<format>; existing files are never overwritten")
    a("--skip_grid", action="store_true", help="do not save a grid of each prompt's images")
    a("--skip_save", action="store_true", help="do not save the individual images (only the grid)")
    a("--format", type=str, default="png", choices=["png", "jpg"], help="image file format")
    a("--sampler", type=str, default="plms", choices=sorted(SAMPLERS), help="sampling method")
    a("--plms", action="store_true", help="same as --sampler plms")
    a("--ddim_steps", type=int, default=50, help="number of sampling steps")
    a("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic); ddim only")
    a("--scale", type=float, default=7.5, help="classifier-free guidance scale (1 = no guidance)")
    a("--n_samples", type=int, default=5, help="images generated at once (one batch)")
    a("--n_iter", type=int, default=1, help="batches per prompt")
    a("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    a("--H", type=int, default=512, help="image height in pixels, a multiple of 8")
    a("--W", type=int, default=512, help="image width in pixels, a multiple of 8")
    a("--C", type=int, default=4, help="latent channels (must match the model: 4 for SD v1)")
    a("--f", type=int, default=8, help="downsampling factor (must match the model: 8 for SD v1)")
    a("--seed", type=int, default=None, help="seed of the first image; image i uses seed+i (default: random)")
    a("--fixed_code", action="store_true", help="every image starts from the first image's noise")
    a("--unet_bs", type=int, default=1, help="latents passed through each UNet half at once")
    a("--turbo", action="store_true", help="keep both UNet halves on the device while sampling (faster, more VRAM)")
    a("--precision", type=str, default="autocast", choices=["autocast", "full"],
      help="autocast: fp16 weights and autocast on CUDA; full: fp32 (CPU always runs fp32)")
    a("--device", type=str, default=None,
      help="cuda, cuda:N, mps or cpu (default: cuda if available, else mps, else cpu)")
    a("--ckpt", type=str, default=None,
      help=f"checkpoint (.ckpt or .safetensors); default: {COMPVIS_CKPT} if present, else the one file in weights/")
    a("--config", type=str, default=None,
      help="CompVis-style model YAML (e.g. configs/v1-inference.yaml); default: SD v1's built-in config")
    a("--ema", action="store_true", help="use the EMA weights of a full (non-pruned) checkpoint")
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
        found = sorted(p for p in (base / "weights").glob("*") if p.suffix in CKPT_SUFFIXES and p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise UsageError(f"several checkpoints in {base / 'weights'} ({names}); pick one with --ckpt")
    raise UsageError(f"no checkpoint found: put sd-v1-4.ckpt (or a .safetensors file) in weights/ "
                     f"or at {COMPVIS_CKPT}, or pass --ckpt PATH")


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


def validate(args, cfg: SDConfig) -> None:
    if args.plms:
        args.sampler = "plms"
    f = cfg.downsample_factor
    if args.f != f:
        raise UsageError(f"--f {args.f} does not match the model's downsampling factor {f}")
    if args.C != cfg.channels:
        raise UsageError(f"--C {args.C} does not match the model's {cfg.channels} latent channels")
    for name in ("H", "W"):
        v = getattr(args, name)
        if v <= 0 or v % f:
            lo, hi = max(f, v // f * f), (v // f + 1) * f
            raise UsageError(f"--{name} {v} is not a positive multiple of {f}; try {lo} or {hi}")
    for name in ("ddim_steps", "n_samples", "n_iter", "unet_bs"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.n_rows < 0:
        raise UsageError(f"--n_rows must be 0 (automatic) or more, got {args.n_rows}")
    if args.ddim_eta < 0:
        raise UsageError(f"--ddim_eta must be 0 or more, got {args.ddim_eta}")
    if args.ddim_eta and args.sampler != "ddim":
        raise UsageError(f"--ddim_eta applies to --sampler ddim only (got --sampler {args.sampler})")
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
    if device.type not in ("cuda", "mps", "cpu"):
        raise UsageError(f"unsupported --device {name}; use cuda, cuda:N, mps or cpu")
    return device


def load_config(path: str | None) -> SDConfig:
    return SDConfig.from_yaml(path) if path else SDConfig()


# ---- the run --------------------------------------------------------------------------------
def run_txt2img(args) -> int:
    from tqdm import tqdm

    from .checkpoint import load_fragments
    from .fragments import TEXT_ENCODER, UNET_IN, UNET_OUT, VAE
    from .images import ImageWriter, ensure_writable, file_hash, to_pil
    from .offload import Offloader
    from .pipeline import Pipeline, SampleSettings, weight_dtype
    from .tokenizer import VocabNotFoundError, get_tokenizer

    cfg = load_config(args.config)
    validate(args, cfg)
    prompts = read_prompts(args)
    ckpt = find_checkpoint(args.ckpt)
    device = resolve_device(args.device)
    check_outdir(args.outdir)
    try:
        get_tokenizer()  # a missing CLIP vocabulary is an install problem, found before any output
    except VocabNotFoundError as e:
        raise UsageError(str(e)) from None
    seed = args.seed if args.seed is not None else random.randrange(2 ** 32)
    print(f"device: {device}; seed: {seed}; checkpoint: {ckpt}", flush=True)

    dtype = weight_dtype(device, args.precision)
    fragments = load_fragments(ckpt, cfg, names=(TEXT_ENCODER, UNET_IN, UNET_OUT, VAE), dtype=dtype, ema=args.ema)
    engine = Offloader(fragments, device, mode="turbo" if args.turbo else "default")
    pipe = Pipeline(cfg, engine, dtype=dtype, unet_bs=args.unet_bs)
    settings = SampleSettings(sampler=args.sampler, steps=args.ddim_steps, scale=args.scale, eta=args.ddim_eta)
    ensure_writable(args.outdir)
    meta = dict(negative_prompt=args.negative_prompt, sampler=args.sampler, steps=args.ddim_steps,
                scale=args.scale, checkpoint=ckpt.name, checkpoint_hash=file_hash(ckpt))

    start, written, index, dirs = time.perf_counter(), 0, 0, []
    fixed = None
    f = cfg.downsample_factor
    if args.fixed_code:
        fixed = torch.randn((1, cfg.channels, args.H // f, args.W // f), generator=torch.Generator("cpu").manual_seed(seed))
    for prompt in prompts:
        writer = ImageWriter(args.outdir, prompt, fmt=args.format, metadata=meta)
        images = []
        for _ in range(args.n_iter):
            seeds = [seed + index + j for j in range(args.n_samples)]
            index += args.n_samples
            steps = make_plan(pipe.schedule, settings.sampler, settings.steps).steps
            with tqdm(total=steps, desc=f"sampling seeds {seeds[0]}-{seeds[-1]}", leave=False) as bar:
                x = pipe.txt2img(prompt, args.negative_prompt, seeds, args.H, args.W, settings,
                                 fixed_noise=fixed, callback=lambda _: bar.update(1))
            batch = to_pil(x)
            images += batch
            if not args.skip_save:
                for s, im in zip(seeds, batch):
                    writer.save(im, s)
                    written += 1
        if not args.skip_grid:
            writer.save_grid(images, args.n_rows or args.n_samples)
        dirs.append(str(writer.dir))
    seconds = time.perf_counter() - start
    total = len(prompts) * args.n_iter * args.n_samples
    where = dirs[0] if len(set(dirs)) == 1 else f"{len(set(dirs))} folders under {args.outdir}"
    print(f"wrote {written} images{'' if args.skip_grid else ' and ' + str(len(prompts)) + ' grid(s)'} to {where} "
          f"in {seconds:.1f} s ({seconds / total:.2f} s/image)")
    return 0


def main(run, argv=None, prog: str = "optimized_txt2img.py",
         description: str = "Text to image with Stable Diffusion v1 in four fragments, on little VRAM.") -> int:
    args = build_parser(prog, description).parse_args(argv)
    from .checkpoint import CheckpointError
    from .images import OutputError

    try:
        return run(args)
    except (UsageError, ConfigError, CheckpointError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print(f"error: out of GPU memory at {args.W}x{args.H} with --n_samples {args.n_samples}; "
              "try --n_samples 1, --unet_bs 1, a smaller size, or drop --turbo", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
