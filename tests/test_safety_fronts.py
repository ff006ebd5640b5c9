"""The safety checker and the watermark through the server's fronts: one `webui.py --api --safety_checker DIR
--watermark` on the demo model, driven by a real browser (the UI) and by HTTP (the API). The flags are
checked against diffusers' StableDiffusionSafetyChecker on the unchecked images (tests/test_safety.py's
small random checker, thresholds set so that some images are flagged and some not); the images against
what the CLI writes with the same flags (the CLI's watermark and checker are checked against their
references in tests/test_watermark.py and tests/test_safety.py)."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from test_safety import reference_flags, reference_inputs, reference_scores, tiny_reference
from test_webui import STEPS, browser, fill, open_page, running_ui, tab, wait_done  # noqa: F401 (browser: a fixture)
from test_webui import cli as webui_cli

from optimizedSD.engine.request import WATERMARK

PROMPT = "a red circle on a blue background, top left"
SEEDS = [20, 21, 22]


def cli(tmp, name, *argv) -> list[Image.Image]:
    """The demo model's images from the CLI (test_webui's run: the server's environment, one thread, so
    that bf16 sums are added in the same order), in seed order."""
    out = tmp / name
    run = webui_cli("txt2img", out, "--skip_grid", "--prompt", PROMPT, *argv)
    log, _ = run.communicate(timeout=300)
    assert run.returncode == 0, log
    return [Image.open(p) for p in sorted(out.rglob("seed_*.png"), key=lambda p: int(p.name.split("_")[1]))]


def rgb(im) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server, its checker (flagging some of the three 64x64 images of SEEDS, not all) and the flags
    diffusers' checker gives those images."""
    tmp = tmp_path_factory.mktemp("safety_fronts")
    plain = cli(tmp, "plain", "--seed", SEEDS[0], "--n_samples", len(SEEDS))
    ref = tiny_reference(concepts=1, special=1, seed=1)
    with torch.no_grad():  # the concept: how the first image's embedding differs from their mean (the scores spread)
        embeds = ref.visual_projection(ref.vision_model(reference_inputs(plain))[1])
    ref.concept_embeds = torch.nn.Parameter((embeds[0] - embeds.mean(0))[None].clone(), requires_grad=False)
    special, cos = reference_scores(ref, reference_inputs(plain))
    scores = cos[:, 0].sort().values
    i = int((scores[1:] - scores[:-1]).argmax())  # between the two scores farthest apart: some flagged, some not
    low, high = scores[i], scores[i + 1]
    assert high - low > 0.004  # clear of the 3-decimal rounding
    ref.concept_embeds_weights = torch.nn.Parameter(((low + high) / 2)[None], requires_grad=False)
    ref.special_care_embeds_weights = torch.nn.Parameter(special.max(0).values + 1, requires_grad=False)
    flags = reference_flags(ref, plain)
    assert 0 < sum(flags) < len(flags), flags
    ref.save_pretrained(tmp / "checker")
    with running_ui(["--api", "--safety_checker", tmp / "checker", "--watermark", "--outdir", tmp / "ui"], tmp, {}) as (url, _):
        yield dict(url=url, tmp=tmp, flags=flags, checker=tmp / "checker")


def post(server, **body) -> requests.Response:
    return requests.post(server["url"] + "sdapi/v1/txt2img", json={
        "prompt": PROMPT, "steps": STEPS, "cfg_scale": 3, "sampler_name": "DDIM", "width": 64, "height": 64, **body},
        timeout=300)


def images(r: requests.Response) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in r.json()["images"]]


def test_api_flags_what_diffusers_flags_and_gives_the_clis_images(server):
    r = post(server, seed=SEEDS[0], batch_size=len(SEEDS), watermark="")  # "": none (64x64 is too small for one)
    assert r.status_code == 200, r.text
    got = images(r)  # not saved: no grid
    want = cli(server["tmp"], "checked", "--seed", SEEDS[0], "--n_samples", len(SEEDS), "--safety_checker", server["checker"])
    info = json.loads(r.json()["info"])
    for seed, image, ref, flagged, text in zip(SEEDS, got, want, server["flags"], info["infotexts"]):
        assert np.array_equal(rgb(image), rgb(ref)) and image.text == ref.text  # the PNG's chunks too
        assert ref.text["Safety check"] == ("flagged, black" if flagged else "passed")
        assert text == ref.text["parameters"] and "Safety checker: checker (black)" in text and "Watermark" not in text
        assert not flagged or not rgb(image).any()
        assert (f"safety checker: seed {seed} flagged (flagged, black)" in info["warnings"]) == flagged


def test_api_watermarks_by_the_servers_default_and_refuses_a_payload_too_long(server):
    r = post(server, seed=30, width=256, height=256)
    assert r.status_code == 200, r.text
    (want,) = cli(server["tmp"], "marked", "--seed", 30, "--W", 256, "--H", 256, "--n_samples", 1,
                  "--safety_checker", server["checker"], "--watermark")
    (got,) = images(r)  # one image: no grid
    assert np.array_equal(rgb(got), rgb(want))
    assert f"Watermark: dwtDct {WATERMARK}" in want.text["parameters"]
    assert json.loads(r.json()["info"])["infotexts"][0] == want.text["parameters"]
    r = post(server, seed=30, width=256, height=256, watermark="x" * 200)
    assert r.status_code == 422 and "watermark" in r.text
    r = post(server, seed=30)  # 64x64 with the server's watermark: too small for the method
    assert r.status_code == 422 and "watermark" in r.text and "256x256" in r.text


def test_ui_watermark_box_holds_the_servers_default_and_the_status_names_flagged_seeds(browser, server):  # noqa: F811
    page = open_page(browser, server)
    panel = tab(page, "txt2img")
    box = panel.get_by_label("Watermark")  # its label holds its info line too
    assert box.input_value() == WATERMARK  # webui.py --watermark
    box.fill("")
    fill(panel, Prompt=PROMPT, Seed=SEEDS[0], Steps=STEPS)
    panel.get_by_label("Batch size", exact=True).fill(str(len(SEEDS)))
    panel.get_by_role("button", name="Generate").click()
    status = wait_done(panel, SEEDS[0])
    for seed, flagged in zip(SEEDS, server["flags"]):
        assert (f"safety checker: seed {seed} flagged" in status) == flagged, status
    want = cli(server["tmp"], "checked-ui", "--seed", SEEDS[0], "--n_samples", len(SEEDS), "--safety_checker",
               server["checker"])
    saved = sorted((server["tmp"] / "ui").rglob("seed_2[012]_*.png"), key=lambda p: p.name)
    assert len(saved) == len(SEEDS)
    for path, ref in zip(saved, want):
        assert np.array_equal(rgb(Image.open(path)), rgb(ref)) and Image.open(path).text == ref.text
    page.context.close()
