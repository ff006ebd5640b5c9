"""Command-line front end shared by the optimized_* scripts: flags in, files out.

A thin front over the engine (`engine.py`): flags become one `Request` per prompt, the engine renders
them, `outputs.RequestWriter` saves them. Every user error ends as one line `error: ...` on stderr
and exit status 2 (1 for running out of memory), and is found before anything is written.
"""
from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ..model.config import SDConfig
from ..sampling.ksamplers import KSAMPLERS
from ..engine.spec import COMPVIS_CKPT, DEMO_CKPT, DEMO_CONFIG, resolve_model
from ..engine.request import CLI_LABELS, DEFAULT_STRENGTH, DEMO_SCALE, WATERMARK, Request, RequestError
from ..sampling.samplers import SAMPLERS

# A bad flag value, file or environment: one line, exit 2. The same error the library raises for a
# bad request, so every front refuses the same input with the same words.
UsageError = RequestError


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, like every other error of the tool."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


# What each script makes: its name, description, output folder and default --strength.
KINDS = {
    "txt2img": ("optimized_txt2img.py", "Text to image with Stable Diffusion v1 in four fragments, on little VRAM.",
                "outputs/txt2img-samples", None),
    "img2img": ("optimized_img2img.py", "Image to image (SDEdit) with Stable Diffusion v1 in four fragments, "
                "on little VRAM.", "outputs/img2img-samples", DEFAULT_STRENGTH["img2img"]),
    "inpaint": ("optimized_inpaint.py", "Inpainting with Stable Diffusion v1 (plain or 9-channel inpainting "
                "checkpoints) in four fragments, on little VRAM.", "outputs/inpaint-samples", DEFAULT_STRENGTH["inpaint"]),
}


def build_parser(kind: str = "txt2img") -> argparse.ArgumentParser:
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
      help="with --prompt_syntax plain: encode prompts longer than 75 tokens whole, in 75-token chunks encoded "
           "separately and concatenated (as AUTOMATIC1111's webui, and as the default webui syntax always does); "
           "without it plain prompts are cut at 75 tokens with a warning, as the reference pipeline")
    a("--prompt_syntax", type=str, default="webui",
      help="webui (default): AUTOMATIC1111's prompt syntax: (word) x1.1, [word] /1.1, (word:1.4), BREAK, "
           "[from:to:when] editing, [a|b] alternation, long prompts in 75-token chunks (docs/prompts.md); "
           "plain: the text as written (brackets are text)")
    a("--clip_skip", type=int, default=1,
      help="use the text encoder's N-th hidden state from the end (the webui's Clip skip; 2 for most "
           "anime-style SD 1.5 models); default 1, the last")
    a("--pad_conds", action="store_true",
      help="pad the shorter of prompt and negative prompt with empty chunks to the same length (the webui's "
           "Pad conds); default: run them as separate UNet batches of their own lengths")
    a("--from-file", dest="from_file", type=str, default=None,
      help="read prompts from this file, one per line (blank lines skipped); overrides --prompt")
    a("--outdir", type=str, default=outdir,
      help="images go to OUTDIR/<prompt>/seed_<seed>_<NNNNN>.<format>; existing files are never overwritten")
    a("--skip_grid", action="store_true", help="do not save a grid of each prompt's images")
    a("--skip_save", action="store_true", help="do not save the individual images (only the grid)")
    a("--format", type=str, default="png", choices=["png", "jpg"], help="image file format")
    add_watermark_flag(a)
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
    a("--precision", type=str, default=None, choices=["autocast", "upcast", "full", "bf16"],
      help="autocast: fp16 weights and autocast on CUDA; upcast: fp16 weights, each layer computed in fp32 "
           "(about fp16's memory, no fp16 overflow); full: fp32, exact (MPS and CPUs without native bf16 run fp32 "
           "unless bf16); bf16 (CPU only): bf16 weights and CPU autocast, about 3x faster where the CPU has "
           "AMX, 1.7x with AVX512-BF16 alone, not exact. Default: bf16 on such CPUs (the run says so), upcast on GTX 16xx cards "
           "(their fp16 gives black images), else autocast")
    a("--device", type=str, default=None,
      help="cuda, cuda:N, mps or cpu (default: cuda if available, else mps, else cpu); meta: plan a CUDA run "
           "shape-only (no checkpoint read, no image written) and print its peak device memory per phase")
    a("--ckpt", type=str, default=None,
      help=f"checkpoint (.ckpt or .safetensors); default: {COMPVIS_CKPT} if present, else the one file in weights/")
    a("--config", type=str, default=None,
      help="CompVis-style model YAML (e.g. configs/v1-inference.yaml); default: SD v1's built-in config")
    a("--ema", action="store_true", help="use the EMA weights of a full (non-pruned) checkpoint")
    add_custom_flags(a)
    add_control_flags(a)
    add_hires_flags(a, kind)
    add_preview_flags(a)
    a("--demo", action="store_true",
      help=f"use the bundled demo model ({DEMO_CKPT}, {DEMO_CONFIG}): a tiny model trained on coloured shapes, "
           "e.g. 'a red circle on a blue background, top left'; draws 64x64 images in seconds on a CPU")
    # On a Ray cluster (optimizedSD/cluster.py; needs `pip install ray`).
    a("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
      help="render on a Ray cluster, one worker per GPU, the same files as without it, resumable: running the same "
           "command again renders only what is missing; ADDRESS: auto (a cluster started with `ray start`) or "
           "host:port; none: a local cluster on this machine")
    a("--workers", type=int, default=None,
      help="with --ray: how many workers (default: one per GPU of the cluster; without GPUs, 1, sharing the CPUs)")
    return p


# ---- flags -> requests ------------------------------------------------------------------------
def read_prompts(args) -> list[str]:
    """The prompts to render: --prompt, or each non-blank line of --from-file, stripped (each is
    checked with the request)."""
    if args.from_file is None:
        return [args.prompt]
    try:
        lines = Path(args.from_file).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"prompt file not found: {args.from_file}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompt file {args.from_file}: {e}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {args.from_file} has no prompts; write one prompt per line")
    return prompts


def check_flags(args) -> None:
    """What only the flags can get wrong (the request's own values are checked by `request.check`)."""
    if args.plms:
        args.sampler = "plms"
    modes = [flag for flag, on in (("--turbo", args.turbo), ("--lowvram", args.lowvram), ("--vram", args.vram)) if on]
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} exclude each other; pick one")
    if args.n_rows < 0:
        raise UsageError(f"--n_rows must be 0 (automatic) or more, got {args.n_rows}")
    if args.preview_every < 0:
        raise UsageError(f"--preview_every must be 0 (no previews) or a number of steps, got {args.preview_every}")


def check_model_flags(args, cfg: SDConfig) -> None:
    if args.f != cfg.downsample_factor:
        raise UsageError(f"--f {args.f} does not match the model's downsampling factor {cfg.downsample_factor}")
    if args.C != cfg.channels:
        raise UsageError(f"--C {args.C} does not match the model's {cfg.channels} latent channels")


def add_custom_flags(a, lora_files: bool = True) -> None:
    """The flags of what is added to the checkpoint at inference (`customize.py`): the CLIs' and the
    web UI's (`lora_files`: --lora too; the UI picks LoRAs per request)."""
    if lora_files:
        a("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
          help="apply a LoRA file (kohya/webui or diffusers/PEFT; weight default 1); repeatable. A prompt can also name "
               "LoRAs as the webui does: <lora:NAME:WEIGHT>, NAME looked up in --lora_dir")
    a("--lora_dir", action="append", default=None, metavar="DIR",
      help="where <lora:NAME> is looked for (repeatable; default: models/Lora, then weights/lora)")
    a("--embeddings", default=None, metavar="DIR",
      help="textual-inversion embeddings (webui .pt/.safetensors, diffusers .bin): each file's name is a word "
           "prompts can use; default: embeddings/ when it exists")
    a("--vae", default=None, metavar="PATH",
      help="a separate VAE (.ckpt/.safetensors, e.g. vae-ft-mse-840000-ema-pruned), replacing the checkpoint's")
    a("--adapter_path", default=None, metavar="DIR",
      help="the adapters (arXiv 2303.18181) of the --config YAML that names them: the folder save_adapter_to_dir "
           "wrote")
    a("--adapter_scale", type=float, default=None, help="scale of the adapters' output (default: the config's)")
    a("--safety_checker", default=None, metavar="PATH",
      help="check every image with a local copy of the Stable Diffusion safety checker (the folder of "
           "CompVis/stable-diffusion-safety-checker, or its .safetensors/.bin); flagged images become black")
    a("--safety_blur", action="store_true", help="with --safety_checker: flagged images are blurred, not black")
    a("--fp8", nargs="?", const="unet", default=None, metavar="unet|all",
      help="store the weights of the UNet's Linear and Conv2d layers in float8_e4m3fn (half fp16's memory and "
           "transfers; each layer casts them for its arithmetic), as Forge and ComfyUI do; all: the text "
           "encoder's too. The VAE, norms, biases and the time embedding keep the precision's dtype")


def add_control_flags(a) -> None:
    """ControlNet (engine/control.py, docs/controlnet.md): repeatable; the i-th of each flag belongs to
    the i-th --controlnet."""
    a("--controlnet", action="append", default=[], metavar="PATH",
      help="a ControlNet for SD 1.5 (.pth/.safetensors in the original layout, or a diffusers folder), or its name "
           "in --controlnet_dir; repeatable for several nets")
    a("--controlnet_dir", action="append", default=[], metavar="DIR",
      help="where ControlNet names are looked for (repeatable; default models/ControlNet)")
    a("--control_image", action="append", default=[], metavar="IMG", help="the control image of each net")
    a("--control_weight", action="append", type=float, default=[], help="each net's weight (default 1)")
    a("--control_start", action="append", type=float, default=[],
      help="fraction of the steps where a net starts acting (default 0)")
    a("--control_end", action="append", type=float, default=[],
      help="fraction of the steps where it stops (default 1)")
    a("--control_mode", action="append", default=[], metavar="balanced|prompt|control",
      help="balanced (default), prompt (\"My prompt is more important\"), control (\"ControlNet is more important\")")
    a("--control_preprocessor", action="append", default=[], metavar="canny|invert|none",
      help="how the control image becomes the map (default none: the image is the map)")
    a("--control_low", action="append", type=float, default=[], help="canny's low threshold (default 100)")
    a("--control_high", action="append", type=float, default=[], help="canny's high threshold (default 200)")
    a("--control_resize", action="append", default=[], metavar="MODE",
      help="just resize, crop and resize (default) or resize and fill: how the image meets the render's size")
    a("--control_save_map", action="store_true", help="save each net's map beside the images")


def control_units(args) -> tuple:
    """The ControlUnits of the --controlnet flags (`control.controls_from_flags`)."""
    from ..engine.control import controls_from_flags

    if not hasattr(args, "controlnet"):
        return ()
    return controls_from_flags(args.controlnet, args.control_image, args.control_weight, args.control_start,
                               args.control_end, args.control_mode, args.control_preprocessor, args.control_low,
                               args.control_high, args.control_resize, args.controlnet_dir)


def add_hires_flags(a, kind: str) -> None:
    """The hires fix's flags (txt2img; engine/hires.py), named as the webui's API fields."""
    if kind != "txt2img":
        return
    a("--hr_scale", type=float, default=None,
      help="hires fix: render at --W x --H, upscale by this (e.g. 2), then an img2img pass at the larger size")
    a("--hr_upscaler", type=str, default="latent",
      help="hires fix upscaler: latent (bilinear, the webui's Latent), latent-nearest, or lanczos (decoded, "
           "resized with Lanczos, encoded again); default latent")
    a("--hr_steps", type=int, default=0, help="hires fix: the second pass's steps (default 0: --ddim_steps)")
    a("--hr_denoise", type=float, default=0.7,
      help="hires fix: the second pass's denoising strength in (0, 1] (default 0.7)")
    a("--hr_resize_x", type=int, default=0, help="hires fix: resize to this width instead of --hr_scale "
                                                 "(0: from --hr_resize_y and the aspect)")
    a("--hr_resize_y", type=int, default=0, help="hires fix: resize to this height (0: from --hr_resize_x)")


def hires_args(args) -> dict:
    """The request's hires fields from the flags (none for img2img and inpaint)."""
    names = ("hr_scale", "hr_upscaler", "hr_steps", "hr_denoise", "hr_resize_x", "hr_resize_y")
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def add_preview_flags(a) -> None:
    """Live previews of the sampling (engine/previews.py), written as files for folder watchers."""
    a("--preview_every", type=int, default=0, metavar="N",
      help="every N sampling steps write a preview of each image to previews/ in its folder "
           "(default 0: none); a linear latent->RGB approximation, or TAESD with --taesd")
    a("--taesd", type=str, default=None, metavar="PATH",
      help="previews with this TAESD decoder (taesd_decoder.safetensors or .pth of madebyollin/taesd)")


def add_watermark_flag(a, server: bool = False) -> None:
    """--watermark [TEXT]: the commands' (every image and grid) and webui.py's (the default of its pages'
    Watermark box and of API requests without a `watermark` field)."""
    where = ("the default of every page's Watermark box and of API requests without a watermark field: "
             if server else "embed ")
    a("--watermark", nargs="?", const=WATERMARK, default=None, metavar="TEXT",
      help=f"{where}the CompVis reference script's invisible watermark (invisible-watermark, dwtDct) in every "
           f"image and grid: the bytes of TEXT (default {WATERMARK}); images of at least 256x256; read it back "
           "with python -m optimizedSD.tools.check_watermark IMG")


def custom_args(args) -> dict:
    """`resolve_model`'s arguments for what is added to the checkpoint (`customize.py`)."""
    return dict(vae=args.vae, adapter_path=args.adapter_path, adapter_scale=args.adapter_scale,
                embeddings=args.embeddings, lora_dirs=args.lora_dir, fp8=args.fp8,
                safety_checker=args.safety_checker, safety_blur=args.safety_blur)


def memory_mode(args) -> str:
    return "turbo" if args.turbo else "lowvram" if args.lowvram else args.vram or "default"


def requests_of(args, spec, log) -> list[Request]:
    """One completed request per prompt; the seeds run on from one prompt to the next."""
    seed = args.seed if args.seed is not None else random.randrange(2 ** 32)
    per_prompt = args.n_iter * args.n_samples
    from ..custom.lora import parse_lora_arg

    loras = tuple((str(path.absolute()), weight) for path, weight in map(parse_lora_arg, args.lora))
    from ..engine.control import ControlError

    try:
        controls = control_units(args)
    except ControlError as e:
        raise UsageError(str(e)) from None
    out = []
    for k, prompt in enumerate(read_prompts(args)):
        where = f"{args.from_file} line {k + 1}" if args.from_file else None
        r = Request(prompt, kind=args.kind, negative_prompt=args.negative_prompt, seed=seed + k * per_prompt,
                    n_samples=args.n_samples, n_iter=args.n_iter, sampler=args.sampler, karras=args.karras,
                    steps=args.ddim_steps, scale=args.scale, eta=args.ddim_eta, width=args.W, height=args.H,
                    strength=getattr(args, "strength", None), long_prompts=args.long_prompts,
                    prompt_syntax=args.prompt_syntax, clip_skip=args.clip_skip, pad_conds=args.pad_conds,
                    fixed_code=args.fixed_code, memory=memory_mode(args), unet_bs=args.unet_bs,
                    init_image=out[0].init_image if out else getattr(args, "init_img", None),
                    mask=out[0].mask if out else getattr(args, "mask", None),
                    init_image_name=out[0].init_image_name if out else None,
                    mask_name=out[0].mask_name if out else None, loras=loras, watermark=args.watermark)
        r = replace(r, **hires_args(args), controls=out[0].controls if out else controls)
        try:
            out.append(spec.complete(r, CLI_LABELS, log))
        except RequestError as e:
            message, label = str(e), CLI_LABELS["prompt"] + ": "
            raise UsageError(f"{where}: {message[len(label):]}" if where and message.startswith(label)
                             else message) from None
    return out


def prepare_ray(args, log):
    """`--ray`: everything a single-process run checks, done on the driver before any worker starts
    (`cluster.prepare`); every error is a `RequestError`."""
    from ..model.paths import DEMO_CONFIG, ROOT
    from . import cluster

    if args.ray is None:
        raise UsageError("--workers goes with --ray (the workers of a Ray cluster); add --ray or drop --workers")
    options = cluster.Options(args.outdir, fmt=args.format, skip_save=args.skip_save, skip_grid=args.skip_grid,
                              n_rows=args.n_rows, address=args.ray, workers=args.workers, device=args.device,
                              seed_given=args.seed is not None, quiet_stdout=args.json)
    check_flags(args)
    cluster.check_options(options)
    spec = resolve_model(args.ckpt, args.config, demo=args.demo, device="cpu", precision=args.precision, ema=args.ema,
                         **custom_args(args))
    check_model_flags(args, spec.cfg)
    worker = cluster.worker_spec(spec, options, args.precision)
    requests = requests_of(args, worker, log)  # the worker's defaults (--unet_bs)
    config = str(Path(args.config).resolve()) if args.config else str(ROOT / DEMO_CONFIG) if args.demo else None
    model = dict(ckpt=str(spec.ckpt.resolve()), precision=args.precision, ema=args.ema, demo=args.demo,
                 adapter_scale=args.adapter_scale, **spec.custom.arguments(), config=config, fp8=spec.fp8)
    return cluster.prepare(spec, worker, requests, model, options, precision=args.precision, ema=args.ema)


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
    from tqdm import tqdm

    from ..engine.engine import Engine, RunStats, memory_line
    from ..outputs.images import check_outdir, ensure_writable
    from ..outputs.writer import RequestWriter, metadata, write_preview

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    if args.ray is not None or args.workers is not None:  # on a Ray cluster
        from . import cluster

        return cluster.generate(prepare_ray(args, log), log)
    check_flags(args)
    spec = resolve_model(args.ckpt, args.config, demo=args.demo, device=args.device, precision=args.precision,
                         ema=args.ema, notify=log, **custom_args(args))
    check_model_flags(args, spec.cfg)
    requests = requests_of(args, spec, log)
    first = requests[0]
    if not spec.planning:
        check_outdir(args.outdir)
    engine = Engine(spec, notify=warn, taesd=args.taesd)
    plan = engine.plan(first)  # a budget too small for the size is an error before anything is read
    log(f"device: {spec.device}; seed: {first.seed}; checkpoint: {spec.ckpt or 'none (planning)'}")
    engine.load()  # reads the checkpoint (nothing on meta)
    log(engine.describe(plan))
    if not spec.planning:
        ensure_writable(args.outdir)
    stats, dirs, written = RunStats(), [], 0
    total = sum(len(r.seeds) for r in requests)
    # One bar over the whole run (prompts x images: done/total, ETA) when it has more than one batch,
    # the sampling steps of the current batch beneath it.
    single_batch = len(requests) == 1 and requests[0].n_iter == 1
    overall = tqdm(total=total, unit="image", position=0, dynamic_ncols=True, disable=spec.planning or single_batch)
    try:  # the bar closed first, so that an error or Ctrl-C line is printed below it
        for k, r in enumerate(requests):
            overall.set_description(f"prompt {k + 1}/{len(requests)}")
            writer = None
            if not spec.planning:
                writer = RequestWriter(args.outdir, r, metadata(r, spec, engine.checkpoint_hash), fmt=args.format,
                                       skip_save=args.skip_save, skip_grid=args.skip_grid, n_rows=args.n_rows)
            with tqdm(total=None, desc=f"sampling seeds {r.seeds[0]}-{r.seeds[-1]}", leave=False,
                      position=0 if overall.disable else 1, dynamic_ncols=True, disable=spec.planning) as bar:
                def on_step(done, total, bar=bar):
                    bar.total = total
                    bar.update(done - bar.n)

                previews = {}
                if args.preview_every and writer is not None:  # previews/ beside the images (writer.write_preview)
                    previews = dict(on_preview=lambda p, w=writer: write_preview(w.dir, p), preview_every=args.preview_every)
                for batch in engine.render(r, on_step=on_step, stats=stats, **previews):
                    for item in batch:
                        written += writer.add(item.image, item.seed, meta=item.meta) is not None
                    overall.update(len(batch))
            if writer:
                writer.finish()
                dirs.append(str(writer.dir))
                if getattr(args, "control_save_map", False) and r.controls and writer.written:
                    from ..engine.control import save_maps

                    for path in save_maps(r, writer.dir, writer.written[0].stem):
                        log(f"control map: {path}")
    finally:
        overall.close()
    figures = stats.figures(spec.device, first.width, first.height)
    for line in stats.notes():
        warn(line)
    log(memory_line(figures, spec.planning))
    if not spec.planning:
        seconds, total = stats.seconds, stats.images
        where = dirs[0] if len(set(dirs)) == 1 else f"{len(set(dirs))} folders under {args.outdir}"
        log(f"wrote {written} images{'' if args.skip_grid else ' and ' + str(len(requests)) + ' grid(s)'} to {where} "
            f"in {seconds:.1f} s ({seconds / total:.2f} s/image)")
    return figures


def warn(message: str) -> None:
    """A line on stderr that clears any progress bar first (out-of-memory retries come mid-bar)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def main(argv=None, kind: str = "txt2img") -> int:
    args = build_parser(kind).parse_args(argv)
    from ..outputs.images import OutputError

    try:
        return run(args)
    except (UsageError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print(f"error: out of GPU memory at {args.W}x{args.H}, even with --unet_bs 1 and one image at once; "
              "try --lowvram, a smaller --vram or a smaller size", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the images finished before Ctrl-C are kept, none is half-written", file=sys.stderr)
        return 130
