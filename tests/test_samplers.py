"""optimizedSD.sampling.samplers against independent computations: a line-by-line transcription of CompVis
`DDIMSampler` / `PLMSSampler` (alpha space, written out here) and diffusers' `DDIMScheduler` /
`PNDMScheduler`, all driving the same deterministic synthetic eps model (no weights needed)."""
import math

import numpy as np
import pytest
import torch

from optimizedSD.sampling.samplers import (SAMPLERS, EpsDenoiser, Schedule, make_plan, sample,
                                  sample_ddim, sample_plms)

B, C, H, W, TOKENS, DIM = 2, 4, 6, 6, 3, 8
SCALE = 7.5
ATOL = 1e-4


# --- a synthetic eps model: nonlinear in x, t (integer-sensitive) and context ------------------------

class EpsModel:
    """The exact eps of Gaussian data N(0, 0.5^2) plus a guidance-sensitive nonlinear term:
    eps = sqrt(1-a) x_t / (0.25 a + 1 - a) + 0.15 tanh(W x_t + b(t) + ctx(context)), with a =
    alphas_cumprod[t] interpolated for fractional t, b(t) oscillating fast enough (1.3 rad per
    step) to see a timestep off by 0.01. Latents stay of unit scale. Records every call."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(C, C, generator=g, dtype=torch.float64) * 0.6
        self.w_ctx = torch.randn(DIM, C, generator=g, dtype=torch.float64) * 0.5
        self.freq = torch.tensor([0.003, 0.011, 0.7, 1.3], dtype=torch.float64)
        self.phase = torch.rand(C, generator=g, dtype=torch.float64) * 6
        betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        self.ac = np.cumprod(1 - betas)
        self.ts = []
        self.contexts = []

    def __call__(self, x_t, t, context):
        assert x_t.shape[0] == t.shape[0] == context.shape[0]
        self.ts.append(t.clone())
        self.contexts.append(context.clone())
        tt = t.to(torch.float64)[:, None]  # (N, 1)
        a = torch.from_numpy(np.interp(tt.numpy(), np.arange(1000), self.ac))[:, :, None, None]
        x = x_t.to(torch.float64)
        bias = 0.5 * torch.sin(tt * self.freq + self.phase) + 0.3 * torch.tanh((tt - 500) / 200)
        ctx = context.to(torch.float64).mean(1) @ self.w_ctx  # (N, C)
        h = torch.einsum("oc,nchw->nohw", self.w, x) + (bias + ctx)[:, :, None, None]
        eps = (1 - a).sqrt() * x / (0.25 * a + 1 - a) + 0.15 * torch.tanh(h)
        return eps.to(x_t.dtype)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, C, H, W, generator=g)
    cond = torch.randn(B, TOKENS, DIM, generator=g)  # two different prompts
    uncond = torch.randn(1, TOKENS, DIM, generator=g).expand(B, -1, -1).clone()
    return noise, cond, uncond


def guided(model, cond, uncond, scale=SCALE):
    """CompVis' classifier-free guidance around the raw model (integer long t)."""
    def e(x, t):
        e_u, e_c = model(torch.cat([x] * 2), torch.cat([t] * 2), torch.cat([uncond, cond])).chunk(2)
        return e_u + scale * (e_c - e_u)
    return e


# --- CompVis, transcribed (ldm/models/diffusion/ddim.py, plms.py, modules/diffusionmodules/util.py) --

def compvis_schedule(steps, eta=0.0):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)  # model buffer: float32
    c = 1000 // steps
    ddim_timesteps = np.asarray(list(range(0, 1000, c))) + 1
    alphacums = alphas_cumprod.numpy().astype(np.float64)
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)
    return ddim_timesteps, f32(alphas), f32(alphas_prev), f32(sigmas)


def compvis_ddim(e_fn, x_T, steps, eta=0.0, noises=None):
    ddim_timesteps, alphas, alphas_prev, sigmas = compvis_schedule(steps, eta)
    x, b = x_T, x_T.shape[0]
    time_range = np.flip(ddim_timesteps)
    total = ddim_timesteps.shape[0]
    for i, step in enumerate(time_range):
        index = total - i - 1
        t = torch.full((b,), int(step), dtype=torch.long)
        e_t = e_fn(x, t)
        a_t = torch.full((b, 1, 1, 1), float(alphas[index]))
        a_prev = torch.full((b, 1, 1, 1), float(alphas_prev[index]))
        sigma_t = torch.full((b, 1, 1, 1), float(sigmas[index]))
        sqrt_one_minus_at = torch.full((b, 1, 1, 1), float((1 - alphas[index]).sqrt()))
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * e_t
        noise = sigma_t * (noises[i] if noises is not None else torch.zeros_like(x))
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise
    return x


def compvis_plms(e_fn, x_T, steps):
    ddim_timesteps, alphas, alphas_prev, _ = compvis_schedule(steps)
    x, b = x_T, x_T.shape[0]
    time_range = [int(s) for s in np.flip(ddim_timesteps)]
    total = ddim_timesteps.shape[0]
    old_eps = []

    def get_x_prev(e_t, index):
        a_t = torch.full((b, 1, 1, 1), float(alphas[index]))
        a_prev = torch.full((b, 1, 1, 1), float(alphas_prev[index]))
        sqrt_one_minus_at = torch.full((b, 1, 1, 1), float((1 - alphas[index]).sqrt()))
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1. - a_prev).sqrt() * e_t

    for i, step in enumerate(time_range):
        index = total - i - 1
        t = torch.full((b,), step, dtype=torch.long)
        t_next = torch.full((b,), time_range[min(i + 1, len(time_range) - 1)], dtype=torch.long)
        e_t = e_fn(x, t)
        if len(old_eps) == 0:
            x_prev = get_x_prev(e_t, index)
            e_t_next = e_fn(x_prev, t_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = get_x_prev(e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x


# --- diffusers ----------------------------------------------------------------------------------

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1)


def diffusers_run(scheduler, e_fn, x_T, steps, eta=None, noises=None):
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        e = e_fn(x, t.expand(x.shape[0]))
        kw = {}
        if eta is not None:
            kw = dict(eta=eta, variance_noise=noises[i])
        x = scheduler.step(e, t, x, **kw).prev_sample
    return x


def ours(name, model, x_T, steps, cond, uncond, scale=SCALE, **options):
    schedule = Schedule()
    plan = make_plan(schedule, name, steps)
    denoise = EpsDenoiser(model, schedule)
    x = x_T * plan.init_scale
    x = sample(name, denoise, x, plan.sigmas, extra_args=dict(cond=cond, uncond=uncond, scale=scale),
               **options)
    return plan.to_latent(x)


def assert_close(a, b, atol=ATOL):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err < atol, f"max abs error {err:.3g} (latent max {b.abs().max().item():.3g})"


# --- (a) DDIM eta 0 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_matches_compvis_and_diffusers(steps):
    from diffusers import DDIMScheduler
    noise, cond, uncond = inputs()
    model = EpsModel()
    got = ours("ddim", model, noise, steps, cond, uncond)
    ref = compvis_ddim(guided(EpsModel(), cond, uncond), noise, steps)
    assert 0.5 < ref.std() < 2  # a latent of unit scale, not a degenerate one
    assert_close(got, ref)
    dif = diffusers_run(DDIMScheduler(clip_sample=False, **SD_BETAS),
                        guided(EpsModel(), cond, uncond), noise, steps)
    assert_close(got, dif)
    assert len(model.ts) == steps  # one batched (uncond + cond) model call per step
    assert all(len(t) == 2 * B for t in model.ts)


def test_guidance_scale_one_calls_cond_only():
    noise, cond, uncond = inputs()
    model = EpsModel()
    got = ours("ddim", model, noise, 10, cond, uncond, scale=1.0)
    ref_model = EpsModel()
    ref = compvis_ddim(lambda x, t: ref_model(x, t, cond), noise, 10)
    assert_close(got, ref)
    assert all(len(t) == B for t in model.ts)
    assert all(torch.equal(c, cond) for c in model.contexts)


# --- (b) DDIM eta > 0 -------------------------------------------------------------------------------

def test_ddim_eta_matches_compvis_and_diffusers_with_same_noise():
    from diffusers import DDIMScheduler
    steps, eta = 10, 0.5
    noise, cond, uncond = inputs()
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(B, C, H, W, generator=g) for _ in range(steps)]
    seen = []

    def noise_sampler(sigma, sigma_next):
        seen.append((float(sigma), float(sigma_next)))
        return noises[len(seen) - 1]

    got = ours("ddim", EpsModel(), noise, steps, cond, uncond, eta=eta, noise_sampler=noise_sampler)
    assert len(seen) == steps  # noise at every step, the last one included (it ends at sigma > 0)
    ref = compvis_ddim(guided(EpsModel(), cond, uncond), noise, steps, eta=eta, noises=noises)
    assert_close(got, ref)
    dif = diffusers_run(DDIMScheduler(clip_sample=False, **SD_BETAS),
                        guided(EpsModel(), cond, uncond), noise, steps, eta=eta, noises=noises)
    assert_close(got, dif)
    # and the noise matters: eta 0 is a different image
    assert (got - ours("ddim", EpsModel(), noise, steps, cond, uncond)).abs().max() > 1e-2


def test_ddim_eta_zero_draws_no_noise():
    noise, cond, uncond = inputs()

    def never(sigma, sigma_next):
        raise AssertionError("noise drawn with eta = 0")

    ours("ddim", EpsModel(), noise, 10, cond, uncond, eta=0.0, noise_sampler=never)


# --- (c) PLMS ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [10, 50])
def test_plms_matches_compvis_and_diffusers(steps):
    from diffusers import PNDMScheduler
    noise, cond, uncond = inputs()
    model = EpsModel()
    got = ours("plms", model, noise, steps, cond, uncond)
    ref = compvis_plms(guided(EpsModel(), cond, uncond), noise, steps)
    assert_close(got, ref)
    dif = diffusers_run(PNDMScheduler(skip_prk_steps=True, **SD_BETAS),
                        guided(EpsModel(), cond, uncond), noise, steps)
    assert_close(got, dif)
    assert len(model.ts) == steps + 1  # the first step evaluates twice
    c = 1000 // steps
    first, second = 1000 - c + 1, 1000 - 2 * c + 1  # 901, 801 for 10 steps
    assert [int(t[0]) for t in model.ts] == [first, second] + list(range(second, 0, -c))


def test_plms_single_step_reuses_last_timestep_like_compvis():
    noise, cond, uncond = inputs()
    model = EpsModel()
    got = ours("plms", model, noise, 1, cond, uncond)
    assert_close(got, compvis_plms(guided(EpsModel(), cond, uncond), noise, 1))
    assert [int(t[0]) for t in model.ts] == [1, 1]


def test_plms_rejects_eta():
    noise, cond, uncond = inputs()
    with pytest.raises(ValueError, match="eta"):
        ours("plms", EpsModel(), noise, 10, cond, uncond, eta=0.5)


# --- (d) timesteps fed to the model --------------------------------------------------------------------

@pytest.mark.parametrize("steps, expected", [(10, list(range(901, 0, -100))),
                                             (50, list(range(981, 0, -20)))])
def test_model_sees_exact_integer_timesteps(steps, expected):
    noise, cond, uncond = inputs()
    model = EpsModel()
    ours("ddim", model, noise, steps, cond, uncond)
    for t, want in zip(model.ts, expected, strict=True):
        assert t.dtype.is_floating_point
        assert torch.equal(t, torch.full((2 * B,), float(want)))


# --- (e) steps that do not divide 1000 --------------------------------------------------------------

def test_30_steps_gives_31_like_compvis():
    schedule = Schedule()
    ts = schedule.ddim_timesteps(30)
    assert len(ts) == 31 and ts[0] == 1 and ts[-1] == 991
    plan = make_plan(schedule, "ddim", 30)
    assert plan.steps == 31 and len(plan.sigmas) == 32
    noise, cond, uncond = inputs()
    model = EpsModel()
    got = ours("ddim", model, noise, 30, cond, uncond)
    assert len(model.ts) == 31
    assert_close(got, compvis_ddim(guided(EpsModel(), cond, uncond), noise, 30))
    model = EpsModel()
    got = ours("plms", model, noise, 30, cond, uncond)
    assert len(model.ts) == 32
    assert_close(got, compvis_plms(guided(EpsModel(), cond, uncond), noise, 30))


# --- schedule, plan and denoiser details ------------------------------------------------------------

def test_schedule_values():
    s = Schedule()
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    ac = np.cumprod(1 - betas)
    assert s.alphas_cumprod.dtype == torch.float64
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), ac, rtol=1e-12)
    np.testing.assert_allclose(s.sigmas.numpy(), np.sqrt((1 - ac) / ac), rtol=1e-12)
    assert s.sigmas.shape == (1000,)


def test_ending_at_sigma_zero_would_be_wrong():
    # the k-diffusion convention (final sigma 0) misses CompVis' last x_t by far more than ATOL
    s = Schedule()
    noise, cond, uncond = inputs()
    plan = make_plan(s, "ddim", 10)
    sigmas = torch.cat([plan.sigmas[:-1], plan.sigmas.new_zeros(1)])
    x = sample_ddim(EpsDenoiser(EpsModel(), s), noise * plan.init_scale, sigmas,
                    extra_args=dict(cond=cond, uncond=uncond, scale=SCALE))
    ref = compvis_ddim(guided(EpsModel(), cond, uncond), noise, 10)
    assert (x - ref).abs().max() > 100 * ATOL


def test_plan_ends_where_compvis_ends_not_at_zero():
    s = Schedule()
    plan = make_plan(s, "ddim", 10)
    ac0 = float(s.alphas_cumprod[0])
    assert abs(plan.sigmas[-1].item() - math.sqrt((1 - ac0) / ac0)) < 1e-7
    assert 0.029 < plan.sigmas[-1].item() < 0.0293
    assert plan.final_scale == pytest.approx(math.sqrt(ac0), rel=1e-12)
    ac901 = float(s.alphas_cumprod[901])
    assert plan.init_scale == pytest.approx(1 / math.sqrt(ac901), rel=1e-12)
    assert plan.sigmas.dtype == torch.float32
    assert torch.all(plan.sigmas[:-1] > plan.sigmas[1:])
    x = torch.ones(2)
    assert torch.allclose(plan.to_latent(x), x * math.sqrt(ac0))


def test_t_for_sigma_exact_on_table_and_interpolated_between():
    s = Schedule()
    table = s.sigmas.to(torch.float32)
    assert torch.equal(s.t_for_sigma(table), torch.arange(1000, dtype=torch.float32))
    mid = ((s.log_sigmas[:-1] + s.log_sigmas[1:]) / 2).exp().to(torch.float32)
    t = s.t_for_sigma(mid)
    torch.testing.assert_close(t, torch.arange(999, dtype=torch.float32) + 0.5, atol=2e-3, rtol=0)
    assert s.t_for_sigma(table[0] / 2).item() == 0.0 and s.t_for_sigma(100.0).item() == 999.0
    assert s.t_for_sigma(torch.tensor(float(table[981]))).shape == ()
    # sigma_for_t: the table on integers, and the inverse of t_for_sigma in between
    assert torch.equal(s.sigma_for_t(torch.arange(1000)), table)
    torch.testing.assert_close(s.sigma_for_t(t), mid, rtol=1e-5, atol=0)


def test_denoiser_sigma_forms_dtype_and_no_mutation():
    s = Schedule()
    noise, cond, uncond = inputs()
    x = noise * 3
    x_copy, cond_copy, uncond_copy = x.clone(), cond.clone(), uncond.clone()
    sig = float(s.sigmas[501])
    outs = []
    for sigma in (sig, torch.tensor(sig), torch.full((B,), sig)):
        model = EpsModel()
        out = EpsDenoiser(model, s)(x, sigma, cond=cond, uncond=uncond, scale=SCALE)
        assert out.dtype == x.dtype and out.shape == x.shape
        assert len(model.ts) == 1 and torch.equal(model.ts[0], torch.full((2 * B,), 501.0))
        assert torch.equal(model.contexts[0], torch.cat([uncond, cond]))  # uncond first
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(x, x_copy) and torch.equal(cond, cond_copy) and torch.equal(uncond, uncond_copy)
    # x0 = x - sigma * eps, eps from the model at x_t = x / sqrt(1 + sigma^2) (independent)
    a = float(s.alphas_cumprod[501])
    t = torch.full((B,), 501.0)
    e = guided(EpsModel(), cond, uncond)(x * math.sqrt(a), t)
    torch.testing.assert_close(outs[0], x - sig * e, atol=1e-5, rtol=1e-5)


def test_samplers_are_pure_functions_with_callback():
    s = Schedule()
    noise, cond, uncond = inputs()
    plan = make_plan(s, "ddim", 10)
    x = noise * plan.init_scale
    x_copy = x.clone()
    for name, fn in SAMPLERS.items():
        seen = []
        denoise = EpsDenoiser(EpsModel(), s)
        args = dict(cond=cond, uncond=uncond, scale=SCALE)
        out1 = fn(denoise, x, plan.sigmas, extra_args=args, callback=seen.append)
        out2 = fn(denoise, x, plan.sigmas, extra_args=args)
        assert torch.equal(out1, out2)  # no state kept between calls
        assert torch.equal(x, x_copy)
        assert [d["i"] for d in seen] == list(range(10))
        assert all(set(d) >= {"x", "i", "sigma", "denoised"} for d in seen)
        assert all(d["denoised"].shape == x.shape for d in seen)
    assert SAMPLERS["ddim"] is sample_ddim and SAMPLERS["plms"] is sample_plms
    with pytest.raises(ValueError, match="unknown sampler"):
        make_plan(s, "nope", 10)


@pytest.mark.parametrize("steps", [3, 9, 27])
def test_steps_where_the_reference_overruns_the_schedule_drop_timestep_1000(steps):
    ts = Schedule().ddim_timesteps(steps)
    c = 1000 // steps
    assert ts == [t + 1 for t in range(0, 1000 - c, c)] and max(ts) < 1000
    assert len(Schedule().ddim_sigmas(steps)) == len(ts) + 1
