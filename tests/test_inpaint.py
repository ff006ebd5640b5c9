"""Inpainting against diffusers' StableDiffusionInpaintPipeline, with a plain 4-channel checkpoint
(the known region re-noised into the latents) and a 9-channel inpainting one (mask and masked-image
latents as UNet input); then the CLI: the unmasked pixels come back exactly. Run with -s for figures.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from PIL import Image
from reference import NEGATIVE, PROMPT, assert_same_image, random_tiny_model, sd_pipeline, sd_v1_scheduler_config
from test_img2img import picture

from optimizedSD.model.checkpoint import load_fragments
from optimizedSD.fronts.cli import main
from optimizedSD.model.config import tiny_config
from optimizedSD.engine.inputs import to_pil
from optimizedSD.engine.inputs import image_tensor, mask_tensor
from optimizedSD.engine.offload import Offloader
from optimizedSD.engine.pipeline import Pipeline, SampleSettings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
STEPS, SEED = 10, 7


def _model(tmp_path_factory, channels):
    cfg = tiny_config()
    return random_tiny_model(tmp_path_factory, replace(cfg, unet=replace(cfg.unet, in_channels=channels)))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _model(tmp_path_factory, 4)


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    return _model(tmp_path_factory, 9)


def box_mask(size=(64, 64), box=(20, 10, 56, 40)) -> Image.Image:
    """White (repaint) inside `box` = (left, top, right, bottom), black elsewhere."""
    m = np.zeros(size[::-1], np.uint8)
    left, top, right, bottom = box
    m[top:bottom, left:right] = 255
    return Image.fromarray(m)


def ours(model, image, mask, strength, sampler="ddim", seeds=(SEED,)):
    cfg, path, _, _ = model
    pipe = Pipeline(cfg, Offloader(load_fragments(path, cfg), torch.device("cpu")))
    latents = pipe.inpaint_latents(PROMPT, NEGATIVE, list(seeds), image_tensor(image), mask_tensor(mask),
                                   SampleSettings(sampler, STEPS, 7.5), strength)
    return np.stack([np.asarray(im) for im in to_pil(pipe.decode(latents))]).astype(np.int16)


def theirs(model, image, mask, strength, scheduler):
    cfg, _, state, workdir = model
    pipe = sd_pipeline(cfg, state, scheduler, workdir, kind="StableDiffusionInpaintPipeline")
    with torch.no_grad():
        out = pipe(PROMPT, image=image, mask_image=mask, strength=strength, negative_prompt=NEGATIVE,
                   num_inference_steps=STEPS, guidance_scale=7.5, height=image.height, width=image.width,
                   generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images
    return (out * 255).round().astype(np.int16)


def _ddim():
    cfg = sd_v1_scheduler_config()
    cfg.pop("skip_prk_steps")
    return DDIMScheduler(**cfg)


def _euler():
    return EulerDiscreteScheduler.from_config({**sd_v1_scheduler_config(), "timestep_spacing": "linspace"})


@pytest.mark.parametrize("checkpoint", ["plain", "inpainting"])
@pytest.mark.parametrize("sampler, scheduler, strength", [
    ("ddim", _ddim, 1.0), ("ddim", _ddim, 0.75), ("euler", _euler, 1.0), ("euler", _euler, 0.6)])
def test_inpainting_equals_diffusers(request, checkpoint, sampler, scheduler, strength):
    """Before the unmasked pixels are pasted back (diffusers does not paste them)."""
    model = request.getfixturevalue(checkpoint)
    image, mask = picture((64, 48)), box_mask((64, 48), (8, 16, 40, 40))
    a = ours(model, image, mask, strength, sampler)[0]
    b = theirs(model, image, mask, strength, scheduler())[0]
    assert_same_image(a, b)


def test_plain_checkpoint_keeps_the_known_latents(plain):
    """4 channels: outside the mask the final latents are the init image's (its posterior sample),
    exactly; inside they are new."""
    cfg, path, _, _ = plain
    pipe = Pipeline(cfg, Offloader(load_fragments(path, cfg), torch.device("cpu")))
    image, mask = picture(), box_mask()
    generator = [torch.Generator("cpu").manual_seed(SEED)]
    init = pipe.encode(image_tensor(image), generator)  # the first draw, as inpaint_latents draws it
    latents = pipe.inpaint_latents(PROMPT, NEGATIVE, [SEED], image_tensor(image), mask_tensor(mask),
                                   SampleSettings("euler_a", 6, 7.5))
    keep = torch.nn.functional.interpolate(mask_tensor(mask), size=latents.shape[2:]) == 0
    keep = keep.expand_as(latents)
    assert torch.equal(latents[keep], init[keep])
    assert (latents[~keep] - init[~keep]).abs().mean() > 0.1


# --- the CLI ---------------------------------------------------------------------------------------

def _write_checkpoint(model, path):
    torch.save({"state_dict": model[2]}, path)
    return path


@pytest.mark.parametrize("checkpoint", ["plain", "inpainting"])
def test_cli_repaints_the_mask_and_leaves_every_other_pixel(request, checkpoint, tmp_path, capsys):
    model = request.getfixturevalue(checkpoint)
    ckpt = _write_checkpoint(model, tmp_path / "model.ckpt")
    picture((64, 48)).save(tmp_path / "in.png")
    box_mask((32, 24), (4, 8, 20, 20)).save(tmp_path / "mask.png")  # half size: resized to the image
    from reference import write_yaml_config
    yaml = write_yaml_config(tiny_config(), tmp_path / "tiny.yaml")  # 4 channels: the checkpoint decides
    argv = ["--init-img", tmp_path / "in.png", "--mask", tmp_path / "mask.png", "--ckpt", ckpt, "--config", yaml,
            "--outdir", tmp_path / "out", "--ddim_steps", 4, "--sampler", "ddim", "--device", "cpu", "--seed", 3,
            "--n_samples", 2, "--prompt", "a vase"]
    code = main([str(a) for a in argv], kind="inpaint")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "mask resized to the image's 64x48" in out
    original = np.asarray(Image.open(tmp_path / "in.png")).astype(np.int16)
    repaint = np.asarray(box_mask((32, 24), (4, 8, 20, 20)).resize((64, 48), Image.LANCZOS)) >= 128
    for name in ("seed_3_00000.png", "seed_4_00001.png"):
        result = np.asarray(Image.open(tmp_path / "out" / "a_vase" / name)).astype(np.int16)
        assert result.shape == original.shape
        assert np.array_equal(result[~repaint], original[~repaint])
        assert np.abs(result[repaint] - original[repaint]).mean() > 10
        info = Image.open(tmp_path / "out" / "a_vase" / name).text
        assert (info["init_image"], info["mask"], info["strength"]) == ("in.png", "mask.png", "1.0")
