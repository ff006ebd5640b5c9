"""ControlNet against diffusers' StableDiffusionControlNetPipeline (and its img2img, inpaint and
MultiControlNetModel forms), on a random tiny model and random tiny ControlNets written in the
original layout (`control_model.*`). diffusers gets them through its own converter
(`convert_controlnet_checkpoint`); ours reads the original file, and also the diffusers-layout folder
diffusers saves (`save_pretrained`). Same seed, prompt, control image and schedule -> the same 8-bit
image within 2/255. Run with -s to print the figures.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from reference import NEGATIVE, PROMPT, assert_same_image, clip_tokenizer, diffusers_unet, diffusers_vae, \
    ldm_config, random_tiny_model, randomize, sd_v1_scheduler_config, transformers_clip

from optimizedSD.custom.controlnet_file import ControlNetError, load_controlnet
from optimizedSD.engine.control import ActiveNet, Control, ControlUnit
from optimizedSD.engine.control_images import hint_tensor
from optimizedSD.engine.inputs import image_tensor, mask_tensor, to_pil
from optimizedSD.engine.offload import Offloader
from optimizedSD.engine.pipeline import Pipeline, SampleSettings
from optimizedSD.model.checkpoint import load_fragments
from optimizedSD.model.config import tiny_config
from optimizedSD.model.controlnet import ControlNet

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
STEPS, SEED, SIZE = 4, 5, 64


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_tiny_model(tmp_path_factory)


def write_controlnet(cfg, folder, seed: int):
    """A random ControlNet for `cfg`'s UNet, zero convs included (else it would add nothing), as an
    original-layout .pth: (path, its state dict with the `control_model.` prefix)."""
    torch.manual_seed(seed)
    net = ControlNet(cfg.unet).eval()
    randomize(net, 500 + seed)
    state = {f"control_model.{k}": v.clone() for k, v in net.state_dict().items()}
    path = folder / f"control_tiny_{seed}.pth"
    torch.save(state, path)
    return path, state


def diffusers_controlnet(cfg, state, unet_state):
    """diffusers' ControlNetModel from an original-layout state dict, by diffusers' own key converter
    (`convert_controlnet_checkpoint`). Its config is `create_controlnet_diffusers_config_from_ldm`'s
    fields of the UNet's diffusers config (that function itself calls the UNet's config maker without
    the checkpoint it needs in diffusers 0.42)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, \
        create_unet_diffusers_config_from_ldm

    unet = create_unet_diffusers_config_from_ldm(ldm_config(cfg), unet_state)
    fields = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
              "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
              "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block")
    config = {"conditioning_channels": 3, **{k: unet[k] for k in fields if k in unet}}
    net = ControlNetModel(**config)
    net.load_state_dict(convert_controlnet_checkpoint(state, config), strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def nets(model, tmp_path_factory):
    cfg = model[0]
    folder = tmp_path_factory.mktemp("controlnets")
    return [write_controlnet(cfg, folder, seed) for seed in (1, 2)]


def control_picture(size=(SIZE, SIZE), variant=0) -> Image.Image:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    lines = ((xx + yy * (1 + variant)) // 6 % 2) * 255
    disc = ((xx - w // 3) ** 2 + (yy - h // 2) ** 2 < (min(w, h) // (3 + variant)) ** 2) * 255
    return Image.fromarray(np.stack([lines, disc, 255 - lines], -1).astype(np.uint8))


def ddim():
    cfg = sd_v1_scheduler_config()
    cfg.pop("skip_prk_steps")
    return DDIMScheduler(**cfg)


def ours(model, controls, kind="txt2img", image=None, mask=None, strength=1.0, mode="default", unet_bs=1,
         seeds=(SEED,)):
    """Our Pipeline with `controls` [(ControlNet path, ControlUnit, control image)]."""
    cfg, path, _, _ = model
    fragments = load_fragments(path, cfg)
    active = [ActiveNet(f"controlnet{i}", load_controlnet(p, cfg.unet), hint_tensor(img), unit)
              for i, (p, unit, img) in enumerate(controls)]
    for a in active:
        fragments[a.fragment] = a.net
    engine = Offloader(fragments, torch.device("cpu"), mode=mode, copy_on_host=mode != "default")
    pipe = Pipeline(cfg, engine, unet_bs=unet_bs)
    pipe.control = Control(active, engine)
    settings = SampleSettings("ddim", STEPS, 7.5)
    if kind == "txt2img":
        latents = pipe.txt2img_latents(PROMPT, NEGATIVE, list(seeds), SIZE, SIZE, settings)
    elif kind == "img2img":
        latents = pipe.img2img_latents(PROMPT, NEGATIVE, list(seeds), image_tensor(image), settings, strength)
    else:
        latents = pipe.inpaint_latents(PROMPT, NEGATIVE, list(seeds), image_tensor(image), mask_tensor(mask),
                                       settings, strength)
    return np.stack([np.asarray(im) for im in to_pil(pipe.decode(latents))]).astype(np.int16)


def theirs(model, controls, kind="txt2img", image=None, mask=None, strength=1.0, guess_mode=False):
    """diffusers' pipeline of `kind` with the ControlNets [(state dict, ControlUnit, control image)]."""
    import diffusers

    cfg, _, state, workdir = model
    cls = {"txt2img": "StableDiffusionControlNetPipeline", "img2img": "StableDiffusionControlNetImg2ImgPipeline",
           "inpaint": "StableDiffusionControlNetInpaintPipeline"}[kind]
    cnets = [diffusers_controlnet(cfg, s, state) for s, _, _ in controls]
    pipe = getattr(diffusers, cls)(
        vae=diffusers_vae(cfg, state), text_encoder=transformers_clip(cfg, state), tokenizer=clip_tokenizer(workdir),
        unet=diffusers_unet(cfg, state), controlnet=cnets if len(cnets) > 1 else cnets[0], scheduler=ddim(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    units = [u for _, u, _ in controls]
    one = len(units) == 1
    kwargs = dict(
        controlnet_conditioning_scale=units[0].weight if one else [u.weight for u in units],
        control_guidance_start=units[0].start if one else [u.start for u in units],
        control_guidance_end=units[0].end if one else [u.end for u in units], guess_mode=guess_mode)
    images = [img for _, _, img in controls]
    generator = torch.Generator("cpu").manual_seed(SEED)
    if kind == "txt2img":
        f = cfg.downsample_factor
        kwargs["latents"] = torch.randn((1, cfg.channels, SIZE // f, SIZE // f), generator=generator)
        kwargs["image"] = images[0] if one else images
    elif kind == "img2img":
        kwargs.update(image=image, control_image=images[0] if one else images, strength=strength)
    else:
        kwargs.update(image=image, mask_image=mask, control_image=images[0] if one else images, strength=strength)
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                   guidance_scale=7.5, generator=generator, output_type="np", **kwargs).images
    return (out * 255).round().astype(np.int16)


def test_one_net_equals_diffusers(model, nets):
    (path, state), unit = nets[0], ControlUnit("x", weight=0.8)
    a = ours(model, [(path, unit, control_picture())])
    b = theirs(model, [(state, unit, control_picture())])
    plain = ours(model, [(path, replace(unit, weight=0.0), control_picture())])
    assert np.abs(plain - b).max() > 10, "the ControlNet changes the image"
    assert_same_image(a[0], b[0])


def test_two_nets_with_windows_equal_diffusers_multi(model, nets):
    units = [ControlUnit("a", weight=0.7, start=0.0, end=0.5), ControlUnit("b", weight=1.2, start=0.25, end=1.0)]
    pictures = [control_picture(), control_picture(variant=1)]
    a = ours(model, [(p, u, im) for (p, _), u, im in zip(nets, units, pictures)])
    b = theirs(model, [(s, u, im) for (_, s), u, im in zip(nets, units, pictures)])
    assert_same_image(a[0], b[0])


def test_window_equals_diffusers(model, nets):
    (path, state), unit = nets[0], ControlUnit("x", start=0.2, end=0.6)
    assert_same_image(ours(model, [(path, unit, control_picture())])[0],
                      theirs(model, [(state, unit, control_picture())])[0])
