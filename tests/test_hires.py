"""Hires fix (engine/hires.py) against diffusers: its txt2img pipeline for the base pass, the latents
upscaled as the webui's "Latent" upscalers do (F.interpolate bilinear without antialias / nearest), or
decoded, resized with PIL's Lanczos and handed over as an image, then its StableDiffusionImg2ImgPipeline
with the same strength and the same CPU generator carried on -> the same 8-bit image within 2/255.
Also: the webui's target sizes, one-line refusals (nothing written), metadata that replays exactly,
and the planner covering the second pass. Run with -s to print the figures.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from PIL import Image
from reference import NEGATIVE, PROMPT, assert_same_image, sd_pipeline, sd_v1_scheduler_config

from optimizedSD.engine import hires
from optimizedSD.engine.inputs import to_pil
from optimizedSD.engine.offload import Offloader
from optimizedSD.engine.pipeline import Pipeline, SampleSettings
from optimizedSD.engine.request import Request, RequestError, check, with_defaults
from optimizedSD.model.checkpoint import load_fragments
from optimizedSD.model.config import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
SEED, W, H = 5, 64, 48


def _ddim():
    config = sd_v1_scheduler_config()
    config.pop("skip_prk_steps")
    return DDIMScheduler(**config)


def _euler():
    return EulerDiscreteScheduler.from_config({**sd_v1_scheduler_config(), "timestep_spacing": "linspace"})


def hr(**kw):
    fields = dict(hr_scale=2.0, hr_upscaler="latent", hr_steps=0, hr_denoise=0.7, hr_resize_x=0, hr_resize_y=0)
    return SimpleNamespace(**{**fields, **kw}, width=W, height=H)


def ours(model, sampler, steps, r, scale=7.5):
    cfg, path, _, _ = model
    pipe = Pipeline(cfg, Offloader(load_fragments(path, cfg), torch.device("cpu")))
    latents = hires.hires_latents(pipe, PROMPT, NEGATIVE, [SEED], W, H, SampleSettings(sampler, steps, scale), r)
    return np.asarray(to_pil(pipe.decode(latents))[0]).astype(np.int16)


def reference(model, scheduler, steps, r, scale=7.5):
    """diffusers: txt2img latents, upscaled (or decoded + Lanczos), then its img2img pipeline."""
    cfg, _, state, workdir = model
    base = sd_pipeline(cfg, state, scheduler(), workdir)
    from diffusers import StableDiffusionImg2ImgPipeline

    second = StableDiffusionImg2ImgPipeline(**base.components)
    second.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(SEED)
    latents = torch.randn((1, 4, H // 8, W // 8), generator=g)
    size = (int(H * r.hr_scale) // 8, int(W * r.hr_scale) // 8)
    with torch.no_grad():
        if r.hr_upscaler == "lanczos":
            image = base(PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=steps,
                         guidance_scale=scale, latents=latents, generator=g, output_type="pil").images[0]
            init = image.resize((size[1] * 8, size[0] * 8), Image.LANCZOS)
        else:
            low = base(PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=steps,
                       guidance_scale=scale, latents=latents, generator=g, output_type="latent").images
            mode = {"latent": dict(mode="bilinear", antialias=False), "latent-nearest": dict(mode="nearest")}
            init = F.interpolate(low, size=size, **mode[r.hr_upscaler])
        out = second(PROMPT, image=init, strength=r.hr_denoise, negative_prompt=NEGATIVE,
                     num_inference_steps=r.hr_steps or steps, guidance_scale=scale, generator=g,
                     output_type="np").images
    return (out[0] * 255).round().astype(np.int16)


@pytest.mark.parametrize("sampler, scheduler, r", [
    ("ddim", _ddim, hr()),
    ("euler", _euler, hr(hr_upscaler="latent-nearest", hr_steps=6, hr_denoise=0.5)),
    ("ddim", _ddim, hr(hr_upscaler="lanczos", hr_scale=1.5)),
])
def test_hires_fix_equals_diffusers_img2img_on_the_upscaled_latents(random_model, sampler, scheduler, r):
    steps = 8  # divides 1000: CompVis' DDIM takes one step more than diffusers' otherwise (docs/cli.md)
    a = ours(random_model, sampler, steps, r)
    b = reference(random_model, scheduler, steps, r)
    assert a.shape == (int(H * r.hr_scale) // 8 * 8, int(W * r.hr_scale) // 8 * 8, 3)
    assert_same_image(a, b)


def test_target_sizes_are_the_webuis():
    t = hires.target(512, 512, 2.0, 0, 0, 8)
    assert t.pixels(8) == (1024, 1024) and t.crop == (0, 0)
    assert hires.target(512, 768, None, 1000, 0, 8).pixels(8) == (1000, 1496)  # 1000 x 1500, on the grid
    assert hires.target(512, 768, None, 0, 1024, 8).pixels(8) == (680, 1024)  # 682 x 1024 floored
    t = hires.target(512, 768, None, 1024, 1024, 8)  # cover 1024 x 1536, crop 64 latent rows
    assert t.upscaled == (192, 128) and t.crop == (64, 0) and t.pixels(8) == (1024, 1024)
    x = torch.arange(192 * 128.).reshape(1, 1, 192, 128)
    assert torch.equal(hires._crop(x, t.crop), x[..., 32:160, :])


def _checked(**kw):
    r = with_defaults(Request("a red circle", seed=1, sampler="ddim", steps=10, **kw), demo=True)
    check(r, tiny_config())
    return r


@pytest.mark.parametrize("kw, words", [
    (dict(hr_scale=0), "--hr_scale must be more than 0"),
    (dict(hr_scale=2, hr_upscaler="esrgan"), "unknown --hr_upscaler 'esrgan'; choose one of latent"),
    (dict(hr_scale=2, hr_denoise=0.05), "--hr_denoise 0.05 of 10 steps runs no sampling step"),
    (dict(hr_scale=2, hr_denoise=1.5), "--hr_denoise must be in (0, 1]"),
    (dict(hr_steps=5), "--hr_steps apply to the hires fix; add --hr_scale"),
    (dict(hr_scale=2, hr_steps=-1), "--hr_steps must be at least 0"),
])
def test_bad_hires_values_are_one_line(kw, words):
    with pytest.raises(RequestError) as e:
        _checked(**kw)
    assert words in str(e.value) and "\n" not in str(e.value)
    _checked(hr_scale=2)


def test_cli_refuses_before_writing(tmp_path, capsys):
    from optimizedSD.fronts.cli import main

    for flags, words in ((["--hr_scale", "0"], "--hr_scale must be more than 0"),
                         (["--hr_scale", "2", "--hr_upscaler", "nope"], "unknown --hr_upscaler 'nope'")):
        code = main(["--demo", "--device", "cpu", "--outdir", str(tmp_path / "out"), "--n_samples", "1", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out").exists()


def test_metadata_replays_exactly(tmp_path):
    """A hires image's PNG `parameters`, read back into a request (infotext.request_fields), render the
    same pixels; the keys are the webui's, Size the base size."""
    from optimizedSD.engine.engine import Engine
    from optimizedSD.engine.spec import resolve_model
    from optimizedSD.outputs.infotext import parse, read_parameters, request_fields
    from optimizedSD.outputs.writer import RequestWriter, metadata

    spec = resolve_model(None, None, demo=True, device="cpu")
    engine = Engine(spec)
    r = engine.complete(Request("a red circle on a blue background, top left", seed=3, sampler="euler_a",
                                steps=6, n_samples=1, hr_scale=1.5, hr_steps=4, hr_denoise=0.6,
                                hr_upscaler="lanczos"))
    first = [item for batch in engine.render(r) for item in batch][0]
    assert first.image.size == (96, 96)
    writer = RequestWriter(tmp_path, r, metadata(r, spec, engine.checkpoint_hash), skip_grid=True)
    path = writer.add(first.image, first.seed)
    with Image.open(path) as im:
        text = read_parameters(im)
    parsed = parse(text)
    print(text)
    assert (parsed["Size"], parsed["Hires upscale"], parsed["Hires steps"], parsed["Hires upscaler"],
            parsed["Denoising strength"]) == ("64x64", "1.5", "4", "Lanczos", "0.6")
    fields, notes = request_fields(parsed)
    assert notes == [] and "strength" not in fields
    again = engine.complete(Request(n_samples=1, **fields))
    second = [item for batch in engine.render(again) for item in batch][0]
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))


def test_planner_covers_the_second_pass():
    """On meta, full-size SD v1 under --lowvram: a 512 -> 1024 hires run peaks as a plain 1024 run in
    sampling and decoding (the second pass bounds the first); lanczos adds the 1024 encode."""
    from optimizedSD.engine.engine import Engine, RunStats
    from optimizedSD.engine.spec import resolve_model

    engine = Engine(resolve_model(None, None, device="meta"))

    def figures(**kw):
        stats = RunStats()
        r = engine.complete(Request("a fox", seed=1, n_samples=1, steps=20, sampler="euler_a", memory="lowvram", **kw))
        list(engine.render(r, stats=stats))
        return stats.peaks

    plain, big = figures(), figures(width=1024, height=1024)
    latent, lanczos = figures(hr_scale=2), figures(hr_scale=2, hr_upscaler="lanczos")
    print({k: round(v / 2 ** 30, 3) for k, v in latent.items()}, {k: round(v / 2 ** 30, 3) for k, v in lanczos.items()})
    assert latent["sample"] == big["sample"] > plain["sample"] and latent["decode"] == big["decode"]
    assert "encode" not in latent and lanczos["encode"] > 0 and lanczos["sample"] >= big["sample"]
