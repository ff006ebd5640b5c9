"""End to end: our four-fragment pipeline against diffusers' StableDiffusionPipeline (the reference).

Same tiny checkpoint (converted for diffusers by diffusers' own single-file converters), same prompt,
same starting noise (`torch.randn` from `torch.Generator("cpu").manual_seed(seed)`), same sampler
configured as SD v1 → the same 8-bit image within 2/255 per pixel. Then: the image of a seed does
not depend on --turbo, --unet_bs or --n_samples.
"""
from __future__ import annotations

import numpy as np
import pytest
from diffusers import DDIMScheduler, PNDMScheduler
from reference import assert_same_image, diffusers_images, our_images, random_tiny_model, sd_v1_scheduler_config


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model whose every weight is random (norm scales and biases too), as a real .ckpt."""
    return random_tiny_model(tmp_path_factory)


def _ddim():
    cfg = sd_v1_scheduler_config()
    cfg.pop("skip_prk_steps")
    return DDIMScheduler(**cfg)


def _plms():
    cfg = sd_v1_scheduler_config()
    for key in ("clip_sample",):
        cfg.pop(key)
    return PNDMScheduler(**cfg)


@pytest.mark.parametrize("sampler, scheduler, height, width", [
    ("ddim", _ddim, 64, 64),
    ("plms", _plms, 64, 64),
    ("ddim", _ddim, 72, 56),  # multiples of 8 but not of 64: latents 9 x 7
])
def test_image_equals_diffusers_stable_diffusion(model, sampler, scheduler, height, width):
    seed = 1234
    a = our_images(model, [seed], height, width, sampler)[0]
    b = diffusers_images(model, seed, height, width, scheduler())[0]
    assert_same_image(a, b)


def test_guidance_scale_one_and_empty_negative_prompt(model):
    a = our_images(model, [7], 64, 64, "ddim", scale=1.0, negative="")[0]
    b = diffusers_images(model, 7, 64, 64, _ddim(), scale=1.0, negative=None)[0]
    assert_same_image(a, b)


def test_seed_gives_one_image_whatever_turbo_unet_bs_or_batch(model):
    base = our_images(model, [5], 64, 64, "ddim", steps=5)[0]
    for mode in ("default", "turbo"):
        for unet_bs in (1, 2):
            batch = our_images(model, [4, 5, 6], 64, 64, "ddim", steps=5, mode=mode, unet_bs=unet_bs)
            assert np.abs(batch[1] - base).max() <= 1, (mode, unet_bs)
            single = our_images(model, [5], 64, 64, "ddim", steps=5, mode=mode, unet_bs=unet_bs)[0]
            assert np.abs(single - base).max() <= 1, (mode, unet_bs)
    other = our_images(model, [6], 64, 64, "ddim", steps=5)[0]
    assert np.abs(other - base).mean() > 5  # a different seed is a different image
