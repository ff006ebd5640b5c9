"""Text (and later image) to image on the four fragments: conditioning -> sampling -> decoding.

The pipeline owns no weights' placement: every fragment call goes through the `Offloader`.
Randomness is drawn on the CPU from one generator per image (`seed + i`), so one seed gives one
image whatever the device, batch size or `unet_bs`.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .config import SDConfig
from .fragments import TEXT_ENCODER, UNET_IN, UNET_OUT, VAE
from .offload import Offloader
from .prompts import parse_weighted
from .samplers import SAMPLERS, EpsDenoiser, Schedule, make_plan, takes_noise
from .tiling import decode_safe, decode_tiled
from .tokenizer import get_tokenizer

TILE = 64  # latent pixels per side of a decode tile (512 image pixels), overlapping by 16

# Precision policy, in one place: which dtype the fragments' weights take on each device.
# "autocast" means fp16 weights and torch.autocast on CUDA; everything else computes in fp32.
PRECISIONS = ("autocast", "full")


def weight_dtype(device: torch.device, precision: str) -> torch.dtype:
    """fp16 for autocast on CUDA and on `meta` (which plans a CUDA run); fp32 otherwise."""
    return torch.float16 if precision == "autocast" and device.type in ("cuda", "meta") else torch.float32


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
                 tile: bool = False):
        self.cfg = cfg
        self.engine = engine
        self.device = engine.device
        self.dtype = dtype
        self.unet_bs = max(1, int(unet_bs))
        self.tile = tile  # decode in overlapping tiles (tiling.py), for large images on little memory
        self.redone_in_fp32 = 0  # images whose fp16 decode overflowed and was redone in fp32
        self.schedule = self.schedule_of(cfg)

    @staticmethod
    def schedule_of(cfg: SDConfig) -> Schedule:
        return Schedule(cfg.linear_start, cfg.linear_end, cfg.timesteps)

    def _autocast(self):
        if self.dtype == torch.float16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    # ---- text -------------------------------------------------------------------------------
    def conditioning(self, prompts: list[str]) -> torch.Tensor:
        """Prompts (weighted sub-prompts allowed) -> CLIP hidden states (N, 77, hidden), fp32, on device."""
        parsed = [parse_weighted(p) for p in prompts]
        texts = sorted({text for parts in parsed for text, _ in parts})
        tokens = get_tokenizer()(texts).to(self.device)
        with self.engine.phase("text"), self.engine.use(TEXT_ENCODER) as encoder, self._autocast():
            hidden = dict(zip(texts, encoder(tokens).float()))
        out = []
        for parts in parsed:
            c = torch.zeros_like(hidden[parts[0][0]])
            for text, weight in parts:
                c = c + weight * hidden[text]
            out.append(c)
        return torch.stack(out)

    # ---- UNet -------------------------------------------------------------------------------
    def eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Noise prediction for a batch, `unet_bs` rows at a time through each half in turn."""
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        context = context.to(self.dtype)  # what autocast would feed the fp16 projections; a no-op in fp32
        chunks = range(0, x.shape[0], self.unet_bs)
        with self._autocast():
            with self.engine.use(UNET_IN) as unet_in:
                mids = [unet_in(x[i:i + self.unet_bs], t[i:i + self.unet_bs], context[i:i + self.unet_bs])
                        for i in chunks]
            with self.engine.use(UNET_OUT) as unet_out:
                outs = [unet_out(h, emb, skips, context[i:i + self.unet_bs])
                        for i, (h, emb, skips) in zip(chunks, mids)]
        return torch.cat(outs).float()

    # ---- sampling ---------------------------------------------------------------------------
    def sample(self, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor,
               generators: list[torch.Generator], settings: SampleSettings, callback=None) -> torch.Tensor:
        """Latents (B, C, h, w) from starting noise (B, C, h, w) drawn at unit scale."""
        if settings.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {settings.sampler!r}; choose one of {sorted(SAMPLERS)}")
        denoiser = EpsDenoiser(self.eps, self.schedule)
        plan = make_plan(self.schedule, settings.sampler, settings.steps, karras=settings.karras)
        x = noise.to(self.device, torch.float32) * plan.init_scale

        def noise_sampler(sigma, sigma_next):
            return torch.cat([torch.randn((1, *noise.shape[1:]), generator=g) for g in generators]).to(self.device)

        extra = dict(cond=cond, uncond=uncond, scale=settings.scale)
        kwargs = {"noise_sampler": noise_sampler} if takes_noise(settings.sampler) else {}
        if settings.sampler == "ddim":
            kwargs["eta"] = settings.eta
        with self.engine.phase("sample"):
            x = SAMPLERS[settings.sampler](denoiser, x, plan.sigmas, extra_args=extra, callback=callback, **kwargs)
        return plan.to_latent(x)

    # ---- VAE --------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in about [-1, 1], fp32, decoded one at a
        time, in tiles when `self.tile`; an fp16 decode that overflows is redone in fp32."""
        images = []
        tile = TILE if self.tile else None
        with self.engine.phase("decode"), self.engine.use(VAE) as vae, self._autocast():
            for z in latents.split(1):
                z = (z / self.cfg.scale_factor).to(self.device)
                if self.device.type == "meta":  # planning: no values to check for overflow
                    image = vae.decode(z.to(self.dtype)) if tile is None else decode_tiled(vae, z.to(self.dtype), tile)
                else:
                    image, redone = decode_safe(vae, z, tile)
                    self.redone_in_fp32 += redone
                images.append(image.float())
        return torch.cat(images)

    def txt2img_latents(self, prompt: str, negative_prompt: str, seeds: list[int], height: int, width: int,
                settings: SampleSettings, fixed_noise: torch.Tensor | None = None, callback=None) -> torch.Tensor:
        """Latents (len(seeds), C, H/f, W/f) for one prompt, image i seeded `seeds[i]`; `decode` makes
        them images."""
        f, c = self.cfg.downsample_factor, self.cfg.channels
        shape = (1, c, height // f, width // f)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators])
        if fixed_noise is not None:
            noise = fixed_noise.expand_as(noise).clone()
        context = self.conditioning([prompt, negative_prompt])
        n = len(seeds)
        cond, uncond = context[:1].expand(n, -1, -1), context[1:].expand(n, -1, -1)
        return self.sample(cond, uncond, noise, generators, settings, callback)

    def txt2img(self, prompt: str, negative_prompt: str, seeds: list[int], height: int, width: int,
                settings: SampleSettings, fixed_noise: torch.Tensor | None = None, callback=None) -> torch.Tensor:
        """Images (len(seeds), 3, H, W) in about [-1, 1] for one prompt; image i is seeded `seeds[i]`."""
        return self.decode(self.txt2img_latents(prompt, negative_prompt, seeds, height, width, settings,
                                                fixed_noise, callback))
