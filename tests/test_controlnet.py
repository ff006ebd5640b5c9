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

from optimizedSD.custom.controlnet_file import load_controlnet
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


def test_guess_mode_equals_diffusers(tmp_path_factory):
    """"ControlNet is more important": the net on the conditional rows only, residual k of 13 scaled by
    0.825 ** (12 - k) (the webui's); diffusers' guess_mode scales by logspace(-1, 0, 13), within 0.6 % of
    it. A tiny UNet of 4 levels of 2 blocks has SD 1.5's 13 residuals."""
    base = tiny_config()
    cfg = replace(base, unet=replace(base.unet, channel_mult=(1, 1, 2, 2), attention_resolutions=(1,)))
    model = random_tiny_model(tmp_path_factory, cfg)
    path, state = write_controlnet(cfg, tmp_path_factory.mktemp("guess"), 3)
    unit = ControlUnit("x", mode="control", weight=1.5)
    assert len(ControlNet(cfg.unet).zero_convs) + 1 == 13
    a = ours(model, [(path, unit, control_picture())])
    b = theirs(model, [(state, unit, control_picture())], guess_mode=True)
    balanced = theirs(model, [(state, replace(unit, mode="balanced"), control_picture())])
    assert np.abs(balanced - b).max() > 10, "guess mode changes the image"
    assert_same_image(a[0], b[0])


def test_img2img_and_inpaint_equal_diffusers(model, nets):
    (path, state), unit = nets[0], ControlUnit("x", weight=0.9)
    init = control_picture(variant=1).transpose(Image.FLIP_LEFT_RIGHT)
    a = ours(model, [(path, unit, control_picture())], "img2img", image=init, strength=0.75)
    b = theirs(model, [(state, unit, control_picture())], "img2img", image=init, strength=0.75)
    assert_same_image(a[0], b[0])
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 8:40] = 255
    mask = Image.fromarray(mask)
    a = ours(model, [(path, unit, control_picture())], "inpaint", image=init, mask=mask)
    b = theirs(model, [(state, unit, control_picture())], "inpaint", image=init, mask=mask)
    assert_same_image(a[0], b[0])


def test_streamed_and_batched_equal_resident(model, nets):
    """--lowvram's streaming (every block, ControlNet's too, moved on its own) and --unet_bs 1 vs 2 give
    the same image as everything in place; two seeds at once as one at a time."""
    (path, _), unit = nets[0], ControlUnit("x", mode="control", start=0.25)
    controls = [(path, unit, control_picture())]
    resident = ours(model, controls, seeds=(SEED, SEED + 1), unet_bs=4)
    streamed = ours(model, controls, mode="stream", seeds=(SEED, SEED + 1), unet_bs=1)
    assert np.abs(resident - streamed).max() <= 1
    assert np.abs(resident[1:] - ours(model, controls, seeds=(SEED + 1,))).max() <= 1


def test_diffusers_layout_loads_as_the_original(model, nets, tmp_path):
    """diffusers' folder (save_pretrained of the model its converter made) reads to the same weights."""
    cfg, _, state, _ = model
    path, original = nets[0]
    folder = tmp_path / "cn"
    diffusers_controlnet(cfg, original, state).save_pretrained(folder)
    a, b = load_controlnet(path, cfg.unet).state_dict(), load_controlnet(folder, cfg.unet).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    half = tmp_path / "half.safetensors"  # an fp16 pruned file in the original layout
    from safetensors.torch import save_file
    save_file({k: v.half() for k, v in original.items()}, half)
    c = load_controlnet(half, cfg.unet).state_dict()
    assert all(torch.equal(c[k], a[k].half().float()) for k in a)


# ---- canny against OpenCV -----------------------------------------------------------------------
def test_canny_equals_opencv():
    """Our numpy Canny against cv2.Canny (aperture 3, L1) on RGB and gray pictures and three threshold
    pairs: the same edges (up to 0.1 % of the pixels may differ; none did when written)."""
    cv2 = pytest.importorskip("cv2")
    from PIL import ImageDraw, ImageFilter

    from optimizedSD.engine.control_images import canny

    rng = np.random.default_rng(0)
    for k in range(3):
        im = Image.new("RGB", (160, 120), (30, 60, 90))
        d = ImageDraw.Draw(im)
        d.ellipse((20 + 9 * k, 20, 110, 100), fill=(200, 100, 50))
        d.rectangle((90, 30, 150, 110), outline=(10, 250, 10), width=3)
        d.line((0, 119, 159, 0), fill=(255, 255, 255), width=2)
        a = np.asarray(im.filter(ImageFilter.GaussianBlur(1.2))).astype(int) + rng.integers(-25, 25, (120, 160, 3))
        a = np.clip(a, 0, 255).astype(np.uint8)
        for image in (a, cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)):
            for low, high in ((100, 200), (50, 120), (20, 60)):
                ours_, ref = canny(image, low, high), cv2.Canny(image, low, high)
                assert (ref > 0).mean() > 0.01
                assert (ours_ != ref).mean() <= 0.001, (k, image.ndim, low, high, (ours_ != ref).mean())


def test_resize_modes():
    from optimizedSD.engine.control_images import resize_to

    wide = Image.fromarray(np.full((40, 80, 3), 200, np.uint8))
    assert resize_to(wide, 64, 64, "just resize").size == (64, 64)
    assert resize_to(wide, 64, 64, "crop and resize").size == (64, 64)
    filled = np.asarray(resize_to(wide, 64, 64, "resize and fill"))
    assert filled.shape == (64, 64, 3) and (filled == 200).all()  # the fill is the border's median colour


# ---- the CLI: a run, its metadata, and bad input ----------------------------------------------------
def _write_control_image(path):
    control_picture().save(path)
    return path


def test_cli_run_records_the_webui_infotext(tiny_model, tmp_path, capsys):
    from test_cli import run_cli, tiny_args

    cfg = tiny_model[2]
    path, _ = write_controlnet(cfg, tmp_path, 7)
    image = _write_control_image(tmp_path / "edges.png")
    out = tmp_path / "out"
    code, _, err = run_cli(tiny_args(tiny_model, out, "--prompt", "a fox", "--seed", 3, "--n_samples", 1, "--n_iter", 1, "--controlnet", path,
                                     "--control_image", image, "--control_preprocessor", "canny",
                                     "--control_weight", "0.5", "--control_save_map", "--skip_grid"), capsys)
    assert code == 0, err
    pngs = sorted(p for p in out.rglob("*.png") if "-control" not in p.name)
    maps = sorted(out.rglob("*-control0.png"))
    assert len(pngs) == 1 and len(maps) == 1
    text = Image.open(pngs[0]).info["parameters"]
    from optimizedSD.custom.controlnet_file import model_hash
    expected = (f'ControlNet 0: "Module: canny, Model: {path.stem} [{model_hash(path)}], Weight: 0.5, '
                'Resize Mode: Crop and Resize, Processor Res: 64, Threshold A: 100.0, Threshold B: 200.0, '
                'Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"')
    assert expected in text, text


def _lora_file(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, path)
    return path


def _sd2_controlnet(tiny_model, tmp_path):
    cfg = tiny_model[2]
    sd2 = replace(cfg.unet, context_dim=1024)
    net = ControlNet(sd2)
    path = tmp_path / "control_sd21.safetensors"
    from safetensors.torch import save_file
    save_file({f"control_model.{k}": v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


@pytest.mark.parametrize("case", ["lora", "checkpoint", "missing image", "window", "sd2", "image unreadable", "hires"])
def test_bad_input_is_one_line_and_nothing_written(tiny_model, tmp_path, capsys, case):
    from test_cli import run_cli, tiny_args

    cfg = tiny_model[2]
    good, _ = write_controlnet(cfg, tmp_path, 8)
    image = _write_control_image(tmp_path / "c.png")
    flags, words = {
        "lora": (["--controlnet", _lora_file(tmp_path), "--control_image", image], "is a LoRA"),
        "checkpoint": (["--controlnet", tiny_model[0], "--control_image", image], "is a Stable Diffusion checkpoint"),
        "missing image": (["--controlnet", good], "1 --controlnet but 0 --control_image"),
        "window": (["--controlnet", good, "--control_image", image, "--control_start", "0.8", "--control_end", "0.2"],
                   "--control_start 0.8 and --control_end 0.2 must satisfy"),
        "sd2": (["--controlnet", _sd2_controlnet(tiny_model, tmp_path), "--control_image", image],
                "is a ControlNet for SD 2.x (cross-attention width 1024)"),
        "image unreadable": (["--controlnet", good, "--control_image", tmp_path / "nope.png"], "control image"),
        "hires": (["--controlnet", good, "--control_image", image, "--hr_scale", "2"],
                  "the hires fix does not work with ControlNet yet; turn it off (--hr_scale / --hr_resize_x / "
                  "--hr_resize_y)"),
    }[case]
    out = tmp_path / "out"
    code, _, err = run_cli(tiny_args(tiny_model, out, "--prompt", "a fox", *flags), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert words in lines[-1], err
    assert not out.exists() or not any(out.rglob("*.png"))
