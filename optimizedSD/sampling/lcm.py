"""Latent Consistency Model sampling (Luo et al. 2023, "Latent Consistency Models: Synthesizing
High-Resolution Images with Few-Step Inference", arXiv 2310.04378, Algorithm 1 "multistep latent
consistency sampling"), as diffusers' `LCMScheduler` runs it; for LCM-distilled weights such as an
LCM-LoRA (arXiv 2311.05556) on SD 1.5, which give usable images in 4-8 steps at cfg 1-2.

The schedule (`lcm_timesteps`): the distillation's "skipping-step" DDPM timesteps of the original
SD 1.5 schedule, `original_steps` = 50 of them, k = 1000 // 50 = 20 apart: 999, 979, ..., 19; a run of
n steps takes n of those, evenly spaced in index (`floor(linspace(0, 50, n, endpoint=False))`:
4 steps -> 999, 759, 499, 259).

A step at timestep t (alpha = alphas_cumprod[t]), in the sigma space of `samplers.py`
(x = x_t / sqrt(alpha) = x0 + sigma eps):

    x0      = denoise(x, sigma)                          # the model's x0 (eps prediction, guided)
    x_t     = x / sqrt(1 + sigma^2)
    D       = c_out(t) x0 + c_skip(t) x_t                # the consistency function's boundary condition
    x_next  = D + sigma_next z,  z ~ N(0, I)             # noise re-injected: alpha_next's x_t, / sqrt(alpha_next)

with c_skip = s_d^2 / ((10 t)^2 + s_d^2), c_out = 10 t / sqrt((10 t)^2 + s_d^2), s_d = 0.5
(`timestep_scaling` 10). The last step lands on D itself (sigma_next = 0, no noise). The sampler
starts from x_T = noise at t = 999 (diffusers' init_noise_sigma = 1, like CompVis' DDIM), so its plan's
init_scale is sqrt(1 + sigma_max^2) and its final_scale 1 (`samplers.make_plan`).

Imports nothing of the other sampling modules (`samplers.py` registers this one).
"""
from __future__ import annotations

import math

import torch

ORIGINAL_STEPS = 50  # diffusers' LCMScheduler `original_inference_steps`: the distillation's schedule
TIMESTEP_SCALING = 10.0  # its `timestep_scaling`
SIGMA_DATA = 0.5  # the consistency models' sigma_data


def lcm_timesteps(steps: int, timesteps: int = 1000, original_steps: int = ORIGINAL_STEPS) -> list[int]:
    """The descending DDPM timesteps of an n-step LCM run (diffusers' `LCMScheduler.set_timesteps`,
    strength 1): `steps` of the `original_steps` skipping-step timesteps, evenly spaced in index."""
    if not 1 <= steps <= original_steps:
        raise ValueError(f"lcm takes 1 to {original_steps} steps (its distillation schedule), got {steps}")
    k = timesteps // original_steps
    origin = [(i + 1) * k - 1 for i in range(original_steps)][::-1]  # 999, 979, ..., 19
    return [origin[math.floor(j * original_steps / steps)] for j in range(steps)]


def boundary_scalings(t: float) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency function at DDPM timestep t (LCM's discrete boundary condition)."""
    scaled = t * TIMESTEP_SCALING
    return SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2), scaled / math.sqrt(scaled ** 2 + SIGMA_DATA ** 2)


def _sd_v1_timestep(sigma: float) -> float:
    """The DDPM timestep of `sigma` on SD v1's linear schedule (0.00085..0.012, 1000 steps), nearest
    entry: the fallback when the caller gives no `timesteps` (a plan of this module's schedule)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - a) / a).sqrt()
    return float((sigmas.log() - math.log(sigma)).abs().argmin())


@torch.no_grad()
def sample_lcm(denoise, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None, callback=None,
               noise_sampler=None, timesteps=None) -> torch.Tensor:
    """Multistep LCM sampling (module docstring). `sigmas`: the plan's descending sigmas of the LCM
    timesteps, then 0. `timesteps`: the DDPM timesteps of sigmas[:-1] (the pipeline gives its
    schedule's; None: SD v1's, looked up). `noise_sampler(sigma, sigma_next) -> z` is called once per
    step but the last (default: a CPU generator seeded 0 per call). The callback's `denoised` is D."""
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        generator = torch.Generator("cpu").manual_seed(0)
        noise_sampler = lambda sigma, sigma_next: torch.randn(x.shape, generator=generator).to(x.device, x.dtype)  # noqa: E731
    s = sigmas.tolist()
    ts = [float(t) for t in timesteps] if timesteps is not None else [_sd_v1_timestep(v) for v in s[:-1]]
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(s) - 1):
        x0 = denoise(x, sigmas[i] * s_in, **extra_args)
        c_skip, c_out = boundary_scalings(ts[i])
        d = c_out * x0 + c_skip * x / math.sqrt(1 + s[i] ** 2)
        if callback is not None:
            callback(dict(x=x, i=i, sigma=sigmas[i], denoised=d))
        x = d if s[i + 1] == 0 else d + s[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x
