"""The `lcm` sampler against diffusers' LCMScheduler, and guidance scale <= 1 skipping the
unconditional pass (every sampler) against diffusers' pipeline at that scale.

Same random tiny checkpoint, prompt, seed (the latents are the first draw of the image's CPU
generator; LCM's re-injected noise the next ones, as diffusers' scheduler draws them from the same
generator) -> the same 8-bit image within 2/255. Run with -s to print the figures.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler, LCMScheduler
from lora_files import LOCON_TARGETS, allow_installed_peft, kohya_state, lora_tensors, write_kohya
from reference import assert_same_image, diffusers_images, our_images, sd_v1_scheduler_config
from safetensors import safe_open

from optimizedSD.custom.lora import apply_loras, read_lora

from optimizedSD.engine.pipeline import Pipeline, SampleSettings
from optimizedSD.engine.request import Request, RequestError, check, with_defaults
from optimizedSD.model.config import tiny_config
from optimizedSD.sampling.lcm import boundary_scalings, lcm_timesteps
from optimizedSD.sampling.samplers import Schedule, make_plan

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
SEED = 11


def lcm_scheduler():
    config = sd_v1_scheduler_config()
    config.pop("skip_prk_steps")
    return LCMScheduler.from_config(config)


def test_timesteps_and_scalings_are_diffusers():
    scheduler = lcm_scheduler()
    for n in range(1, 51):
        scheduler.set_timesteps(n)
        assert lcm_timesteps(n) == scheduler.timesteps.tolist(), n
    assert lcm_timesteps(4) == [999, 759, 499, 259]
    for t in (999, 259, 19, 0):
        assert boundary_scalings(t) == pytest.approx(scheduler.get_scalings_for_boundary_condition_discrete(t))
    plan = make_plan(Schedule(), "lcm", 4)
    assert plan.steps == 4 and float(plan.sigmas[-1]) == 0.0


@pytest.mark.parametrize("steps, scale", [(4, 1.5), (6, 2.0), (4, 1.0)])
def test_lcm_equals_diffusers(random_model, steps, scale):
    a = our_images(random_model, [SEED], 64, 48, "lcm", steps=steps, scale=scale)[0]
    b = diffusers_images(random_model, SEED, 64, 48, lcm_scheduler(), steps=steps, scale=scale)[0]
    assert_same_image(a, b)


def _rows(model, sampler, scale, steps=4):
    """The UNet batch rows of each evaluation of a 1-image run."""
    from optimizedSD.engine.offload import Offloader
    from optimizedSD.model.checkpoint import load_fragments

    cfg, path, _, _ = model
    pipe = Pipeline(cfg, Offloader(load_fragments(path, cfg), torch.device("cpu")))
    rows, eps = [], pipe.eps
    pipe.eps = lambda x, t, c: rows.append(x.shape[0]) or eps(x, t, c)
    pipe.txt2img_latents("a fox", "blurry", [SEED], 64, 64, SampleSettings(sampler, steps, scale))
    return rows


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_scale_at_most_one_skips_the_unconditional_pass(random_model, scale):
    """diffusers guides only at guidance_scale > 1: at 1 and below its UNet sees the prompt alone,
    the negative prompt not at all. So do we, for every sampler: half the rows."""
    euler = EulerDiscreteScheduler.from_config({**sd_v1_scheduler_config(), "timestep_spacing": "linspace"})
    a = our_images(random_model, [SEED], 64, 64, "euler", steps=8, scale=scale)[0]
    b = diffusers_images(random_model, SEED, 64, 64, euler, steps=8, scale=scale)[0]
    assert_same_image(a, b)
    for sampler in ("euler", "ddim", "lcm", "heun"):
        assert set(_rows(random_model, sampler, scale)) == {1}, sampler
    assert set(_rows(random_model, "euler", 1.01)) == {2}
    assert not Request("x", scale=scale).guided and Request("x", scale=1.5).guided


def test_lcm_steps_beyond_its_schedule_are_one_line():
    cfg = tiny_config()
    r = with_defaults(Request("a fox", sampler="lcm", steps=51, seed=1), demo=True)
    with pytest.raises(RequestError, match="--ddim_steps must be at most 50") as e:
        check(r, cfg)
    assert "\n" not in str(e.value)
    check(with_defaults(Request("a fox", sampler="lcm", steps=4, seed=1), demo=True), cfg)


def test_lcm_lora_in_kohya_layout_equals_diffusers(random_model, tmp_path, monkeypatch):
    """An LCM-LoRA as the public lcm-lora-sdv1-5 file holds it (UNet only, every attention, feed-forward,
    ResBlock conv, time projection and resampler: `lora_unet_down_blocks_...` kohya names, alphas),
    applied with our LoRA loader under the `lcm` sampler at 4 steps, cfg 1.5, against diffusers'
    `load_lora_weights` with its LCMScheduler."""
    cfg = random_model[0]
    unet, _, _, _ = lora_tensors(random_model, 7, LOCON_TARGETS, [], rank=4, alpha=4)
    path = write_kohya(tmp_path / "lcm-lora-sdv1-5.safetensors", kohya_state(unet, {}, alpha=4))
    with safe_open(str(path), "pt") as f:
        assert {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight",
                "lora_unet_up_blocks_0_upsamplers_0_conv.alpha"} <= set(f.keys())
    allow_installed_peft(monkeypatch)

    def ours(fragments):
        apply_loras(fragments, [(read_lora(path, cfg), 1.0)])

    a = our_images(random_model, [SEED], 64, 64, "lcm", steps=4, scale=1.5, prepare=ours)[0]
    b = diffusers_images(random_model, SEED, 64, 64, lcm_scheduler(), steps=4, scale=1.5,
                         prepare=lambda pipe: pipe.load_lora_weights(str(path)))[0]
    plain = our_images(random_model, [SEED], 64, 64, "lcm", steps=4, scale=1.5)[0]
    assert abs(a - plain).mean() > 3  # the LoRA changed the image: the comparison means something
    assert_same_image(a, b)
