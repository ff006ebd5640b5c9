"""Noise schedule, denoiser wrapper and samplers (DDIM, PLMS) for Stable Diffusion v1.

Everything here works in k-diffusion's "sigma space" (Karras et al. 2022): a DDPM state x_t at
noise level alpha_t (alphas_cumprod) is represented as

    x = x_t / sqrt(alpha_t),   sigma = sqrt((1 - alpha_t) / alpha_t),   so  x = x0 + sigma * eps.

A sampler is a free function with one signature (k-diffusion `sampling.py`):

    sample_x(denoise, x, sigmas, extra_args=None, callback=None, **options) -> x

where `denoise(x, sigma, **extra_args) -> x0` is the model seen as a denoiser. `EpsDenoiser` makes
one from the UNet's eps prediction and does classifier-free guidance; samplers never see the model.

How a pipeline drives it:

    schedule = Schedule(cfg.linear_start, cfg.linear_end, cfg.timesteps)
    denoise = EpsDenoiser(unet_eps, schedule)     # unet_eps(x_t, t, context) -> eps
    plan = make_plan(schedule, "ddim", steps)     # sigmas + start/end conversions
    x = noise * plan.init_scale                   # noise ~ N(0, I), shape (B, 4, H/8, W/8)
    x = SAMPLERS["ddim"](denoise, x, plan.sigmas,
                         extra_args=dict(cond=c, uncond=uc, scale=7.5), callback=cb, eta=0.0)
    latent = plan.to_latent(x)                    # then / LATENT_SCALE and the VAE decoder

The k-diffusion samplers of `ksamplers.py` (euler, euler_a, heun, dpm2, dpm2_a, lms, dpmpp_2m,
dpmpp_2s_a, dpmpp_sde) share the signature and are in `SAMPLERS` too. Their plan walks the
model's own "discrete" sigmas (k-diffusion `get_sigmas`, diffusers' schedulers with
timestep_spacing="linspace"), or Karras et al. 2022's (`make_plan(..., karras=True)`), down to 0,
and starts, as k-diffusion, from x = noise * sigma_max.

For DDIM and PLMS the plan reproduces CompVis `DDIMSampler`/`PLMSSampler` exactly:
- the timesteps are CompVis' "uniform" ones, `range(0, 1000, 1000 // steps) + 1`; when `steps`
  does not divide 1000 this gives more steps than asked (30 -> 31), as the reference does;
- CompVis starts from x_T = noise, i.e. x = noise * sqrt(1 + sigma_max**2) (`init_scale`);
- CompVis' last step lands on alpha = alphas_cumprod[0] (~0.99915), not on alpha = 1, and returns
  that x_t undenoised. So the DDIM sigmas end with sigma(t=0) ~ 0.0292 instead of k-diffusion's 0,
  and `to_latent` maps x back to x_t: x_t = x / sqrt(1 + sigmas[-1]**2). Samplers whose sigmas end
  at 0 (k-diffusion style) use the same `to_latent`, which is then the identity.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .ksamplers import KSAMPLERS, ancestral_step, default_noise_sampler, karras_sigmas
from .lcm import lcm_timesteps, sample_lcm

Denoiser = Callable[..., torch.Tensor]  # denoise(x, sigma, **extra_args) -> x0


# --- schedule --------------------------------------------------------------------------------------

class Schedule:
    """SD v1's DDPM "linear" schedule (CompVis `make_beta_schedule`), as alphas and sigmas.

    `alphas_cumprod` and `sigmas` are float64 on the CPU, indexed by the DDPM timestep 0..T-1.
    """

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.012,
                 timesteps: int = 1000):
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps,
                               dtype=torch.float64) ** 2
        self.timesteps = timesteps
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,) float64
        self.sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # (T,) increasing
        self.log_sigmas = self.sigmas.log()

    def ddim_timesteps(self, steps: int) -> list[int]:
        """CompVis `make_ddim_timesteps(method="uniform")`: ascending DDPM timesteps, offset by 1.

        Where the reference would index past the schedule (range(0, 1000, c) ending at 999, e.g.
        steps 3, 9, 27: timestep 1000, an IndexError in CompVis), that one step is dropped.
        """
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in 1..{self.timesteps}, got {steps}")
        c = self.timesteps // steps
        return [t + 1 for t in range(0, self.timesteps, c) if t + 1 < self.timesteps]

    def ddim_sigmas(self, steps: int) -> torch.Tensor:
        """Descending float32 sigmas of `ddim_timesteps(steps)`, then sigma(t=0).

        The final entry is where CompVis' last DDIM/PLMS step lands (alphas_prev[0] =
        alphas_cumprod[0]); it is ~0.0292, not 0. Length: len(ddim_timesteps(steps)) + 1.
        """
        ts = self.ddim_timesteps(steps)
        return self.sigmas[list(reversed(ts)) + [0]].to(torch.float32)

    def discrete_sigmas(self, steps: int) -> torch.Tensor:
        """The k-samplers' schedule: sigmas of `steps` timesteps evenly spaced from T-1 down to 0
        (fractional ones log-interpolated, `sigma_for_t`), then 0. float32 (steps + 1,).

        k-diffusion's `DiscreteSchedule.get_sigmas`; diffusers' Euler/Heun/LMS/KDPM2 schedulers
        with timestep_spacing="linspace" (which ignores steps_offset) give the same timesteps. SD v1's
        "leading" spacing would start below T-1 (t = 901 for 10 steps) and make Karras' sigma_max
        depend on the step count; "linspace" starts at the model's sigma_max, as k-diffusion.
        """
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in 1..{self.timesteps}, got {steps}")
        t = torch.linspace(self.timesteps - 1, 0, steps, dtype=torch.float64)
        return torch.cat([self.sigma_for_t(t), torch.zeros(1)])

    def sigma_for_t(self, t) -> torch.Tensor:
        """Sigma of a (possibly fractional) timestep; log-sigma is interpolated between integers
        (k-diffusion `t_to_sigma`). Integer t gives the table entry. float32, on t's device."""
        t = torch.as_tensor(t)
        device = t.device
        t = t.detach().to("cpu", torch.float64).clamp(0, self.timesteps - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp().to(device, torch.float32)

    def t_for_sigma(self, sigma) -> torch.Tensor:
        """DDPM timestep of a sigma, float32 on sigma's device, same shape.

        A sigma equal to a table entry (to float32 precision, relative 1e-5; neighbouring entries
        differ by >= 0.6%) gives that integer exactly, so the UNet's timestep embedding is the
        reference's. Other sigmas are interpolated in log-sigma (k-diffusion `sigma_to_t`) and
        clamped to [0, T-1]. Computed in float32 on the device (MPS has no float64).
        """
        sigma = torch.as_tensor(sigma)
        if not sigma.is_floating_point():
            sigma = sigma.float()
        log_sigmas = self.log_sigmas.to(sigma.device, torch.float32)  # (T,)
        log_sigma = sigma.detach().to(torch.float32).log()
        dists = log_sigma.reshape(-1, 1) - log_sigmas  # (N, T)
        # interpolation (k-diffusion sigma_to_t): last table entry <= sigma, and the next one
        low_idx = dists.ge(0).cumsum(dim=1).argmax(dim=1).clamp(max=len(log_sigmas) - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma.reshape(-1)) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        # exact table entries snap to their integer
        nearest = dists.abs().argmin(dim=1)
        exact = dists.gather(1, nearest[:, None])[:, 0].abs() < 1e-5
        t = torch.where(exact, nearest.to(t.dtype), t)
        return t.reshape(sigma.shape)


def to_sigma_space(x_t: torch.Tensor, sigma) -> torch.Tensor:
    """CompVis state x_t at noise level sigma -> x = x_t / sqrt(alpha) = x_t * sqrt(1 + sigma^2)."""
    return x_t * math.sqrt(1.0 + float(sigma) ** 2)


def from_sigma_space(x: torch.Tensor, sigma) -> torch.Tensor:
    """Inverse of `to_sigma_space`: x_t = x * sqrt(alpha) = x / sqrt(1 + sigma^2)."""
    return x / math.sqrt(1.0 + float(sigma) ** 2)


# --- denoiser --------------------------------------------------------------------------------------

class EpsDenoiser:
    """Turns an eps-prediction model into `denoise(x, sigma, cond, uncond=None, scale=1.) -> x0`.

    `eps_fn(x_t, t, context) -> eps` is the UNet: x_t (N, C, H, W), t (N,) float32 DDPM timesteps
    (exact integers for the DDIM/PLMS schedules), context (N, tokens, dim); uncond has cond's
    shape (or, prompts of other chunk counts, another token count: then the model runs on each apart).
    x may be sigma-space latents of any dtype; x0 comes back in it. k-diffusion
    `external.DiscreteEpsDDPMDenoiser` plus CompVis' classifier-free guidance: with `scale > 1`
    and an `uncond`, the model runs once on cat([uncond, cond]) (uncond first, as CompVis) and
    eps = eps_u + scale * (eps_c - eps_u); otherwise (scale <= 1, as diffusers'
    `do_classifier_free_guidance = guidance_scale > 1`) once on cond alone: half the UNet work.
    """

    def __init__(self, eps_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 schedule: Schedule):
        self.eps_fn = eps_fn
        self.schedule = schedule

    def __call__(self, x: torch.Tensor, sigma, cond: torch.Tensor,
                 uncond: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32).to(x.device).reshape(-1)
        sigma = sigma.expand(b) if sigma.numel() == 1 else sigma  # (B,)
        t = self.schedule.t_for_sigma(sigma)  # (B,)
        s = sigma.to(x.dtype).reshape(b, *[1] * (x.ndim - 1))  # (B, 1, 1, 1)
        x_in = x / (s * s + 1).sqrt()  # x_t = sqrt(alpha) * x

        guided = uncond is not None and scale > 1.0
        if guided and (uncond.shape[0], uncond.shape[2:]) != (cond.shape[0], cond.shape[2:]):
            raise ValueError(f"uncond {tuple(uncond.shape)} and cond {tuple(cond.shape)} must have "
                             "the same shape (expand uncond to the batch)")
        if guided and uncond.shape[1] != cond.shape[1]:  # prompts of other lengths: two batches (as the webui)
            eps_c = self.eps_fn(x_in, t, cond).to(x.dtype)
            eps_u = self.eps_fn(x_in, t, uncond).to(x.dtype)
            return x - s * (eps_u + scale * (eps_c - eps_u))
        if guided:
            x_in, t, context = torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([uncond, cond])
        else:
            context = cond
        eps = self.eps_fn(x_in, t, context).to(x.dtype)  # the single call: batch split elsewhere
        if guided:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + scale * (eps_c - eps_u)
        return x - s * eps


class KnownRegion:
    """Inpainting with a plain (4-channel) model: before each model evaluation below the starting
    sigma, the region to keep is set back to the known latents noised to that sigma with the
    run's one noise draw, x = keep * (known + sigma * noise) + (1 - keep) * x; the model fills the
    rest in agreement with it. `keep` (B or 1, 1, h, w) is 1 where the latents are known.

    This is diffusers' StableDiffusionInpaintPipeline for 4-channel UNets, which blends the known
    latents noised to the next timestep in after each step (so the first evaluation sees the start
    as it is): for a binary mask the region to repaint evolves exactly as there. The caller puts
    the known latents back at the end (`keep * known + (1 - keep) * latent`), as that pipeline's
    last step does.
    """

    def __init__(self, denoise: Denoiser, keep: torch.Tensor, known: torch.Tensor, noise: torch.Tensor,
                 sigma_start: float):
        self.denoise, self.keep, self.known, self.noise = denoise, keep, known, noise
        self.sigma_start = sigma_start

    def __call__(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        if float(s.max()) < self.sigma_start * (1 - 1e-6):
            s = s.expand(x.shape[0]).reshape(-1, *[1] * (x.ndim - 1))
            x = self.keep * (self.known + s * self.noise) + (1 - self.keep) * x
        return self.denoise(x, sigma, **extra_args)


def strength_steps(steps: int, strength: float) -> int:
    """How many of a plan's `steps` SDEdit img2img (Meng et al. 2021) walks for `strength` in
    (0, 1]: the last int(strength * steps), as diffusers' img2img `get_timesteps`. 0 means none."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return min(int(strength * steps), steps)


# --- samplers --------------------------------------------------------------------------------------

@torch.no_grad()
def sample_ddim(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None,
                callback=None, eta: float = 0.0, noise_sampler=None) -> torch.Tensor:
    """DDIM, Song et al. 2020 "Denoising Diffusion Implicit Models", eq. 12 (CompVis p_sample_ddim).

    In alpha space eq. 12 is
        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z,
        s = eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev)).
    Dividing by sqrt(a_prev) and writing a = 1 / (1 + sigma^2):
        x_next = x0 + sigma_down eps + sigma_up z,
        sigma_up = s / sqrt(a_prev) = eta sigma_next sqrt(sigma^2 - sigma_next^2) / sigma,
        sigma_down = sqrt(sigma_next^2 - sigma_up^2),
    i.e. exactly k-diffusion's ancestral step with eta; for eta = 0 it is Euler in sigma space.
    `noise_sampler(sigma, sigma_next)` returns z ~ N(0, I) shaped like x; it is called once per
    step, and only when eta > 0 (default: `ksamplers.default_noise_sampler`, seeded 0 per call).
    sigma_up is `ksamplers.ancestral_step`'s, clamped to sigma_next (eta > 1 would take CompVis'
    sqrt negative).
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback(dict(x=x, i=i, sigma=sigmas[i], denoised=denoised))
        eps = (x - denoised) / sigma
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + sigma_down * eps
        if sigma_up > 0:
            x = x + sigma_up * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_plms(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None,
                callback=None, eta: float = 0.0) -> torch.Tensor:
    """PLMS, Liu et al. 2022 "Pseudo Numerical Methods for Diffusion Models on Manifolds" (PNDM),
    as CompVis `PLMSSampler` runs it (eta must be 0).

    Each step is a DDIM (eta 0) step, i.e. x_next = x + (sigma_next - sigma) e', with e' a
    4th-order Adams-Bashforth combination of the eps of past steps (eps = (x - x0) / sigma):
    (3e - e1)/2, (23e - 16e1 + 5e2)/12, (55e - 59e1 + 37e2 - 9e3)/24. The first step has no
    history: a pseudo improved Euler (Heun) step averages eps at x and at the Euler-predicted
    x_next. As in CompVis, that second evaluation uses the next timestep, or the same timestep
    when it is the last step (steps = 1). The eps history lives in this call only.
    """
    if eta != 0.0:
        raise ValueError(f"PLMS is deterministic: eta must be 0, got {eta}")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_eps: list[torch.Tensor] = []
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i] * s_in, **extra_args)
        eps = (x - denoised) / sigma
        if not old_eps:
            x_pred = x + (sigma_next - sigma) * eps  # Euler predictor = DDIM step with eps
            if i + 1 < n:  # evaluate at (x_next, t_next)
                eps_next = (x_pred - denoise(x_pred, sigmas[i + 1] * s_in, **extra_args)) / sigma_next
            else:  # CompVis' t_next of the last step is t itself: x_next_t fed at timestep t
                x_pred = to_sigma_space(from_sigma_space(x_pred, sigma_next), sigma)
                eps_next = (x_pred - denoise(x_pred, sigmas[i] * s_in, **extra_args)) / sigma
            eps_prime = (eps + eps_next) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        if callback is not None:
            # denoised as CompVis' pred_x0 of the step actually taken (from eps_prime)
            callback(dict(x=x, i=i, sigma=sigmas[i], denoised=x - sigma * eps_prime))
        x = x + (sigma_next - sigma) * eps_prime
        old_eps = (old_eps + [eps])[-3:]
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": sample_ddim, "plms": sample_plms, "lcm": sample_lcm,
                                                    **KSAMPLERS}


def takes_noise(name: str) -> bool:
    """Whether sampler `name` can draw fresh noise, i.e. takes a `noise_sampler` (ddim, ancestral, SDE)."""
    return "noise_sampler" in inspect.signature(SAMPLERS[name]).parameters


def sample(name: str, denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None,
           callback=None, **options) -> torch.Tensor:
    """`SAMPLERS[name](denoise, x, sigmas, extra_args, callback, **options)`, with a clear error."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](denoise, x, sigmas, extra_args=extra_args, callback=callback, **options)


# --- plans: which sigmas a sampler walks, and how x enters and leaves sigma space --------------------

@dataclass(frozen=True)
class SamplingPlan:
    """sigmas: descending float32 (n+1,) on the CPU, n = number of steps.
    init_scale: x = noise * init_scale is the starting point (noise ~ N(0, I)).
    final_scale: latent = x * final_scale converts the sampler's result back to a latent x_t."""
    sigmas: torch.Tensor
    init_scale: float
    final_scale: float

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def to_latent(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.final_scale


def make_plan(schedule: Schedule, name: str, steps: int, karras: bool = False) -> SamplingPlan:
    """Sigmas and start/end scaling of sampler `name` for `steps` steps (txt2img).

    DDIM and PLMS walk CompVis' DDIM timesteps and start, as CompVis, at x_T = noise, so
    init_scale = sqrt(1 + sigma_max^2); they end at sigma(t=0), so final_scale = 1 / sqrt(1 +
    sigma_min^2) (see the module docstring). They have no Karras variant: karras=True is a
    ValueError (CompVis' start and end points, and PLMS' equal steps in t, would not hold).

    The k-samplers walk `schedule.discrete_sigmas(steps)`, or with karras=True Karras et al.
    2022's sigmas between the model's sigma_min and sigma_max; both end at 0. They start, as
    k-diffusion, at x = noise * sigma_max (init_scale = sigmas[0]) and end on the latent itself
    (final_scale = 1).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    if name in KSAMPLERS:
        if karras:
            if not 1 <= steps <= schedule.timesteps:
                raise ValueError(f"steps must be in 1..{schedule.timesteps}, got {steps}")
            sigmas = karras_sigmas(float(schedule.sigmas[0]), float(schedule.sigmas[-1]), steps)
        else:
            sigmas = schedule.discrete_sigmas(steps)
        return SamplingPlan(sigmas, float(sigmas[0]), 1.0)
    if karras:
        raise ValueError(f"karras sigmas are for the k-samplers ({', '.join(KSAMPLERS)}), not {name}, "
                         "which walks CompVis' DDIM timesteps")
    if name == "lcm":  # LCM's own timesteps (lcm.py), from x_T = noise at the first, down to sigma 0
        ts = lcm_timesteps(steps, schedule.timesteps)
        sigmas = torch.cat([schedule.sigmas[ts], torch.zeros(1, dtype=torch.float64)]).to(torch.float32)
        return SamplingPlan(sigmas, math.sqrt(1.0 + float(schedule.sigmas[ts[0]]) ** 2), 1.0)
    sigmas = schedule.ddim_sigmas(steps)
    sigma_max = float(schedule.sigmas[schedule.ddim_timesteps(steps)[-1]])  # float64
    sigma_min = float(schedule.sigmas[0])
    return SamplingPlan(sigmas, math.sqrt(1.0 + sigma_max ** 2), 1.0 / math.sqrt(1.0 + sigma_min ** 2))
