"""k-diffusion style samplers: Euler, Heun, DPM2, LMS, DPM-Solver++ and their ancestral/SDE kin.

All of them integrate the probability-flow ODE of Karras et al. 2022 ("Elucidating the Design
Space of Diffusion-Based Generative Models", eq. 4 with sigma(t) = t, s(t) = 1)

    dx/dsigma = (x - D(x; sigma)) / sigma,

in sigma space (x = x0 + sigma * eps, see `samplers.py`), or its reverse SDE for the ancestral
ones. They share the signature of `samplers.sample_ddim`:

    sample_x(denoise, x, sigmas, extra_args=None, callback=None, **options) -> x

`sigmas` descends, usually to 0 (`samplers.make_plan`); x enters as noise * sigmas[0]. The
denoiser is called as `denoise(x, sigma, **extra_args)` with sigma a float32 (B,) tensor, and
`callback` once per step with dict(x, i, sigma, denoised). Nothing is kept between calls, and
neither `x` nor `sigmas` is modified.

Fresh noise: the ancestral and SDE samplers take `noise_sampler(sigma, sigma_next) -> z`, z ~ N(0, I)
shaped like x, and call it only when a step adds noise (never on a step to sigma 0). The arguments
say which interval the noise is for, so a Brownian-tree sampler could be plugged in; the pipeline's
ignores them and draws each image's noise from that image's own CPU generator, so one seed gives
one image whatever the batch. Without a `noise_sampler` a sampler draws from a CPU generator seeded
0 on each call (`default_noise_sampler`): a call is a pure function of its arguments.

Written from the papers, with k-diffusion's `sampling.py` (Crowson) as the reference for which
variant each name means; `tests/test_ksamplers.py` checks them against diffusers' schedulers.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

NoiseSampler = Callable[[object, object], torch.Tensor]  # noise_sampler(sigma, sigma_next) -> z


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: n sigmas from sigma_max down to sigma_min, evenly spaced in
    sigma^(1/rho), then 0 appended. float32 (n + 1,) on the CPU, computed in float64."""
    if n < 1:
        raise ValueError(f"need at least 1 step, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def default_noise_sampler(x: torch.Tensor, seed: int = 0) -> NoiseSampler:
    """N(0, I) draws shaped like x from one CPU generator seeded `seed`, moved to x's device/dtype."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=generator).to(x.device, x.dtype)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step sigma -> sigma_next: go deterministically down to
    sigma_down, then add noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2.

    eta = 1 is the DDPM posterior (Ho et al. 2020) in sigma space: sigma_up^2 = sigma_next^2
    (sigma^2 - sigma_next^2) / sigma^2; eta scales sigma_up (clamped to sigma_next), eta = 0 is
    deterministic. Same as DDIM's eta (Song et al. 2020, eq. 16) and k-diffusion's get_ancestral_step.
    """
    if eta == 0.0 or sigma_next == 0.0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * sigma_next * math.sqrt(sigma ** 2 - sigma_next ** 2) / sigma)
    return math.sqrt(sigma_next ** 2 - up ** 2), up


def _sigma_in(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """sigma as the denoiser takes it: float32 (B,) on x's device (never x's dtype: fp16 would
    round sigma, and with it the UNet's timestep)."""
    return torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)


def _denoise_step(denoise, x, sigmas, i, extra_args, callback):
    """D(x; sigmas[i]) and the callback of step i."""
    denoised = denoise(x, _sigma_in(x, float(sigmas[i])), **extra_args)
    if callback is not None:
        callback(dict(x=x, i=i, sigma=sigmas[i], denoised=denoised))
    return denoised


# --- Euler and Heun (Karras et al. 2022, Algorithms 1 and 2, no churn) ---------------------------------

@torch.no_grad()
def sample_euler(denoise, x, sigmas, extra_args=None, callback=None):
    """Euler's method on the probability-flow ODE: x += (sigma_next - sigma) (x - D) / sigma.
    Karras et al. 2022, Algorithm 2 without churn and without its 2nd-order correction."""
    extra_args = {} if extra_args is None else extra_args
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _denoise_step(denoise, x, sigmas, i, extra_args, callback)
        d = (x - denoised) / s[i]
        x = x + d * (s[i + 1] - s[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(denoise, x, sigmas, extra_args=None, callback=None, eta: float = 1.0,
                           noise_sampler: NoiseSampler | None = None):
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of std sigma_up
    (`ancestral_step`); the reverse-time SDE sampled as DDPM's ancestral sampling does (Ho et al.
    2020), in k-diffusion's form (`sample_euler_ancestral`)."""
    return _ancestral(denoise, x, sigmas, extra_args, callback, eta, noise_sampler,
                      lambda x, d, sigma, sigma_down: x + d * (sigma_down - sigma))


def _ancestral(denoise, x, sigmas, extra_args, callback, eta, noise_sampler, step):
    """The loop of the ancestral samplers: `step(x, d, sigma, sigma_down)` goes deterministically
    down to sigma_down (d = the slope at sigma), then noise of std sigma_up is added
    (`ancestral_step`)."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _denoise_step(denoise, x, sigmas, i, extra_args, callback)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        x = step(x, (x - denoised) / s[i], s[i], sigma_down)
        if sigma_up > 0:
            x = x + sigma_up * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_heun(denoise, x, sigmas, extra_args=None, callback=None):
    """Heun's 2nd-order method, Karras et al. 2022 Algorithm 1: an Euler step, then the average of
    the slopes at both ends; the last step (to sigma 0, where the slope is undefined) is Euler.
    2n - 1 model evaluations for n steps."""
    extra_args = {} if extra_args is None else extra_args
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _denoise_step(denoise, x, sigmas, i, extra_args, callback)
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(x_2, _sigma_in(x, s[i + 1]), **extra_args)) / s[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


# --- DPM2: midpoint in log sigma (after DPM-Solver-2, Lu et al. 2022) ---------------------------------------

def _dpm2_step(denoise, x, d, sigma, sigma_to, extra_args):
    """Midpoint step sigma -> sigma_to: Euler to sigma_mid = sqrt(sigma sigma_to) (the midpoint in
    log sigma, i.e. in DPM-Solver's lambda = -log sigma), then the whole step with the slope there."""
    sigma_mid = math.sqrt(sigma * sigma_to)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = (x_2 - denoise(x_2, _sigma_in(x, sigma_mid), **extra_args)) / sigma_mid
    return x + d_2 * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm2(denoise, x, sigmas, extra_args=None, callback=None):
    """DPM2, k-diffusion's `sample_dpm_2`: DPM-Solver-2's midpoint (Lu et al. 2022, "DPM-Solver",
    r = 1/2: halfway in lambda = -log sigma) with Euler sub-steps on the sigma-space ODE of Karras
    et al. 2022 instead of the exponential integrator. The last step, to sigma 0, is Euler.
    2n - 1 evaluations."""
    extra_args = {} if extra_args is None else extra_args
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _denoise_step(denoise, x, sigmas, i, extra_args, callback)
        d = (x - denoised) / s[i]
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - s[i])
        else:
            x = _dpm2_step(denoise, x, d, s[i], s[i + 1], extra_args)
    return x


@torch.no_grad()
def sample_dpm2_ancestral(denoise, x, sigmas, extra_args=None, callback=None, eta: float = 1.0,
                          noise_sampler: NoiseSampler | None = None):
    """Ancestral DPM2: the DPM2 step goes down to sigma_down, then noise of std sigma_up is added
    (`ancestral_step`; k-diffusion `sample_dpm_2_ancestral`)."""
    args = {} if extra_args is None else extra_args

    def step(x, d, sigma, sigma_down):  # DPM2 down to sigma_down; Euler when that is 0
        return x + d * (sigma_down - sigma) if sigma_down == 0 else _dpm2_step(denoise, x, d, sigma, sigma_down, args)

    return _ancestral(denoise, x, sigmas, args, callback, eta, noise_sampler, step)


# --- linear multistep -----------------------------------------------------------------------------------

def _lms_coefficient(s: list[float], i: int, j: int, order: int) -> float:
    """Integral over [s[i], s[i+1]] of the Lagrange basis polynomial through s[i], ..., s[i-order+1]
    that is 1 at s[i-j], computed exactly (polynomial coefficients, lowest degree first)."""
    poly = [1.0]
    for k in range(order):
        if k != j:  # poly *= (tau - s[i-k]) / (s[i-j] - s[i-k])
            a, denom = s[i - k], s[i - j] - s[i - k]
            shifted = [0.0] + poly
            poly = [(shifted[m] - a * (poly[m] if m < len(poly) else 0.0)) / denom for m in range(len(shifted))]

    def antiderivative(tau: float) -> float:
        return sum(c * tau ** (m + 1) / (m + 1) for m, c in enumerate(poly))

    return antiderivative(s[i + 1]) - antiderivative(s[i])


@torch.no_grad()
def sample_lms(denoise, x, sigmas, extra_args=None, callback=None, order: int = 4):
    """Linear multistep (Adams-Bashforth on the non-uniform sigma grid) of order `order`, as in
    Karras et al. 2022's baselines and k-diffusion `sample_lms`: the slope is interpolated by the
    Lagrange polynomial through the last `order` slopes and integrated exactly over the step. The
    first steps use as many slopes as there are."""
    extra_args = {} if extra_args is None else extra_args
    s = sigmas.tolist()
    ds: list[torch.Tensor] = []  # slopes of the latest steps, oldest first
    for i in range(len(s) - 1):
        denoised = _denoise_step(denoise, x, sigmas, i, extra_args, callback)
        ds = (ds + [(x - denoised) / s[i]])[-order:]
        n = len(ds)
        x = x + sum(_lms_coefficient(s, i, j, n) * ds[-1 - j] for j in range(n))
    return x


# --- DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling") --------------------
# In sigma space, with lambda = -log sigma and h = lambda_next - lambda, the exact solution of the
# ODE with D held constant over a step is x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D
# (DPM-Solver++(1), eq. 9 divided by alpha; 1 - sigma_next / sigma = -expm1(-h)). Every sampler
# below is this update with a better estimate of D over the step.

def _dpmpp_update(x, denoised, sigma, sigma_next):
    ratio = sigma_next / sigma  # = exp(-h)
    return ratio * x + (1 - ratio) * denoised


@torch.no_grad()
def sample_dpmpp_2m(denoise, x, sigmas, extra_args=None, callback=None):
    """DPM-Solver++(2M), Lu et al. 2022b Algorithm 2: multistep 2nd order,
    D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h_i. The first step, and the last one
    (to sigma 0), are first order, as in k-diffusion `sample_dpmpp_2m` and diffusers'
    DPMSolverMultistepScheduler with final_sigmas_type="zero"."""
    extra_args = {} if extra_args is None else extra_args
    s = sigmas.tolist()
    old = None
    for i in range(len(s) - 1):
        denoised = _denoise_step(denoise, x, sigmas, i, extra_args, callback)
        if old is None or s[i + 1] == 0:
            d = denoised
        else:
            r = math.log(s[i - 1] / s[i]) / math.log(s[i] / s[i + 1])
            d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old
        x = _dpmpp_update(x, d, s[i], s[i + 1])
        old = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoise, x, sigmas, extra_args=None, callback=None, eta: float = 1.0,
                              noise_sampler: NoiseSampler | None = None):
    """Ancestral DPM-Solver++(2S): Lu et al. 2022b Algorithm 1 (single step, r = 1/2) down to
    sigma_down, then noise of std sigma_up (`ancestral_step`); k-diffusion
    `sample_dpmpp_2s_ancestral`. A step to sigma_down = 0 is first order (it lands on D)."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _denoise_step(denoise, x, sigmas, i, extra_args, callback)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            sigma_mid = math.sqrt(s[i] * sigma_down)  # lambda + h / 2
            x_2 = _dpmpp_update(x, denoised, s[i], sigma_mid)
            denoised_2 = denoise(x_2, _sigma_in(x, sigma_mid), **extra_args)
            x = _dpmpp_update(x, denoised_2, s[i], sigma_down)
        if sigma_up > 0:
            x = x + sigma_up * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoise, x, sigmas, extra_args=None, callback=None, eta: float = 1.0,
                     r: float = 0.5, noise_sampler: NoiseSampler | None = None):
    """DPM-Solver++ SDE: k-diffusion's `sample_dpmpp_sde`, a 2-stage stochastic DPM-Solver++
    (Lu et al. 2022b) with an ancestral noise injection in each stage:
      1. ancestral DPM-Solver++(1) from sigma to s = sigma^(1-r) sigma_next^r (lambda + r h):
         down to its sigma_down, plus noise `noise_sampler(sigma, s)` of its sigma_up;
      2. from sigma to sigma_next with D = (1 - 1/(2r)) D(x; sigma) + 1/(2r) D(x_2; s), down to
         sigma_down, plus noise `noise_sampler(sigma, sigma_next)` of its sigma_up.
    k-diffusion draws both noises from one Brownian tree, so they are correlated; the pipeline's
    noise_sampler gives independent draws from the image's generator (k-diffusion's behaviour with
    a plain noise sampler). The last step (to sigma 0) is Euler. 2n - 1 evaluations."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = sigmas.tolist()
    fac = 1 / (2 * r)
    for i in range(len(s) - 1):
        denoised = _denoise_step(denoise, x, sigmas, i, extra_args, callback)
        if s[i + 1] == 0:
            x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
            continue
        sigma_s = s[i] ** (1 - r) * s[i + 1] ** r
        sigma_down, sigma_up = ancestral_step(s[i], sigma_s, eta)
        x_2 = _dpmpp_update(x, denoised, s[i], sigma_down)
        if sigma_up > 0:
            x_2 = x_2 + sigma_up * noise_sampler(sigmas[i], torch.tensor(sigma_s, dtype=torch.float32))
        denoised_2 = denoise(x_2, _sigma_in(x, sigma_s), **extra_args)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        x = _dpmpp_update(x, (1 - fac) * denoised + fac * denoised_2, s[i], sigma_down)
        if sigma_up > 0:
            x = x + sigma_up * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


KSAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm2": sample_dpm2,
    "dpm2_a": sample_dpm2_ancestral,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2s_a": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
}
