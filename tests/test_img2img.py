"""img2img (SDEdit) against diffusers' StableDiffusionImg2ImgPipeline, and what --strength does.

Same random tiny checkpoint, prompt, init image, seed (one CPU generator per image: first the
posterior sample of the VAE encoder, then the noise) and scheduler → the same 8-bit image within
2/255. Run with -s to print the figures.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
from PIL import Image
from reference import NEGATIVE, PROMPT, assert_same_image, random_tiny_model, sd_pipeline, sd_v1_scheduler_config

from optimizedSD.model.checkpoint import load_fragments
from optimizedSD.engine.inputs import to_pil
from optimizedSD.engine.inputs import image_tensor
from optimizedSD.engine.offload import Offloader
from optimizedSD.engine.pipeline import Pipeline, SampleSettings
from optimizedSD.sampling.samplers import SAMPLERS, strength_steps

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
STEPS, SEED = 10, 7


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_tiny_model(tmp_path_factory)


def picture(size=(64, 64), variant=0) -> Image.Image:
    """A smooth RGB picture: two gradients and a disc (variant moves the disc and flips a gradient)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    cx = w // 2 + (w // 4 if variant else 0)
    disc = ((xx - cx) ** 2 + (yy - h // 2) ** 2 < (min(w, h) // 4) ** 2) * 200 + 30
    red = xx * 255 // max(1, w - 1)
    if variant:
        red = 255 - red
    return Image.fromarray(np.stack([red, yy * 255 // max(1, h - 1), disc], -1).astype(np.uint8))


def pipeline(model) -> Pipeline:
    cfg, path, _, _ = model
    return Pipeline(cfg, Offloader(load_fragments(path, cfg), torch.device("cpu")))


def our_img2img(model, seeds, image, strength, sampler="ddim", steps=STEPS, karras=False):
    pipe = pipeline(model)
    latents = pipe.img2img_latents(PROMPT, NEGATIVE, seeds, image_tensor(image),
                                   SampleSettings(sampler, steps, 7.5, karras=karras), strength)
    return np.stack([np.asarray(im) for im in to_pil(pipe.decode(latents))]).astype(np.int16)


def diffusers_img2img(model, seed, image, strength, scheduler, steps=STEPS):
    cfg, _, state, workdir = model
    pipe = sd_pipeline(cfg, state, scheduler, workdir, kind="StableDiffusionImg2ImgPipeline")
    with torch.no_grad():
        out = pipe(PROMPT, image=image, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=steps,
                   guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return (out * 255).round().astype(np.int16)


def _ddim():
    cfg = sd_v1_scheduler_config()
    cfg.pop("skip_prk_steps")
    return DDIMScheduler(**cfg)


def _linspace(cls, **options):
    return cls.from_config({**sd_v1_scheduler_config(), "timestep_spacing": "linspace", **options})


@pytest.mark.parametrize("sampler, scheduler, strength, karras", [
    ("ddim", _ddim, 0.75, False),
    ("ddim", _ddim, 0.5, False),
    ("ddim", _ddim, 0.2, False),
    ("euler", lambda: _linspace(EulerDiscreteScheduler), 0.6, False),
    ("euler", lambda: _linspace(EulerDiscreteScheduler, use_karras_sigmas=True), 0.6, True),
    ("heun", lambda: _linspace(HeunDiscreteScheduler), 0.5, False),
])  # not LMS: diffusers' LMS img2img takes the order from the step index, not from its history
def test_img2img_equals_diffusers(model, sampler, scheduler, strength, karras):
    image = picture((64, 48))  # not square: H and W are not swapped anywhere
    a = our_img2img(model, [SEED], image, strength, sampler, karras=karras)[0]
    b = diffusers_img2img(model, SEED, image, strength, scheduler())[0]
    assert a.shape == (48, 64, 3)
    assert_same_image(a, b)


def test_batch_gives_each_seed_its_own_image(model):
    image = picture()
    single = our_img2img(model, [SEED + 1], image, 0.6)[0]
    batch = our_img2img(model, [SEED, SEED + 1], image, 0.6)
    assert np.abs(batch[1] - single).max() <= 1
    assert np.abs(batch[0] - batch[1]).mean() > 5  # different seeds, different images


def _latent_distance(model, image, strength) -> float:
    """Mean |latent - the init image's posterior mean|, in units of the latent's own spread."""
    pipe = pipeline(model)
    with torch.no_grad():
        mean, _ = pipe.engine.fragments["vae"].encode(image_tensor(image))
    mean = mean * pipe.cfg.scale_factor
    latents = pipe.img2img_latents(PROMPT, NEGATIVE, [SEED], image_tensor(image), SampleSettings("ddim", 50), strength)
    return float((latents - mean).abs().mean() / mean.std())


def test_low_strength_stays_near_the_image_and_full_strength_ignores_it(model):
    """Measured in latent space (this random model's VAE does not reconstruct pixels): the result at
    strength 0.2 (10 of 50 DDIM steps, from t=181) stays near the init image's latent; at 1.0 the
    image has no influence at all (pure noise start): two different images give the same picture."""
    image = picture()
    near, far = _latent_distance(model, image, 0.2), _latent_distance(model, image, 1.0)
    print(f"latent distance to the init image: strength 0.2 {near:.3f}, strength 1.0 {far:.3f}")
    assert near < 0.5 * far
    a = our_img2img(model, [SEED], picture(variant=0), 1.0)
    b = our_img2img(model, [SEED], picture(variant=1), 1.0)
    assert np.array_equal(a, b)
    c = our_img2img(model, [SEED], picture(variant=1), 0.99)
    assert np.abs(c - a).max() > 0  # just below 1 the image counts again


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_img2img(model, sampler):
    """Every sampler starts from the noised image: finite, and repeatable for one seed."""
    image = picture()
    a = our_img2img(model, [SEED], image, 0.5, sampler, steps=4)
    b = our_img2img(model, [SEED], image, 0.5, sampler, steps=4)
    assert a.shape == (1, 64, 64, 3) and np.array_equal(a, b)
    assert a.std() > 5


@pytest.mark.parametrize("steps, strength, walked", [(50, 0.75, 37), (50, 1.0, 50), (10, 0.05, 0), (10, 0.1, 1),
                                                     (4, 0.6, 2)])
def test_strength_steps_as_diffusers_get_timesteps(steps, strength, walked):
    assert strength_steps(steps, strength) == walked
    assert strength_steps(steps, strength) == min(int(steps * strength), steps)  # diffusers' init_timestep


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.01])
def test_strength_out_of_range_is_refused(strength):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        strength_steps(50, strength)
