"""One engine, loaded once: renders requests for every front (CLI, browser UI, cluster workers).

    spec = resolve_model(ckpt, config, device="cuda")          # model.py: found and checked
    engine = Engine(spec)                                       # the fragments, on the host, once
    request = engine.complete(Request("a red fox", n_samples=2, seed=7))
    for batch in engine.render(request, on_step=print):
        for item in batch:                                      # Rendered: image, seed, metadata
            item.image.save(...)

The engine owns the long-lived state: the fragments' host masters, the offload engine of the current
memory plan (re-planned, and cached, when the size, batch or memory mode changes), the pipeline. A
render reports each sampling step to `on_step(done, total)`, stops between steps when `cancel()` says
so (`Cancelled`), and retries running out of GPU memory as it always did: halving `unet_bs`, then the
images at once, and switching the VAE to tiles, saying each retry through `notify`. On `meta` it
plans instead: one sampling step per distinct batch shape, through the real code path
(`planner.predict`), and no images.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from PIL import Image

from . import hires, previews
from .customize import prompt_text, request_loras
from .spec import ModelSpec
from .request import CLI_LABELS, Request, RequestError, check_memory


class Cancelled(Exception):
    """The render was stopped between two sampling steps (`cancel()` returned True)."""


@dataclass
class Rendered:
    """One finished image of a request: image i of the request is seeded `request.seeds[i]`."""
    image: Image.Image
    seed: int
    index: int
    request: Request
    meta: dict = field(default_factory=dict)  # what this image's metadata adds to the request's (safety check)

    @property
    def flagged_note(self) -> str | None:
        """The line a front shows for an image the safety checker flagged (None for any other)."""
        check = self.meta.get("Safety check", "")
        return f"safety checker: seed {self.seed} flagged ({check})" if check.startswith("flagged") else None


@dataclass
class RunStats:
    """What one or more renders took: time, steps, peak device memory per phase, bytes moved."""
    images: int = 0
    seconds: float = 0.0
    sampled_steps: int = 0
    sample_seconds: float = 0.0
    sample_bytes: int = 0  # host->device while sampling
    peaks: dict = field(default_factory=dict)  # phase -> bytes
    redone_in_fp32: int = 0  # fp16 decodes that overflowed
    redone_in_upcast: int = 0  # fp16 UNet evaluations that overflowed, redone in fp32 arithmetic
    last_plan: object = None  # the MemoryPlan of the last render
    unet_bs: int = 1  # as the last render ended (after any retry)
    images_at_once: int = 1
    tiled_vae: bool = False

    def add(self, part: "RunStats") -> None:
        """Add another render's figures (times and counts summed, peaks the highest, the last plan its)."""
        for name in ("images", "seconds", "sampled_steps", "sample_seconds", "sample_bytes", "redone_in_fp32",
                     "redone_in_upcast"):
            setattr(self, name, getattr(self, name) + getattr(part, name))
        self.add_peaks(part.peaks)
        self.last_plan, self.unet_bs, self.images_at_once, self.tiled_vae = (
            part.last_plan, part.unet_bs, part.images_at_once, part.tiled_vae)

    def add_peaks(self, peaks: dict) -> None:
        for phase, v in peaks.items():
            self.peaks[phase] = max(self.peaks.get(phase, 0), v)

    def figures(self, device: torch.device, width: int, height: int) -> dict:
        """The figures `--json` prints (the keys are part of the CLI's interface)."""
        plan = self.last_plan
        return dict(device=str(device), width=width, height=height, images=self.images,
                    seconds=round(self.seconds, 3), seconds_per_image=round(self.seconds / max(1, self.images), 3),
                    seconds_per_step=round(self.sample_seconds / max(1, self.sampled_steps), 4),
                    mode=plan.mode if plan else None, resident_blocks=len(plan.resident) if plan else 0,
                    unet_bs=self.unet_bs, images_at_once=self.images_at_once, tiled_vae=self.tiled_vae,
                    peak_bytes=dict(self.peaks),
                    host_to_device_bytes_per_step=self.sample_bytes // max(1, self.sampled_steps),
                    fp16_decodes_redone_in_fp32=self.redone_in_fp32, unet_steps_redone_in_upcast=self.redone_in_upcast)


    def notes(self) -> list[str]:
        """What every front says after a run about steps redone (fp16 overflow)."""
        lines = []
        if self.redone_in_fp32:
            lines.append(f"note: {self.redone_in_fp32} fp16 decode(s) overflowed and were redone in fp32")
        if self.redone_in_upcast:
            lines.append(f"note: {self.redone_in_upcast} fp16 UNet step(s) overflowed (NaN/inf) and were redone in "
                         "fp32 arithmetic; precision upcast computes every step that way")
        return lines


def memory_line(figures: dict, planning: bool = False) -> str:
    """The one line every front prints after a run: peak device memory per phase (`RunStats.figures`)."""
    from .planner import gib

    peaks = figures["peak_bytes"]
    if not peaks:
        return f"peak device memory: not measured on {figures['device']}"
    phases = ", ".join(f"{k} {gib(v)}" for k, v in peaks.items())
    moved = gib(figures["host_to_device_bytes_per_step"])
    return f"{'planned ' if planning else ''}peak device memory: {phases}; host->device per sampling step {moved}"


class Engine:
    def __init__(self, spec: ModelSpec, notify: Callable[[str], None] = lambda message: None, taesd=None):
        """An engine for `spec`; `notify` hears retries and notes. `load` reads the checkpoint (the first
        render does, if no one did before), so a front can plan and refuse requests before that.
        `taesd`: a TAESD decoder file for live previews (previews.py), read now, a fragment once loaded."""
        self.spec = spec
        self.cfg = spec.cfg
        self.device = spec.device
        self.notify = notify
        self.loads = 0  # checkpoint reads: one per engine
        self.fragments = None
        self.checkpoint_hash = None
        self._plans: dict[tuple, object] = {}
        self._engine = None  # the Offloader of the current plan
        self._placement = None  # its (mode, resident)
        self.tokenizer = None  # reads the embeddings' names (None: none, the shared CLIP tokenizer)
        self._patch = None  # lora.LoraPatch of the LoRAs applied now (None: none)
        self._taesd = previews.read_taesd(taesd, spec.dtype)  # its decoder, or None
        self._previewer = None  # the render's previews.Previewer, if it asked for previews

    def load(self) -> "Engine":
        """Read the checkpoint into the fragments' host masters, once (nothing on `meta`)."""
        from ..model.checkpoint import CheckpointError, load_fragments
        from ..model.fragments import FRAGMENTS
        from ..model.hashes import file_hash
        from .pipeline import channels_last

        if self.fragments is not None or self.spec.planning:
            return self
        try:
            fragments = load_fragments(self.spec.ckpt, self.cfg, names=FRAGMENTS, dtype=self.spec.dtype,
                                       ema=self.spec.ema, channels_last=channels_last(self.device))
            self.tokenizer = self._customize(fragments)
            if self.spec.fp8:  # after the adapters (kept as they are), before any patch or offload engine
                from ..model.fp8 import store_fragments_fp8

                store_fragments_fp8(fragments, self.spec.fp8)
        except CheckpointError as e:
            raise RequestError(str(e)) from None
        if self._taesd is not None:  # live previews' decoder: a fragment the offload engine moves on use
            fragments[previews.TAESD] = self._taesd
        self.fragments = fragments
        self.loads += 1
        self.checkpoint_hash = file_hash(self.spec.ckpt)
        return self

    def _customize(self, fragments):
        """The model's customizations on freshly loaded fragments: a separate VAE, the adapters, the
        embeddings (a tokenizer that reads their names, returned; None without any); and the layout
        the device runs fastest in (`pipeline.channels_last`)."""
        from ..custom.adapters import AdapterError, load_adapter_folder
        from ..custom.embeddings import TextualInversion
        from ..model.fragments import TEXT_ENCODER, UNET_IN, UNET_OUT, VAE
        from .pipeline import channels_last
        from ..model.tokenizer import get_tokenizer
        from ..custom.vae_file import load_vae

        custom = self.spec.custom
        if custom.vae is not None:
            fragments[VAE] = load_vae(custom.vae, self.cfg, self.spec.dtype)
        if custom.adapter_path is not None:
            try:
                load_adapter_folder(fragments, self.cfg, custom.adapter_path, self.spec.dtype)
            except AdapterError as e:
                raise RequestError(str(e)) from None
        if channels_last(self.device):  # as the checkpoint's were loaded: a separate VAE's, the adapters'
            for name in (UNET_IN, UNET_OUT, VAE):
                fragments[name].to(memory_format=torch.channels_last)  # the 4-d (conv) weights; no copy if so already
        if custom.safety_checker is not None:  # one more fragment (model/safety.py), never resident
            from ..custom.safety_file import SafetyError, load_safety_checker
            from ..model.safety import SAFETY

            try:
                fragments[SAFETY] = load_safety_checker(custom.safety_checker, self.spec.dtype)
            except SafetyError as e:
                raise RequestError(str(e)) from None
        if custom.embeddings:
            return TextualInversion(fragments[TEXT_ENCODER], get_tokenizer(), list(custom.embeddings)).tokenizer
        return None

    def _use_loras(self, loras: list) -> None:
        """Patch the host masters with `loras` [(Lora, weight)], undoing the last request's first; the
        same set as the last request's is kept as it is."""
        from ..custom.lora import apply_loras

        applied = self._patch.loras if self._patch is not None else []
        if [(id(lora), w) for lora, w in loras] == [(id(lora), w) for lora, w in applied]:
            return  # the patch holds those Lora objects: an id is not reused while they are applied
        if self._engine is not None:
            self._engine.close()  # every weight its host master
        if self._patch is not None:
            self._patch.undo()
        self._patch = apply_loras(self.fragments, loras) if loras else None

    # ---- requests and plans --------------------------------------------------------------------
    def complete(self, request: Request, labels: dict = CLI_LABELS, notify: Callable[[str], None] | None = None) -> Request:
        """`request` with this model's defaults, its images read, checked (`ModelSpec.complete`)."""
        return self.spec.complete(request, labels, notify or self.notify)

    def plan(self, r: Request):
        """The memory plan of a completed request (`planner.choose_plan`), cached per shape and mode."""
        from .hires import planned_request
        from .planner import PlanError, choose_plan

        r = planned_request(r, self.cfg.downsample_factor)  # the hires fix: its larger second pass
        key = (r.memory, r.unet_bs, r.width, r.height, r.n_samples, r.guided, r.kind != "txt2img", r.sampler,
               len(r.controls))
        if key not in self._plans:
            budget = check_memory(r.memory, CLI_LABELS["memory"])
            try:
                self._plans[key] = choose_plan(self.cfg, self.spec.dtype, turbo=r.memory == "turbo",
                                               lowvram=r.memory == "lowvram", vram=budget, unet_bs=r.unet_bs,
                                               height=r.height, width=r.width, n_samples=r.n_samples,
                                               guided=r.guided, encode=r.kind != "txt2img",
                                               precision=self.spec.precision, sampler=r.sampler, fp8=self.spec.fp8,
                                               safety=self.spec.custom.safety, controls=len(r.controls))
            except PlanError as e:
                raise RequestError(str(e)) from None
        return self._plans[key]

    def describe(self, plan) -> str:
        from .offload import unet_units
        from .planner import _meta_fragments, describe

        fragments = self.fragments or _meta_fragments(self.cfg, self.spec.dtype, self.spec.fp8)
        return describe(plan, len(unet_units(fragments)))

    def _use_controls(self, r: Request) -> list:
        """The request's ControlNets (engine/control.py) among the fragments, loaded once while requests
        name the same files; a new offload engine when the set changes."""
        from .control import NetCache, place_nets
        from .pipeline import channels_last

        if not hasattr(self, "_nets"):
            self._nets = NetCache()
        try:
            nets = self._nets.nets(r, self.cfg, self.spec.dtype, channels_last(self.device)) if r.controls else []
        except ValueError as e:  # control.ControlError
            raise RequestError(str(e)) from None
        if place_nets(self.fragments, nets):
            if self._engine is not None:
                self._engine.close()
            self._placement = None  # the Offloader captured the old set's masters
        return nets

    def _pipeline(self, plan):
        """A pipeline over the offload engine of `plan`'s placement (made anew when it changes)."""
        from .offload import Offloader
        from .memory import meter_for
        from .pipeline import Pipeline

        placement = (plan.mode, plan.resident)
        if placement != self._placement:
            if self._engine is not None:
                self._engine.close()
            # an Offloader may replace host masters (pinned copies): LoRA patches are undone around it
            patch = self._patch
            patch_loras = patch.loras if patch is not None else []
            if patch is not None:
                patch.undo()
            self._engine = Offloader(self.fragments, self.device, plan.mode, plan.resident, meter=meter_for(self.device))
            self._placement = placement
            if patch is not None:
                from ..custom.lora import apply_loras

                self._patch = apply_loras(self.fragments, patch_loras)
        return Pipeline(self.cfg, self._engine, dtype=self.spec.dtype, unet_bs=plan.unet_bs, tile=plan.tile,
                        precision=self.spec.precision, tokenizer=self.tokenizer)

    # ---- rendering -----------------------------------------------------------------------------
    def render(self, request: Request, on_step: Callable[[int, int], None] | None = None,
               cancel: Callable[[], bool] | None = None, stats: RunStats | None = None,
               iterations: list[int] | None = None, on_preview: Callable | None = None,
               preview_every: int = 1) -> Iterator[list[Rendered]]:
        """The images of a completed `request`, a batch at a time (see the module docstring).
        `on_preview(previews.Preview)` hears the images forming every `preview_every` sampling steps.
        `stats` (made fresh when None) accumulates the run's figures. `iterations`: which of the
        request's `n_iter` batches to render (default all); batch `it` holds the seeds
        `seeds[it * n_samples:(it + 1) * n_samples]` and is rendered exactly as in a whole run (a
        cluster worker renders one batch of a request per job)."""
        r = request
        if r.seed is None or r.sampler is None:
            raise ValueError("render takes a completed request: call Engine.complete first")
        stats = stats if stats is not None else RunStats()
        plan = self.plan(r)
        stats.last_plan = plan
        if self.spec.planning:
            self._plan_only(r, plan, stats)
            return
        self.load()
        its = list(range(r.n_iter)) if iterations is None else list(iterations)
        if any(not 0 <= it < r.n_iter for it in its):
            raise ValueError(f"iterations {its} outside the request's {r.n_iter} batches")
        self._previewer = previews.Previewer(on_preview, preview_every) if on_preview is not None else None
        yield from self._render(r, plan, on_step, cancel, stats, its)

    def _render(self, r: Request, plan, on_step, cancel, stats: RunStats, its: list[int]) -> Iterator[list[Rendered]]:
        from .inputs import to_pil
        from .inputs import image_tensor, mask_tensor, paste_back
        from .pipeline import SampleSettings

        self._use_loras(request_loras(r, self.cfg, self.spec.custom.lora_dirs))
        nets = self._use_controls(r)
        pipe = self._pipeline(plan)
        pipe.control = None
        if nets:
            from .control import Control

            pipe.control = Control(nets, self._engine)
        pipe.long_prompts = r.long_prompts
        pipe.prompt_syntax, pipe.clip_skip, pipe.pad_conds = r.prompt_syntax, r.clip_skip, r.pad_conds
        engine = self._engine
        engine.peaks, engine.phase_bytes, engine.setup_bytes = {}, {}, {}
        settings = SampleSettings(sampler=r.sampler, steps=r.steps, scale=r.scale, eta=r.eta, karras=r.karras)
        steps = sampled_steps(self.cfg, r) + hires.second_pass_steps(pipe.schedule, r)
        f = self.cfg.downsample_factor
        fixed = None
        if r.fixed_code:
            fixed = torch.randn((1, self.cfg.channels, r.height // f, r.width // f),
                                generator=torch.Generator("cpu").manual_seed(r.seed))
        image = image_tensor(r.init_image) if r.kind != "txt2img" else None
        mask = mask_tensor(r.mask) if r.kind == "inpaint" else None
        batch_size = plan.batch or r.n_samples
        total = len(its) * -(-r.n_samples // batch_size) * steps
        done_steps = 0
        start = time.perf_counter()

        def step(info):
            nonlocal done_steps
            done_steps += 1
            if on_step is not None:
                on_step(done_steps, total)
            if self._previewer is not None:
                self._previewer.step(done_steps, total, info, engine)
            if cancel is not None and cancel():
                raise Cancelled()

        try:
            for k, it in enumerate(its):
                seeds = r.seeds[it * r.n_samples:(it + 1) * r.n_samples]
                done = 0
                while done < len(seeds):
                    if cancel is not None and cancel():
                        raise Cancelled()
                    chunk = seeds[done:done + batch_size]
                    if self._previewer is not None:
                        self._previewer.seeds = chunk
                    before = done_steps
                    try:
                        t0 = time.perf_counter()
                        latents = self._latents(pipe, r, chunk, settings, image, mask, fixed, step)
                        stats.sample_seconds += time.perf_counter() - t0
                    except torch.cuda.OutOfMemoryError:
                        done_steps = before
                        if engine.failed_phase == "encode" and not pipe.tile:
                            self._tile_vae(pipe, "out of GPU memory while encoding the init image; retrying with tiled VAE")
                        else:
                            batch_size = self._smaller(pipe, batch_size, len(chunk))
                            total = done_steps + (len(its) - k) * -(-(len(seeds) - done) // batch_size) * steps
                        continue
                    stats.sampled_steps += steps
                    images = to_pil(self._decode(pipe, latents))
                    del latents  # the next batch must not find this one's latents on the device (as planned)
                    if r.kind == "inpaint":  # the unmasked pixels are the init image's, exactly
                        images = [paste_back(im, r.init_image, r.mask) for im in images]
                    images, metas = self._safety_check(pipe, images, chunk)
                    base = it * r.n_samples + done
                    done += len(chunk)
                    stats.images += len(chunk)
                    yield [Rendered(im, s, base + j, r, m) for j, (im, s, m) in enumerate(zip(images, chunk, metas))]
        finally:
            stats.seconds += time.perf_counter() - start
            stats.add_peaks(engine.peaks)
            # per step: not the units loaded once per sampling loop (resident blocks, --turbo's UNet)
            stats.sample_bytes += engine.phase_bytes.get("sample", 0) - engine.setup_bytes.get("sample", 0)
            stats.redone_in_fp32 += pipe.redone_in_fp32
            stats.redone_in_upcast += pipe.redone_in_upcast
            stats.unet_bs, stats.images_at_once, stats.tiled_vae = pipe.unet_bs, batch_size, pipe.tile

    @staticmethod
    def _latents(pipe, r: Request, seeds, settings, image, mask, fixed, step):
        prompt = prompt_text(r.prompt)
        if r.kind == "txt2img" and hires.wanted(r):  # base pass, upscale, second pass (hires.py)
            return hires.hires_latents(pipe, prompt, r.negative_prompt, seeds, r.width, r.height, settings, r,
                                       fixed_noise=fixed, callback=step)
        if r.kind == "txt2img":
            return pipe.txt2img_latents(prompt, r.negative_prompt, seeds, r.height, r.width, settings,
                                        fixed_noise=fixed, callback=step)
        if r.kind == "img2img":
            return pipe.img2img_latents(prompt, r.negative_prompt, seeds, image, settings, r.strength,
                                        fixed_noise=fixed, callback=step)
        return pipe.inpaint_latents(prompt, r.negative_prompt, seeds, image, mask, settings, r.strength,
                                    fixed_noise=fixed, callback=step)

    def _plan_only(self, r: Request, plan, stats: RunStats) -> None:
        """`meta`: the run's figures from a short run per distinct batch size (`planner.predict`): its
        peaks are any run's, its host->device bytes per UNet evaluation times the evaluations of the
        run's sampler give the bytes per step."""
        from .pipeline import Pipeline
        from .planner import predict

        if hires.wanted(r):  # the base pass, then the second at the larger size, under the one plan
            images = stats.images
            for part in hires.pass_requests(r, Pipeline.schedule_of(self.cfg), self.cfg.downsample_factor):
                stats.images = images
                self._plan_only(part, plan, stats)
            return
        start = time.perf_counter()
        batch = plan.batch or r.n_samples
        sizes = [batch] * (r.n_samples // batch) + ([r.n_samples % batch] if r.n_samples % batch else [])
        steps, evals = sampled_steps(self.cfg, r), model_evals(self.cfg, r)
        for size in sorted(set(sizes)):
            peaks, per_eval = predict(self.cfg, self.spec.dtype, plan, r.height, r.width, size, r.guided,
                                      encode=r.kind != "txt2img", precision=self.spec.precision, sampler=r.sampler,
                                      fp8=self.spec.fp8, safety=self.spec.custom.safety, controls=len(r.controls))
            stats.add_peaks(peaks)
            runs = r.n_iter * sizes.count(size)
            stats.sample_bytes += per_eval * evals * runs
            stats.sampled_steps += steps * runs
        stats.images += r.n_iter * r.n_samples
        stats.seconds += time.perf_counter() - start
        stats.unet_bs, stats.images_at_once, stats.tiled_vae = plan.unet_bs, batch, plan.tile

    def _safety_check(self, pipe, images: list, seeds: list[int]) -> tuple[list, list[dict]]:
        """With a safety checker: the images, the flagged ones replaced (black, or blurred), and each
        image's metadata (`Safety check`); the seeds flagged are said through `notify`."""
        custom = self.spec.custom
        if custom.safety_checker is None:
            return images, [{} for _ in images]
        from ..model.safety import pixel_values, replacement

        flagged = pipe.safety_flags(pixel_values(images, custom.safety.image_size))
        how = "blurred" if custom.safety_blur else "black"
        if any(flagged):
            self.notify(f"safety checker: seed(s) {', '.join(str(s) for s, f in zip(seeds, flagged) if f)} flagged; "
                        f"replaced by {'a blurred image' if custom.safety_blur else 'a black image'}")
        return ([replacement(im, custom.safety_blur) if f else im for im, f in zip(images, flagged)],
                [{"Safety check": f"flagged, {how}" if f else "passed"} for f in flagged])

    # ---- out-of-memory retries ---------------------------------------------------------------
    def _smaller(self, pipe, batch_size: int, chunk: int) -> int:
        """After running out of GPU memory while sampling: halve unet_bs, else the images at once."""
        torch.cuda.empty_cache()
        if pipe.unet_bs > 1:
            pipe.unet_bs //= 2
            self.notify(f"out of GPU memory while sampling; retrying with --unet_bs {pipe.unet_bs}")
            return batch_size
        if chunk > 1:
            self.notify(f"out of GPU memory while sampling; retrying {chunk // 2} image(s) at once")
            return chunk // 2
        raise torch.cuda.OutOfMemoryError("out of memory at --unet_bs 1 with one image at once")

    def _decode(self, pipe, latents):
        """Decode; on running out of GPU memory, switch to tiled decoding once and retry."""
        try:
            return pipe.decode(latents)
        except torch.cuda.OutOfMemoryError:
            if pipe.tile:
                raise
            self._tile_vae(pipe, "out of GPU memory while decoding; retrying with tiled VAE decode")
            return pipe.decode(latents)

    def _tile_vae(self, pipe, message: str) -> None:
        """After running out of GPU memory in the VAE: free the cache, use tiles from now on, say so."""
        torch.cuda.empty_cache()
        pipe.tile = True
        self.notify(message)


def sampled_steps(cfg, r: Request) -> int:
    """Sampling steps one batch of `r` walks (all of the plan's, or the last strength x steps)."""
    from .pipeline import Pipeline
    from ..sampling.samplers import make_plan, strength_steps

    steps = make_plan(Pipeline.schedule_of(cfg), r.sampler, r.steps, karras=r.karras).steps
    return steps if r.kind == "txt2img" else strength_steps(steps, r.strength)


def model_evals(cfg, r: Request) -> int:
    """How many times one batch of `r` evaluates the model: its sampler run on a 1-element stand-in
    with a counting denoiser (Heun and DPM2 take two evaluations on most steps, PLMS two on its first)."""
    from .pipeline import Pipeline
    from ..sampling.samplers import SAMPLERS, make_plan, takes_noise

    plan = make_plan(Pipeline.schedule_of(cfg), r.sampler, r.steps, karras=r.karras)
    sigmas = plan.sigmas[plan.steps - sampled_steps(cfg, r):]
    calls = []

    def denoise(x, sigma, **_):
        calls.append(1)
        return torch.zeros_like(x)

    kwargs = {"noise_sampler": lambda *_: torch.zeros(1, 1, 1, 1)} if takes_noise(r.sampler) else {}
    SAMPLERS[r.sampler](denoise, torch.ones(1, 1, 1, 1), sigmas, **kwargs)
    return len(calls)
