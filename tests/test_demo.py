"""The bundled demo model (weights/demo.safetensors, configs/demo.yaml) draws what its captions say.

A simple pixel measure (`judge`) reads the colour at the place the caption names and the colour far
from it; an image passes when they are the caption's shape colour and background colour (nearest
of the six colours) and the shape colour at the caption's place. The rates are printed with -s; each
test asserts a floor below what the committed model scores, well above chance (1/6 per colour, 1/5
for the place).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from optimizedSD.model.checkpoint import load_fragments
from optimizedSD.model.paths import DEMO_CKPT, DEMO_CONFIG, ROOT
from optimizedSD.engine.request import DEMO_SCALE
from optimizedSD.model.config import SDConfig
from optimizedSD.tools.demo_data import COLOURS, POSITIONS, SIZE, Scene, all_scenes, render
from optimizedSD.engine.inputs import to_pil
from optimizedSD.engine.inputs import image_tensor, mask_tensor, paste_back
from optimizedSD.engine.offload import Offloader
from optimizedSD.engine.pipeline import Pipeline, SampleSettings
from optimizedSD.sampling.samplers import SAMPLERS

PALETTE = np.array(list(COLOURS.values()), dtype=float)
NAMES = list(COLOURS)


def nearest_colour(rgb) -> str:
    return NAMES[int(((PALETTE - np.asarray(rgb, float)) ** 2).sum(axis=1).argmin())]


def _regions(image: Image.Image, position: str):
    """(pixels as float RGB rows, pixels of a 4-pixel-radius disc at `position`'s centre, pixels more
    than 40% of the side away from it)."""
    a = np.asarray(image.convert("RGB"), dtype=float)
    h, w, _ = a.shape
    fx, fy = POSITIONS[position]
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.hypot(xx + 0.5 - fx * w, yy + 0.5 - fy * h)
    return a.reshape(-1, 3), a[d < 4 * w / SIZE], a[d > 0.4 * w]


def judge(image: Image.Image, scene: Scene) -> bool:
    """Everything the caption says: its shape colour at its place (median of the disc) and its
    background colour far from it (median of the far pixels)."""
    _, inner, outer = _regions(image, scene.position)
    return (nearest_colour(np.median(inner, axis=0)) == scene.colour
            and nearest_colour(np.median(outer, axis=0)) == scene.background)


def judge_colours(image: Image.Image, scene: Scene) -> bool:
    """The caption's colours, wherever the shape is: the background colour is the nearest colour of
    most pixels, and the shape colour the most common other nearest colour (at least 3% of them)."""
    pixels, _, _ = _regions(image, scene.position)
    names = np.array([nearest_colour(p) for p in pixels])
    counts = {c: int((names == c).sum()) for c in COLOURS}
    background = max(counts, key=counts.get)
    shape = max((c for c in COLOURS if c != background), key=counts.get)
    return background == scene.background and shape == scene.colour and counts[shape] >= 0.03 * len(names)


def test_judge_passes_every_training_scene_and_fails_wrong_captions():
    rng = random.Random(0)
    scenes = all_scenes()
    assert len(scenes) == 450
    assert all(judge(render(s, rng), s) for s in scenes)
    wrong = [Scene(s.shape, s.background, s.colour, s.position) for s in scenes]  # colours swapped
    assert not any(judge(render(s, rng), w) for s, w in zip(scenes, wrong))


@pytest.fixture(scope="module")
def demo():
    cfg = SDConfig.from_yaml(ROOT / DEMO_CONFIG)
    # every row of a test's batch through the UNet at once (`draw`): the same images as one at a time
    # (within rounding), in a fifth of the time
    return Pipeline(cfg, Offloader(load_fragments(ROOT / DEMO_CKPT, cfg), torch.device("cpu")), unet_bs=64)


def sample_scenes(n: int, seed: int) -> list[Scene]:
    return random.Random(seed).sample(all_scenes(), n)


def draw(demo, scenes: list[Scene], seeds, sampler="ddim", steps=20, scale=DEMO_SCALE) -> list[Image.Image]:
    """Each scene's caption drawn with each seed (scene-major), all in one batch: what `txt2img_latents`
    gives each caption alone (its cond rows; image i's generator draws its noise and its sampler noise)."""
    pairs = [demo.prompt_pair(s.caption, "") for s in scenes for _ in seeds]
    cond, uncond = (torch.stack([pair[i] for pair in pairs]) for i in (0, 1))
    generators = [torch.Generator("cpu").manual_seed(seed) for _ in scenes for seed in seeds]
    f = demo.cfg.downsample_factor
    noise = torch.cat([torch.randn((1, demo.cfg.channels, SIZE // f, SIZE // f), generator=g) for g in generators])
    return to_pil(demo.decode(demo.sample(cond, uncond, noise, generators, SampleSettings(sampler, steps, scale))))


def test_the_demo_model_is_small_and_in_the_original_layout():
    assert (ROOT / DEMO_CKPT).stat().st_size <= 20 * 10 ** 6
    from optimizedSD.model.checkpoint import checkpoint_shapes, detect_family
    assert detect_family(checkpoint_shapes(ROOT / DEMO_CKPT)) == "sd-v1"


def test_demo_draws_what_the_caption_says(demo):
    """Shape colour at the captioned place and the background colour elsewhere, in nearly every image."""
    scenes = sample_scenes(12, seed=1)
    drawn = list(zip(draw(demo, scenes, seeds=[0, 1]), [s for s in scenes for _ in range(2)]))
    colours = sum(judge_colours(im, s) for im, s in drawn)
    placed = sum(judge(im, s) for im, s in drawn)
    print(f"txt2img, 12 captions x 2 seeds, DDIM 20 steps, scale {DEMO_SCALE:g}: colours right {colours}/24, "
          f"colours and place right {placed}/24")
    assert colours >= 20 and placed >= 20


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_draws_what_the_caption_says(demo, sampler):
    scenes = sample_scenes(6, seed=2)
    results = [judge(im, s) for im, s in zip(draw(demo, scenes, seeds=[3], sampler=sampler), scenes)]
    print(f"{sampler}: {sum(results)}/6 pass")
    assert sum(results) >= 5


def test_img2img_at_low_strength_keeps_the_layout(demo):
    """Start from a rendered scene, prompt another shape colour: at strength 0.3 the picture keeps the
    input's layout (a shape at its place, its background) and takes the prompt's colour; at 1.0 the
    input is gone and the prompt is drawn, colours and place."""
    kept, drawn = 0, 0
    scenes = sample_scenes(6, seed=3)
    for i, scene in enumerate(scenes):
        other = next(c for c in COLOURS if c not in (scene.colour, scene.background))
        prompt = Scene(scene.shape, other, scene.background, scene.position)
        init = image_tensor(render(scene))
        for strength in (0.3, 1.0):
            latents = demo.img2img_latents(prompt.caption, "", [i], init, SampleSettings("ddim", 20, DEMO_SCALE),
                                            strength)
            image = to_pil(demo.decode(latents))[0]
            if strength < 1:
                kept += judge(image, prompt)  # the prompt's scene has the input's place and background
            else:
                drawn += judge(image, prompt)
    print(f"img2img: strength 0.3 keeps the layout {kept}/6; strength 1.0 draws the prompt {drawn}/6")
    assert kept >= 5 and drawn >= 5


QUADRANTS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}


def test_inpainting_replaces_the_shape_in_the_masked_quadrant_and_nothing_else(demo):
    """A circle in one corner, its quadrant masked, a prompt for a square of another colour at the same
    place: every unmasked pixel is the original's, the new colour is drawn at the place and the
    background kept around it (`judge`), and the old shape's colour is gone from the quadrant.
    (Adding a second shape beside the first is not tested: every training scene has one shape.)"""
    replaced = 0
    cases = [("red", "blue", "bottom right"), ("yellow", "black", "top left"), ("white", "green", "top right"),
             ("blue", "yellow", "bottom left"), ("green", "white", "bottom right"), ("black", "red", "top left")]
    h = SIZE // 2
    for i, (colour, background, position) in enumerate(cases):
        original = render(Scene("circle", colour, background, position))
        wanted = Scene("square", next(c for c in COLOURS if c not in (colour, background)), background, position)
        row, col = QUADRANTS[position]
        m = np.zeros((SIZE, SIZE), np.uint8)
        m[row * h:(row + 1) * h, col * h:(col + 1) * h] = 255
        mask = Image.fromarray(m)
        latents = demo.inpaint_latents(wanted.caption, "", [i], image_tensor(original), mask_tensor(mask),
                                       SampleSettings("ddim", 20, DEMO_SCALE))
        result = paste_back(to_pil(demo.decode(latents))[0], original, mask)
        a, o = np.asarray(result), np.asarray(original)
        assert np.array_equal(a[m == 0], o[m == 0])
        quadrant = [nearest_colour(p) for p in a[m > 0]]
        replaced += judge(result, wanted) and quadrant.count(colour) < 0.05 * len(quadrant)
    print(f"inpainting: the circle replaced by the prompt's square {replaced}/{len(cases)}")
    assert replaced >= 3


def test_training_script_writes_a_loadable_model(tmp_path):
    """A few steps of train_demo.py: the files load with the ordinary loader (the full run is in the README)."""
    from optimizedSD.tools.train_demo import main

    out, config = tmp_path / "demo.safetensors", tmp_path / "demo.yaml"
    assert main(["--out", str(out), "--config-out", str(config), "--images", "64", "--vae-steps", "2",
                 "--steps", "2", "--batch", "4"]) == 0
    cfg = SDConfig.from_yaml(config)
    fragments = load_fragments(out, cfg)
    assert set(fragments) == {"text_encoder", "unet_in", "unet_out", "vae"}
    assert cfg.unet.context_dim == cfg.text.hidden_size == 64 and cfg.scale_factor != 0.18215
    shipped = SDConfig.from_yaml(ROOT / DEMO_CONFIG)
    assert (cfg.unet, cfg.vae, cfg.text) == (shipped.unet, shipped.vae, shipped.text)


def test_training_is_reproducible(tmp_path):
    """The same seed and arguments write the same bytes; another seed does not."""
    from optimizedSD.tools.train_demo import main

    short = ["--images", "64", "--vae-steps", "3", "--steps", "3", "--batch", "4"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(["--out", str(tmp_path / f"{name}.safetensors"), "--config-out", str(tmp_path / f"{name}.yaml"),
                     "--seed", str(seed)] + short) == 0
    written = {name: (tmp_path / f"{name}.safetensors").read_bytes() for name in "abc"}
    assert written["a"] == written["b"] and written["a"] != written["c"]


def test_demo_flag_writes_a_64px_image(tmp_path, capsys):
    from test_cli import run_cli

    code, out, err = run_cli(["--demo", "--prompt", "a red circle on a blue background, top left", "--seed", 0,
                              "--n_samples", 1, "--outdir", tmp_path, "--device", "cpu", "--skip_grid"], capsys)
    assert code == 0, err
    image = Image.open(next(Path(tmp_path).rglob("seed_0_*.png")))
    assert image.size == (SIZE, SIZE)
    assert image.text["checkpoint"] == "demo.safetensors"
    assert (image.text["sampler"], float(image.text["scale"])) == ("ddim", DEMO_SCALE)  # the demo's defaults
