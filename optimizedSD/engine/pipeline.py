"""Text to image, image to image and inpainting on the four fragments: conditioning -> (encoding)
-> sampling -> decoding.

The pipeline owns no weights' placement: every fragment call goes through the `Offloader`.
Randomness is drawn on the CPU from one generator per image (`seed + i`), so one seed gives one
image whatever the device, batch size or `unet_bs`.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..model.config import SDConfig
from ..model.fragments import TEXT_ENCODER, UNET_IN
from .conditioning import Scheduled, StepConditioned, encode_pair, schedule_steps
from .offload import UNET_HALVES, VAE_DECODER, VAE_ENCODER, Offloader, text_layer_unit
from ..sampling.prompts import parse_weighted
from ..sampling.samplers import SAMPLERS, EpsDenoiser, KnownRegion, Schedule, make_plan, strength_steps, takes_noise
from .tiling import decode_safe, decode_tiled, encode_tiled
from ..model.tokenizer import get_tokenizer
from ..model.unet import Carry, block_started
from ..model.upcast import UpcastMode

TILE = 64  # latent pixels per side of a VAE tile (512 image pixels), overlapping by 16


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # the fragments' dtype on CUDA and on `meta` (which plans a CUDA run); fp32 elsewhere
    upcast: bool  # every layer computed in fp32 from those weights (upcast.py)
    cpu_only: bool = False  # weights in this dtype on the CPU too (and refused elsewhere)


# Precision policy, in one place. CPU and MPS always hold and compute fp32.
PRECISIONS = {
    "autocast": Precision(torch.float16, False),  # torch.autocast on CUDA; an overflowing UNet step redone in upcast
    "upcast": Precision(torch.float16, True),  # fp16's memory, fp32 arithmetic: no fp16 overflow
    "full": Precision(torch.float32, False),
    # asked for only: bf16 weights under torch.autocast("cpu", bf16): matrix products and convolutions in
    # bf16 (AMX / AVX512-BF16 where the CPU has them), GroupNorm32 in fp32; faster, not the fp32 image
    "bf16": Precision(torch.bfloat16, False, cpu_only=True),
}
# Turing chips without tensor cores (TU116, TU117): compute capability 7.5 like the RTX 20xx, but their
# fp16 convolutions give NaN, i.e. black or green images (pytorch#58123, webui#1918): the GeForce
# GTX 16xx ("GTX 16" in the name), and the MX450/MX550 and T400-T2000 of the same chips.
FP16_BROKEN_TU117 = re.compile(r"\bMX[45]50\b|\bT(400|500|550|600|1000|1200|2000)\b")


def weight_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The fragments' dtype: the precision's on CUDA and on `meta`; fp32 on CPU and MPS (bf16's on the CPU)."""
    p = PRECISIONS[precision]
    if p.cpu_only:
        if device.type != "cpu":
            raise ValueError(f"precision {precision} runs on the CPU only, not on {device.type}")
        return p.weights
    return p.weights if device.type in ("cuda", "meta") else torch.float32


# The CPU's precision when --precision is not given, when set (a name of `PRECISIONS`): e.g. "full" for
# exact fp32 images from every front on a CPU that would default to bf16 (the tests' conftest sets it).
CPU_PRECISION_ENV = "OPTIMIZEDSD_CPU_PRECISION"


def default_precision(device: torch.device) -> tuple[str, str | None]:
    """(precision, a note to print or None) when --precision is not given: "upcast" on a CUDA card
    whose fp16 arithmetic is broken (by name: "GTX 16" always; `FP16_BROKEN_TU117` at compute
    capability 7.5); on a CPU that computes bf16 natively (`native_bf16`) "bf16", as OpenVINO
    defaults to there (about 3x faster than fp32 with AMX, 1.7x with AVX512-BF16 alone; not the fp32
    image: --precision full), unless $OPTIMIZEDSD_CPU_PRECISION names another; else "autocast" (fp32
    weights off CUDA)."""
    import os

    device = torch.device(device)
    if device.type == "cpu" and os.environ.get(CPU_PRECISION_ENV):
        return os.environ[CPU_PRECISION_ENV], None
    if device.type == "cpu" and native_bf16():
        return "bf16", ("note: this CPU computes bf16 natively (AMX or AVX512-BF16): using --precision bf16 "
                        "(bf16 weights and arithmetic, 1.7-3x faster, not the exact fp32 image); "
                        "--precision full for fp32")
    if device.type != "cuda":
        return "autocast", None
    name = torch.cuda.get_device_name(device)
    if "GTX 16" in name or (FP16_BROKEN_TU117.search(name) and torch.cuda.get_device_capability(device) == (7, 5)):
        return "upcast", (f"note: {name} computes fp16 wrongly (black images); using --precision upcast "
                          "(fp16 weights, fp32 arithmetic)")
    return "autocast", None


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere torch emulates it."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def default_unet_bs(device: torch.device) -> int:
    """--unet_bs when none is given: 1, the least device memory, except on the CPU, where nothing is
    offloaded and an image's conditional and unconditional latents in one batch of 2 take less CPU
    time through the UNet than one at a time (README, CPU speed), for a little more host memory."""
    return 2 if device.type == "cpu" else 1


def channels_last(device: torch.device) -> bool:
    """Whether the UNet and VAE run channels-last on `device`: on the CPU, their convolutions (and
    everything after them, which keeps the format) take less time with weights (`Engine.load`) and
    inputs (`Pipeline._layout`) channels-last (README, CPU speed)."""
    return device.type == "cpu"


def pick_device(name: str | None) -> torch.device:
    """--device, or the best available: cuda, then mps, then cpu."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class SampleSettings:
    sampler: str = "ddim"
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    karras: bool = False  # Karras et al. 2022 sigmas (k-samplers only)


class Pipeline:
    def __init__(self, cfg: SDConfig, engine: Offloader, dtype: torch.dtype = torch.float32, unet_bs: int = 1,
                 tile: bool = False, long_prompts: bool = False, precision: str = "autocast",
                 tokenizer=None):
        self.cfg = cfg
        self.engine = engine
        self.device = engine.device
        self.dtype = dtype  # the fragments' weights (`weight_dtype`)
        # fp32 arithmetic from half-precision weights (`PRECISIONS`); with fp32 weights nothing to do
        self.upcast = PRECISIONS[precision].upcast and dtype != torch.float32
        self.unet_bs = max(1, int(unet_bs))
        self.tile = tile  # encode and decode in overlapping tiles (tiling.py), for large images on little memory
        self.long_prompts = long_prompts  # encode prompts whole in 75-token chunks, not cut at 75 (conditioning)
        # per request (Engine): "webui" reads emphasis, editing, BREAK (engine/conditioning.py); "plain" as written
        self.prompt_syntax, self.clip_skip, self.pad_conds = "plain", 1, False
        self.tokenizer = tokenizer  # None: the shared CLIP tokenizer; embeddings.TextualInversion gives one with its words
        self.redone_in_fp32 = 0  # images whose fp16 decode overflowed and was redone in fp32
        self.redone_in_upcast = 0  # UNet evaluations whose fp16 output overflowed and were redone in upcast
        self.unet_evaluations = 0  # passes of a batch through the UNet (`_unet`), redos included
        self._posterior = None  # (image, mean, std) of the last image encoded (`encode`)
        self.control = None  # engine/control.py's Control of the ControlNets of this render, or None
        self.schedule = self.schedule_of(cfg)

    @staticmethod
    def schedule_of(cfg: SDConfig) -> Schedule:
        return Schedule(cfg.linear_start, cfg.linear_end, cfg.timesteps)

    def _compute_dtype(self, upcast: bool) -> torch.dtype:
        return torch.float32 if upcast else self.dtype

    def _compute(self, upcast: bool):
        """The arithmetic of the precision: fp32 from the weights (upcast), CUDA autocast with fp16
        weights, or plainly the weights' dtype."""
        if upcast:
            return UpcastMode()
        if self.dtype == torch.float16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ---- text -------------------------------------------------------------------------------
    def conditioning(self, prompts: list[str]) -> torch.Tensor:
        """Prompts (weighted sub-prompts allowed) -> CLIP hidden states (N, 77 * K, hidden), fp32, on device.

        K = 1 by default: each text is cut to 75 tokens (with a logged warning), as the reference SD v1
        pipeline does. With `long_prompts`, each text is encoded whole in K 77-position chunks of 75
        tokens (`ClipTokenizer.chunks`), each chunk on its own, and a text's chunk states are laid side by
        side on the token axis; the texts of one call are padded with empty chunks to the same K.
        """
        parsed = [parse_weighted(p) for p in prompts]
        texts = sorted({text for parts in parsed for text, _ in parts})
        tokenizer = self.tokenizer or get_tokenizer()
        rows = tokenizer.chunks(texts) if self.long_prompts else tokenizer(texts)[:, None]  # (T, K, 77)
        tokens = rows.flatten(0, 1).to(self.device)  # (T * K, 77): one encoder row per chunk
        states = self._encode(tokens)  # (T * K, 77, hidden)
        hidden = dict(zip(texts, states.reshape(len(texts), -1, states.shape[-1])))  # text -> (K * 77, hidden)
        out = []
        for parts in parsed:
            c = torch.zeros_like(hidden[parts[0][0]])
            for text, weight in parts:
                c = c + weight * hidden[text]
            out.append(c)
        return torch.stack(out)

    @record_function("optimizedSD::text")  # a phase of its own in bench.py --profile-ops
    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token rows (R, 77) -> fp32 hidden states (R, 77, hidden) at `clip_skip`; the layers it does not
        run stay on the host."""
        encoder = self.engine.fragments[TEXT_ENCODER]
        leave = tuple(text_layer_unit(i) for i in encoder.skipped_layers(self.clip_skip))
        with self.engine.phase("text", leave), self.engine.use(TEXT_ENCODER, leave) as encoder, \
                self._compute(self.upcast):
            return encoder(tokens.to(self.device), self.clip_skip).float()

    def prompt_pair(self, prompt: str, negative_prompt: str, settings: SampleSettings | None = None):
        """(cond, uncond) of one prompt and its negative: (tokens, hidden) tensors, or `conditioning.Scheduled`
        when the webui syntax edits or alternates them over the steps of `settings`."""
        if self.prompt_syntax != "webui":
            context = self.conditioning([prompt, negative_prompt])
            return context[0], context[1]
        steps = schedule_steps(settings.steps, settings.sampler) if settings else 1
        cond, uncond = encode_pair(prompt, negative_prompt, steps, self.tokenizer or get_tokenizer(), self._encode,
                                   pad_conds=self.pad_conds)
        if cond.constant and uncond.constant:
            return cond.states[0], uncond.states[0]
        return cond, uncond

    # ---- UNet -------------------------------------------------------------------------------
    def eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Noise prediction for a batch (`_unet`). In fp16 arithmetic, an output with NaN/inf (fp16
        overflow) is computed again in upcast (fp32 arithmetic, same fp16 weights) and counted."""
        eps = self._unet(x, t, context, self.upcast)
        if self.dtype != torch.float32 and not self.upcast and not eps.is_meta and not torch.isfinite(eps).all():
            eps = self._unet(x, t, context, upcast=True)
            self.redone_in_upcast += 1
        return eps

    @record_function("optimizedSD::unet")  # a phase of its own in bench.py --profile-ops
    def _unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, upcast: bool) -> torch.Tensor:
        """The UNet on a batch (N, C, h, w), cut in chunks of `unet_bs` rows, block-major: each block
        runs on every chunk before the next block, so a streamed block is on the device once per
        evaluation. Every chunk's activations between blocks (its skip connections) are kept."""
        self.unet_evaluations += 1
        dtype = self._compute_dtype(upcast)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        # the dtype autocast would feed the fp16 projections; fp32 in upcast and full precision
        x, context = self._layout(x.to(dtype)), context.to(dtype)
        chunks = [Carry(x[i:i + self.unet_bs], context[i:i + self.unet_bs], t[i:i + self.unet_bs])
                  for i in range(0, x.shape[0], self.unet_bs)]
        control = self.control
        if control is not None:  # the ControlNets acting now (engine/control.py), run before the blocks they mirror
            control.evaluation(x, t, context, chunks, self.unet_bs)
        with self._compute(upcast):
            for half in UNET_HALVES:
                with self.engine.use(half, with_controls=control is not None and half == UNET_IN) as unet:
                    for name, step in unet.steps():
                        block = block_started(name) if control is not None and half == UNET_IN else None
                        for unit, run in control.steps_for(block) if block is not None else ():
                            with self.engine.block(unit):
                                run()
                        with self.engine.block(f"{half}.{name}"):
                            for chunk in chunks:
                                step(chunk)
        if control is not None:
            control.end_evaluation()
        return torch.cat([chunk.h for chunk in chunks]).float()

    def _eps_with(self, concat: torch.Tensor):
        """`eps` of a UNet that takes extra input channels (9-channel inpainting: mask and masked-image
        latents): `concat` (B, k, h, w) goes after each row's latents, repeated for the guidance rows."""
        def eps(x, t, context):
            extra = concat.to(x.device, x.dtype).repeat(x.shape[0] // concat.shape[0], 1, 1, 1)
            return self.eps(torch.cat([x, extra], dim=1), t, context)
        return eps

    # ---- sampling ---------------------------------------------------------------------------
    def sample(self, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor,
               generators: list[torch.Generator], settings: SampleSettings, callback=None, *,
               init: torch.Tensor | None = None, strength: float = 1.0, keep: torch.Tensor | None = None,
               concat: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (B, C, h, w) from noise (B, C, h, w) drawn at unit scale.

        txt2img: from pure noise. With `init` latents and `strength` < 1 (img2img, SDEdit): the walk
        is the plan's last `strength_steps` steps, from x = init + sigma * noise at the first of them;
        strength 1 starts from pure noise. `keep` (1 where the latents are known, else 0; needs
        `init`) inpaints with a plain model (`KnownRegion`); `concat` is a 9-channel inpainting
        UNet's extra input (`_eps_with`).
        """
        if settings.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {settings.sampler!r}; choose one of {sorted(SAMPLERS)}")
        plan = make_plan(self.schedule, settings.sampler, settings.steps, karras=settings.karras)
        walked = strength_steps(plan.steps, strength)
        if walked == 0:
            raise ValueError(f"strength {strength} of {plan.steps} steps walks no step; raise the strength or the steps")
        sigmas = plan.sigmas[plan.steps - walked:]
        noise = noise.to(self.device, torch.float32)
        if init is not None:
            init = init.to(self.device, torch.float32)
        x = noise * plan.init_scale if init is None or walked == plan.steps else init + float(sigmas[0]) * noise
        denoiser = EpsDenoiser(self.eps if concat is None else self._eps_with(concat), self.schedule)
        if keep is not None:
            keep = keep.to(self.device, torch.float32)
            denoiser = KnownRegion(denoiser, keep, init, noise, float(sigmas[0]))

        def noise_sampler(sigma, sigma_next):
            return torch.cat([torch.randn((1, *noise.shape[1:]), generator=g) for g in generators]).to(self.device)

        extra = dict(cond=cond, uncond=uncond, scale=settings.scale)
        if self.control is not None:  # the walked steps, for the nets' start/end windows
            self.control.begin(self.schedule.t_for_sigma(sigmas[:-1]), guided=uncond is not None and settings.scale != 1.0)
        kwargs = {"noise_sampler": noise_sampler} if takes_noise(settings.sampler) else {}
        if settings.sampler == "ddim":
            kwargs["eta"] = settings.eta
        if settings.sampler == "lcm":  # its boundary conditions take the DDPM timesteps walked
            kwargs["timesteps"] = self.schedule.t_for_sigma(sigmas[:-1]).tolist()
        if isinstance(cond, Scheduled) or isinstance(uncond, Scheduled):  # prompt editing: per evaluation
            cond, uncond = (c if c is None or isinstance(c, Scheduled) else Scheduled([0], [c[0]]) for c in (cond, uncond))
            denoiser = StepConditioned(denoiser, cond, uncond, x.shape[0], self.device)
            extra.update((k, None if c is None else c.at(0).to(self.device).expand(x.shape[0], -1, -1))
                         for k, c in (("cond", cond), ("uncond", uncond)))
        with self.engine.phase("sample"):
            x = SAMPLERS[settings.sampler](denoiser, x, sigmas, extra_args=extra, callback=callback, **kwargs)
        latent = plan.to_latent(x)
        return latent if keep is None else keep * init + (1 - keep) * latent

    # ---- VAE --------------------------------------------------------------------------------
    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """A UNet or VAE input in the memory format it runs fastest in here (`channels_last`)."""
        return x.contiguous(memory_format=torch.channels_last) if channels_last(self.device) else x

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in about [-1, 1], fp32, decoded one at a
        time, in tiles when `self.tile`; an fp16 decode that overflows is redone in fp32."""
        images = []
        tile = TILE if self.tile else None
        dtype = self._compute_dtype(self.upcast)
        # tiled (the low-memory VAE): the decoder's parts visit the device one at a time (`Offloader.use`)
        with self.engine.phase("decode", leave=(VAE_DECODER,) if self.tile else ()), \
                self.engine.use(VAE_DECODER, parts=self.tile) as vae, \
                self._compute(self.upcast), record_function("optimizedSD::decode"):
            for z in latents.split(1):
                z = self._layout((z / self.cfg.scale_factor).to(self.device))
                if self.device.type == "meta":  # planning: no values to check for overflow
                    image = vae.decode(z.to(dtype)) if tile is None else decode_tiled(vae, z.to(dtype), tile)
                else:
                    image, redone = decode_safe(vae, z, tile, dtype=dtype)
                    self.redone_in_fp32 += redone
                images.append(image.float())
        return torch.cat(images)

    def safety_flags(self, pixels: torch.Tensor) -> list[bool]:
        """Which of the images whose checker inputs are `pixels` (B, 3, S, S) (`model.safety.pixel_values`,
        on the host) the safety checker flags. The checker is one unit (`model.safety.SAFETY`), on the
        device only in its own phase, after the VAE has left it, in every memory mode (never resident)."""
        from ..model.safety import SAFETY, flags

        with self.engine.phase("safety"), self.engine.use(SAFETY) as checker, self._compute(self.upcast):
            special, cos = checker(pixels.to(self.device, self._compute_dtype(self.upcast)))
        if special.is_meta:  # planning: no values
            return [False] * pixels.shape[0]
        return flags(special, cos, checker.special_care_embeds_weights.tolist(), checker.concept_embeds_weights.tolist())

    def encode(self, image: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One image (1, 3, H, W) in [-1, 1] -> scaled latents (len(generators), C, H/f, W/f): for each
        generator a sample of the VAE encoder's posterior, mean + std * randn drawn from it on the
        CPU (the reference's `latent_dist.sample(generator)`), times the latent scale. The encoder
        runs (in tiles when `self.tile`) once per image: the posterior is kept, on the host, for the
        run's later batches of the same image tensor."""
        if self._posterior is None or self._posterior[0] is not image:
            with self.engine.phase("encode"), self.engine.use(VAE_ENCODER) as vae, self._compute(self.upcast):
                x = self._layout(image.to(self.device, self._compute_dtype(self.upcast)))
                moments = encode_tiled(vae, x, self.cfg.downsample_factor, TILE) if self.tile else vae.encode(x)
                # to the host (planning: the same placement, no values)
                mean, logvar = (torch.zeros(m.shape) if m.is_meta else m.float().cpu() for m in moments)
            self._posterior = (image, mean, (0.5 * logvar).exp())
        _, mean, std = self._posterior
        draws = torch.cat([torch.randn(mean.shape, generator=g) for g in generators])
        return ((mean + std * draws) * self.cfg.scale_factor).to(self.device)

    def _start(self, prompt: str, negative_prompt: str, seeds: list[int], settings: SampleSettings | None = None):
        """(cond, uncond) expanded to the batch (or `Scheduled`, `prompt_pair`), and image i's CPU generator
        seeded `seeds[i]`."""
        cond, uncond = self.prompt_pair(prompt, negative_prompt, settings)
        n = len(seeds)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        cond, uncond = (c if isinstance(c, Scheduled) else c[None].expand(n, -1, -1) for c in (cond, uncond))
        return cond, uncond, generators

    def _noise(self, generators, shape, fixed_noise: torch.Tensor | None) -> torch.Tensor:
        """Each image's next draw of unit noise of `shape` (1, C, h, w), or `fixed_noise` for all."""
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators])
        return noise if fixed_noise is None else fixed_noise.expand_as(noise).clone()

    def txt2img_latents(self, prompt: str, negative_prompt: str, seeds: list[int], height: int, width: int,
                        settings: SampleSettings, fixed_noise: torch.Tensor | None = None,
                        callback=None) -> torch.Tensor:
        """Latents (len(seeds), C, H/f, W/f) for one prompt, image i seeded `seeds[i]`; `decode` makes
        them images."""
        f = self.cfg.downsample_factor
        cond, uncond, generators = self._start(prompt, negative_prompt, seeds, settings)
        noise = self._noise(generators, (1, self.cfg.channels, height // f, width // f), fixed_noise)
        return self.sample(cond, uncond, noise, generators, settings, callback)

    def img2img_latents(self, prompt: str, negative_prompt: str, seeds: list[int], image: torch.Tensor,
                        settings: SampleSettings, strength: float, fixed_noise: torch.Tensor | None = None,
                        callback=None) -> torch.Tensor:
        """SDEdit img2img from `image` (1, 3, H, W) in [-1, 1], as diffusers' StableDiffusionImg2ImgPipeline:
        image i's generator first draws the posterior sample (`encode`), then the noise."""
        cond, uncond, generators = self._start(prompt, negative_prompt, seeds, settings)
        init = self.encode(image, generators)
        noise = self._noise(generators, (1, *init.shape[1:]), fixed_noise)
        return self.sample(cond, uncond, noise, generators, settings, callback, init=init, strength=strength)

    def inpaint_latents(self, prompt: str, negative_prompt: str, seeds: list[int], image: torch.Tensor,
                        mask: torch.Tensor, settings: SampleSettings, strength: float = 1.0,
                        fixed_noise: torch.Tensor | None = None, callback=None) -> torch.Tensor:
        """Repaint where `mask` (1, 1, H, W) is 1 (0 elsewhere) in `image` (1, 3, H, W) in [-1, 1], as
        diffusers' StableDiffusionInpaintPipeline: the latent mask is the mask's nearest-neighbour
        resize. A plain 4-channel UNet keeps the rest on the known latents (`KnownRegion`); a
        9-channel one takes the mask and the latents of the masked image (`image` where mask is 0)
        as extra input. Each image's generator draws, in this order: the posterior sample of the
        image (for 4 channels, or strength < 1), the noise, the posterior sample of the masked image
        (9 channels). The caller pastes the unmasked pixels back after decoding."""
        f = self.cfg.downsample_factor
        cond, uncond, generators = self._start(prompt, negative_prompt, seeds, settings)
        latent_mask = F.interpolate(mask.float(), size=(image.shape[2] // f, image.shape[3] // f))
        nine = self.cfg.unet.in_channels == self.cfg.channels * 2 + 1
        init = self.encode(image, generators) if not nine or strength < 1 else None
        noise = self._noise(generators, (1, self.cfg.channels, *latent_mask.shape[2:]), fixed_noise)
        if not nine:
            return self.sample(cond, uncond, noise, generators, settings, callback, init=init, strength=strength,
                               keep=1 - latent_mask)
        masked = self.encode(image * (mask < 0.5), generators)
        concat = torch.cat([latent_mask.to(masked.device).expand(len(seeds), -1, -1, -1), masked], dim=1)
        return self.sample(cond, uncond, noise, generators, settings, callback, init=init, strength=strength,
                           concat=concat)

    def txt2img(self, prompt: str, negative_prompt: str, seeds: list[int], height: int, width: int,
                settings: SampleSettings, fixed_noise: torch.Tensor | None = None, callback=None) -> torch.Tensor:
        """Images (len(seeds), 3, H, W) in about [-1, 1] for one prompt; image i is seeded `seeds[i]`."""
        return self.decode(self.txt2img_latents(prompt, negative_prompt, seeds, height, width, settings,
                                                fixed_noise, callback))
