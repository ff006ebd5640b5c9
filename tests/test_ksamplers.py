"""k-diffusion samplers (optimizedSD.sampling.ksamplers) against independent references.

(a) Deterministic samplers, with and without Karras sigmas: our Pipeline's image equals diffusers'
    StableDiffusionPipeline with the matching scheduler, on the same tiny random checkpoint from the
    same starting noise, within 2/255 per pixel (helpers shared with test_end_to_end.py). The
    schedulers get SD v1's config (`sd_v1_scheduler_config()`) with timestep_spacing="linspace":
    that is k-diffusion's discrete schedule (n timesteps from 999 down to 0, start at noise *
    sigma_max), which ours follows; SD v1's "leading" would start at t = 901 (10 steps) from noise
    * sqrt(1 + sigma^2), CompVis' DDIM convention. Documented differences of diffusers, and what
    the test does about them:
    - HeunDiscreteScheduler / KDPM2DiscreteScheduler list 2n - 1 timesteps for n steps (both
      stages of each step, the last step Euler): the same evaluations as ours for the same n.
    - DPMSolverMultistepScheduler (dpmsolver++, order 2) spaces "linspace" over n + 1 points and
      drops t = 0, a schedule of its own: the test hands it our timesteps (`timesteps=`). It is a
      VP scheduler (init_noise_sigma 1): its latents are noise * sigma_max / sqrt(1 + sigma_max^2),
      the same sigma-space start. Its final step to sigma 0 is first order (final_sigmas_type
      "zero"), as ours and k-diffusion's.
    - With Karras sigmas, DPMSolverMultistep and KDPM2 round the UNet's timestep to an integer
      (KDPM2 only on the main steps); we feed the interpolated one, as k-diffusion and diffusers'
      Euler/Heun/LMS do. The difference stays within the tolerance (observed <= 1/255).
    - LMSDiscreteScheduler integrates its coefficients numerically (scipy quad, epsrel 1e-4); ours
      are exact.
(b) Ancestral samplers: euler_a and dpm2_a equal diffusers' EulerAncestral/KDPM2Ancestral
    schedulers given the same noise: diffusers gets the image's generator after it drew the
    starting noise, so its step noise is what our per-image noise_sampler draws. diffusers has no
    dpmpp_2s_a, and its DPMSolverSDEScheduler needs torchsde and a Brownian tree, so dpmpp_2s_a and
    dpmpp_sde are checked on a synthetic eps model against implementations written here from
    DPM-Solver++ (Lu et al. 2022b) in its lambda = -log sigma form, fed the same noise.
(c) karras_sigmas against Karras et al. 2022 eq. 5, and the plans' sigmas against diffusers'.
(d) A seed gives one image whatever the batch, for the noisy samplers.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler,
                       LMSDiscreteScheduler)
from reference import assert_same_image, diffusers_images, our_images, random_tiny_model, sd_v1_scheduler_config
from test_samplers import SCALE, EpsModel, inputs

from optimizedSD.sampling.ksamplers import KSAMPLERS, karras_sigmas
from optimizedSD.sampling.samplers import SAMPLERS, EpsDenoiser, Schedule, make_plan, takes_noise

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 vs diffusers' _sigma_to_t

STEPS = 10  # linspace(999, 0, 10) = 999, 888, ..., 0: integer timesteps, no interpolation choice involved
SEED = 1234


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_tiny_model(tmp_path_factory)


def linspace_scheduler(cls, **overrides):
    """`cls` with SD v1's betas and k-diffusion's timestep spacing (see the module docstring)."""
    return cls.from_config({**sd_v1_scheduler_config(), "timestep_spacing": "linspace", **overrides})


# --- (a) deterministic samplers vs diffusers' schedulers ----------------------------------------------

DETERMINISTIC = {
    "euler": (EulerDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
}


@pytest.mark.parametrize("karras", [False, True], ids=["discrete", "karras"])
@pytest.mark.parametrize("sampler", list(DETERMINISTIC))
def test_deterministic_sampler_image_equals_diffusers(model, sampler, karras):
    if sampler == "lms":
        pytest.importorskip("scipy")  # diffusers' LMS integrates with scipy
    cls, options = DETERMINISTIC[sampler]
    scheduler = linspace_scheduler(cls, use_karras_sigmas=karras, **options)
    call = {}
    if cls is DPMSolverMultistepScheduler:
        sigma_max = float(Schedule().sigmas[-1])
        call["latent_scale"] = sigma_max / math.sqrt(1 + sigma_max ** 2)  # VP: x_T = x / sqrt(1 + sigma^2)
        if not karras:
            call["timesteps"] = [round(t) for t in np.linspace(999, 0, STEPS)]
    a = our_images(model, [SEED], 64, 64, sampler, steps=STEPS, karras=karras)[0]
    b = diffusers_images(model, SEED, 64, 64, scheduler, steps=STEPS, **call)[0]
    assert_same_image(a, b)


# --- (b) ancestral and SDE samplers -------------------------------------------------------------------

@pytest.mark.parametrize("sampler, cls, karras", [
    ("euler_a", EulerAncestralDiscreteScheduler, False),  # diffusers' has no Karras option
    ("dpm2_a", KDPM2AncestralDiscreteScheduler, False),
    ("dpm2_a", KDPM2AncestralDiscreteScheduler, True),
])
def test_ancestral_image_equals_diffusers_with_the_same_noise(model, sampler, cls, karras):
    scheduler = linspace_scheduler(cls, **({"use_karras_sigmas": True} if karras else {}))
    a = our_images(model, [SEED], 64, 64, sampler, steps=STEPS, karras=karras)[0]
    b = diffusers_images(model, SEED, 64, 64, scheduler, steps=STEPS)[0]
    assert_same_image(a, b)


def _ref_denoiser(schedule, model, cond, uncond):
    """x0 = x - sigma * eps, eps guided, at x_t = x / sqrt(1 + sigma^2) (written out, not EpsDenoiser)."""
    def denoised(x, sigma):
        t = schedule.t_for_sigma(torch.tensor(sigma, dtype=torch.float32)).expand(2 * x.shape[0])
        x_t = x / math.sqrt(1 + sigma ** 2)
        e_u, e_c = model(torch.cat([x_t, x_t]), t, torch.cat([uncond, cond])).chunk(2)
        return x - sigma * (e_u + SCALE * (e_c - e_u))
    return denoised


def _ref_ancestral(sigma, sigma_next):
    """eta = 1: the DDPM posterior's std sigma_up and the deterministic target sigma_down."""
    up = sigma_next * math.sqrt(1 - sigma_next ** 2 / sigma ** 2)
    return sigma_next ** 2 / sigma, up  # sigma_down = sqrt(sigma_next^2 - up^2) = sigma_next^2 / sigma


def _ref_dpmpp_1(x, denoised, lam, lam_next):
    """DPM-Solver++(1) (Lu et al. 2022b, eq. 9 over alpha): sigma_t / sigma_s x - expm1(-h) D."""
    h = lam_next - lam
    return math.exp(-h) * x - math.expm1(-h) * denoised


def ref_dpmpp_2s_ancestral(D, x, sigmas, noises):
    lam = lambda sigma: -math.log(sigma)  # noqa: E731  (lambda = log(alpha / sigma_vp) = -log sigma)
    noises = iter(noises)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = D(x, sigma)
        sigma_down, sigma_up = _ref_ancestral(sigma, sigma_next) if sigma_next > 0 else (0.0, 0.0)
        if sigma_down == 0:
            x = x + (x - d) / sigma * (sigma_down - sigma)  # Euler to 0
        else:
            l, l_next = lam(sigma), lam(sigma_down)
            l_mid = l + (l_next - l) / 2
            x_mid = _ref_dpmpp_1(x, d, l, l_mid)
            x = _ref_dpmpp_1(x, D(x_mid, math.exp(-l_mid)), l, l_next)  # Algorithm 1 (2S), r = 1/2
        if sigma_next > 0:
            x = x + sigma_up * next(noises)
    return x


def ref_dpmpp_sde(D, x, sigmas, noises, r=0.5):
    lam = lambda sigma: -math.log(sigma)  # noqa: E731
    noises = iter(noises)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = D(x, sigma)
        if sigma_next == 0:
            x = x + (x - d) / sigma * (sigma_next - sigma)
            continue
        l, l_next = lam(sigma), lam(sigma_next)
        l_s = l + r * (l_next - l)
        sigma_s = math.exp(-l_s)
        down, up = _ref_ancestral(sigma, sigma_s)
        x_2 = _ref_dpmpp_1(x, d, l, lam(down)) + up * next(noises)
        d_2 = D(x_2, sigma_s)
        down, up = _ref_ancestral(sigma, sigma_next)
        d_mix = (1 - 1 / (2 * r)) * d + 1 / (2 * r) * d_2
        x = _ref_dpmpp_1(x, d_mix, l, lam(down)) + up * next(noises)
    return x


@pytest.mark.parametrize("karras", [False, True], ids=["discrete", "karras"])
@pytest.mark.parametrize("sampler, reference, draws", [
    ("dpmpp_2s_a", ref_dpmpp_2s_ancestral, 1),
    ("dpmpp_sde", ref_dpmpp_sde, 2),
])
def test_dpmpp_ancestral_and_sde_match_written_out_dpm_solver_pp(sampler, reference, draws, karras):
    schedule = Schedule()
    noise, cond, uncond = inputs()
    plan = make_plan(schedule, sampler, STEPS, karras=karras)
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(noise.shape, generator=g) for _ in range(draws * STEPS)]
    pairs = []

    def noise_sampler(sigma, sigma_next):
        pairs.append((float(sigma), float(sigma_next)))
        return noises[len(pairs) - 1]

    x = noise * plan.init_scale
    got = SAMPLERS[sampler](EpsDenoiser(EpsModel(), schedule), x, plan.sigmas, noise_sampler=noise_sampler,
                            extra_args=dict(cond=cond, uncond=uncond, scale=SCALE))
    ref = reference(_ref_denoiser(schedule, EpsModel(), cond, uncond), x, plan.sigmas.tolist(), noises)
    err = (got - ref).abs().max().item()
    assert err < 1e-4, f"max abs error {err:.3g}"
    assert 0.2 < ref.std() < 5
    # noise on every step but the last (to sigma 0); dpmpp_sde's first draw is for (sigma, sigma_s)
    s = plan.sigmas.tolist()
    assert len(pairs) == draws * (STEPS - 1)
    assert [p[0] for p in pairs] == [s[i] for i in range(STEPS - 1) for _ in range(draws)]
    if sampler == "dpmpp_sde":
        assert pairs[0][1] == pytest.approx(math.sqrt(s[0] * s[1]), rel=1e-6) and pairs[1][1] == s[1]
    # and the noise matters
    other = SAMPLERS[sampler](EpsDenoiser(EpsModel(), schedule), x, plan.sigmas,
                              extra_args=dict(cond=cond, uncond=uncond, scale=SCALE))
    assert (other - got).abs().max() > 1e-2


def test_which_samplers_draw_noise():
    assert {name for name in SAMPLERS if takes_noise(name)} == {"ddim", "euler_a", "dpm2_a", "dpmpp_2s_a",
                                                                 "dpmpp_sde", "lcm"}
    schedule = Schedule()
    noise, cond, uncond = inputs()

    def never(sigma, sigma_next):
        raise AssertionError("noise drawn")

    for name in ("euler_a", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde"):  # eta 0: deterministic
        plan = make_plan(schedule, name, 3)
        SAMPLERS[name](EpsDenoiser(EpsModel(), schedule), noise * plan.init_scale, plan.sigmas, eta=0.0,
                       noise_sampler=never, extra_args=dict(cond=cond, uncond=uncond, scale=SCALE))


# --- (c) sigma schedules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, rho", [(1, 7.0), (10, 7.0), (25, 7.0), (5, 3.0)])
def test_karras_sigmas_formula(n, rho):
    lo, hi = 0.0292, 14.6146
    got = karras_sigmas(lo, hi, n, rho)
    assert got.dtype == torch.float32 and got.shape == (n + 1,)
    # Karras et al. 2022, eq. 5: sigma_i = (hi^(1/rho) + i / (n-1) (lo^(1/rho) - hi^(1/rho)))^rho, sigma_n = 0
    want = [(hi ** (1 / rho) + i / max(n - 1, 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)]
    np.testing.assert_allclose(got.numpy(), np.array(want + [0.0], dtype=np.float32), rtol=1e-6)
    assert got[0].item() == pytest.approx(hi, rel=1e-7) and got[-1].item() == 0
    assert n == 1 or got[-2].item() == pytest.approx(lo, rel=1e-7)
    assert torch.all(got[:-1] > got[1:])
    np.testing.assert_allclose(karras_sigmas(lo, hi, 6, rho=1.0)[:-1].numpy(), np.linspace(hi, lo, 6), rtol=1e-6)


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("karras", [False, True], ids=["discrete", "karras"])
def test_k_plans_match_diffusers_sigmas_and_start_at_sigma_max(steps, karras):
    schedule = Schedule()
    scheduler = linspace_scheduler(EulerDiscreteScheduler, use_karras_sigmas=karras)
    scheduler.set_timesteps(steps)
    for name in KSAMPLERS:
        plan = make_plan(schedule, name, steps, karras=karras)
        assert plan.sigmas.dtype == torch.float32 and plan.steps == steps
        # diffusers' betas are float32 (ours float64): 1.3e-5 apart at sigma_min. With 25 steps the
        # timesteps are fractional, log-interpolated here (k-diffusion), linearly by diffusers.
        torch.testing.assert_close(plan.sigmas, scheduler.sigmas, rtol=3e-5, atol=0)
        assert plan.sigmas[-1].item() == 0 and plan.final_scale == 1.0
        assert plan.init_scale == plan.sigmas[0].item() == pytest.approx(float(scheduler.init_noise_sigma))
        assert plan.init_scale == pytest.approx(float(schedule.sigmas[-1]), rel=1e-6)
    if not karras:  # integer timesteps are the table's own sigmas
        t = [round(t) for t in np.linspace(999, 0, 10)]
        assert torch.equal(make_plan(schedule, "euler", 10).sigmas[:-1], schedule.sigmas[t].to(torch.float32))


def test_karras_is_for_k_samplers_only():
    schedule = Schedule()
    for name in ("ddim", "plms"):
        with pytest.raises(ValueError, match="k-samplers"):
            make_plan(schedule, name, 10, karras=True)
        assert torch.equal(make_plan(schedule, name, 10, karras=False).sigmas, schedule.ddim_sigmas(10))
    from optimizedSD.model.config import SDConfig
    from optimizedSD.engine.request import Request, RequestError, complete

    with pytest.raises(RequestError, match="--karras applies to the k-samplers only"):
        complete(Request("p", sampler="ddim", karras=True), SDConfig())
    complete(Request("p", sampler="dpmpp_2m", karras=True), SDConfig())


# --- (d) one seed, one image, whatever the batch ----------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_sde"])
def test_noisy_sampler_seed_gives_one_image_whatever_the_batch(model, sampler):
    single = our_images(model, [5], 64, 64, sampler, steps=4)[0]
    batch = our_images(model, [4, 5, 6], 64, 64, sampler, steps=4)
    assert np.abs(batch[1] - single).max() <= 1
    assert np.abs(batch[0] - single).mean() > 5  # a different seed is a different image
