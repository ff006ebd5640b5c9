"""The browser UI's ControlNet panel, Clip skip, Hires. fix and live preview, used as a person uses them
(Chromium driven by Playwright, every control found by its words), against the CLI run in its own
process with the same settings, and the preprocessor preview against OpenCV's cv2.Canny.

The server is `webui.py --demo --device cpu --controlnet_dir DIR`, DIR holding a tiny random ControlNet
for the demo model in the original layout (`control_model.*`, as tests/test_controlnet.py makes them).
The helpers (browser, pages, waiting for a run) are test_webui.py's.
"""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from test_webui import ROOT, STEPS, browser, cli, fill, open_page, pixels, running_ui, shown, slug_dir, tab, \
    wait_done  # noqa: F401 - browser is a fixture
from playwright.sync_api import expect

CN = dict(prompt="a blue circle on a red background, top right", seed=13, weight=0.7, end=0.75, low=50, high=150)
CLIP_SKIP = dict(prompt="a yellow triangle on a green background", seed=17)
I2I = dict(prompt="a green square on a yellow background", seed=31, strength=0.6)
HIRES = dict(prompt="a white square on a black background", seed=19, scale=2, steps=3, denoise=0.5)


def write_controlnet(folder) -> "Path":  # noqa: F821
    """A ControlNet for the demo model's UNet with random weights (zero convs too, so it acts)."""
    from optimizedSD.model.config import SDConfig
    from optimizedSD.model.controlnet import ControlNet

    cfg = SDConfig.from_yaml(ROOT / "configs" / "demo.yaml")
    torch.manual_seed(0)
    net = ControlNet(cfg.unet).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(0.1 * noise if p.ndim == 1 else noise * p[0].numel() ** -0.5)
    folder.mkdir()
    path = folder / "control_tiny_canny.pth"
    torch.save({f"control_model.{k}": v for k, v in net.state_dict().items()}, path)
    return path


def control_image(path):
    """A 64x64 picture with edges: stripes and a disc."""
    yy, xx = np.mgrid[0:64, 0:64]
    stripes = ((xx + yy) // 6 % 2) * 200 + 30
    disc = ((xx - 24) ** 2 + (yy - 36) ** 2 < 15 ** 2) * 255
    Image.fromarray(np.stack([stripes, disc, 255 - stripes], -1).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The web UI with a ControlNet folder, and the CLI runs it is compared with, started alongside."""
    tmp = tmp_path_factory.mktemp("webui_controlnet")
    net = write_controlnet(tmp / "ControlNet")
    image = control_image(tmp / "edges.png")
    runs = {"controlnet": cli("txt2img", tmp / "cli", "--prompt", CN["prompt"], "--seed", CN["seed"],
                              "--controlnet", net, "--control_image", image, "--control_preprocessor", "canny",
                              "--control_low", CN["low"], "--control_high", CN["high"], "--control_weight",
                              CN["weight"], "--control_end", CN["end"], "--control_mode", "prompt"),
            "img2img": cli("img2img", tmp / "cli", "--prompt", I2I["prompt"], "--seed", I2I["seed"], "--init-img",
                           image, "--strength", I2I["strength"], "--controlnet", net.name, "--controlnet_dir",
                           net.parent, "--control_image", image, "--control_preprocessor", "invert",
                           "--control_resize", "just resize", "--control_mode", "control"),
            "clip_skip": cli("txt2img", tmp / "cli", "--prompt", CLIP_SKIP["prompt"], "--seed", CLIP_SKIP["seed"],
                             "--clip_skip", 2),
            "hires": cli("txt2img", tmp / "cli", "--prompt", HIRES["prompt"], "--seed", HIRES["seed"],
                         "--hr_scale", HIRES["scale"], "--hr_steps", HIRES["steps"], "--hr_denoise", HIRES["denoise"])}
    with running_ui(["--outdir", tmp / "ui", "--controlnet-dir", net.parent], tmp, runs) as (url, _):
        yield dict(url=url, ui=tmp / "ui", cli=tmp / "cli", image=image, net=net)


def unit(page, kind: str = "txt2img", i: int = 0):
    """ControlNet Unit i of a tab, its accordion opened (the panel's first)."""
    panel = page.locator(f"#{kind}-controlnet")
    if not panel.get_by_text(f"ControlNet Unit {i}", exact=True).is_visible():
        panel.get_by_text("ControlNet", exact=True).first.click()
    box = page.locator(f"#{kind}-controlnet-{i}")
    expect(box.get_by_label("Enable", exact=True)).to_be_visible()
    return box


def set_unit(page, box, image, preprocessor=None, model=None, **sliders) -> None:
    """Upload the image, pick the preprocessor and model, type the sliders' values, as a person does."""
    box.locator("input[type=file]").first.set_input_files(str(image))
    expect(box.get_by_role("img").first).to_be_visible()
    for label, option in (("Preprocessor", preprocessor), ("Model", model)):
        if option:
            box.get_by_label(label, exact=True).click()
            page.get_by_role("option", name=option, exact=True).click()
    for label, value in sliders.items():
        field = box.get_by_role("spinbutton", name=f"number input for {label}", exact=True)
        field.fill(str(value))
        field.press("Enter")


def fetched(page, img) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.request.get(img.get_attribute("src")).body())).convert("RGB"))


def same_png(ui, ref) -> None:
    assert np.array_equal(pixels(ui), pixels(ref))
    assert Image.open(ui).text == Image.open(ref).text  # `parameters` and every other chunk


def rendered_like_cli(panel, server, run: dict):
    """Click Generate, wait for the one image of `run` (its prompt and seed), check it is the CLI's PNG
    (pixels and text chunks); (the UI's file, the CLI's)."""
    panel.get_by_role("button", name="Generate").click()
    assert wait_done(panel, run["seed"]).startswith("wrote 1 image(s)")
    name = f"seed_{run['seed']}_00000.png"
    ui, ref = slug_dir(server["ui"], run["prompt"]) / name, slug_dir(server["cli"], run["prompt"]) / name
    same_png(ui, ref)
    return ui, ref


# ---- the tests -------------------------------------------------------------------------------
def test_controlnet_render_gives_the_clis_image_and_parameters(browser, server):
    page = open_page(browser, server)
    panel = tab(page, "txt2img")
    fill(panel, Prompt=CN["prompt"], Seed=CN["seed"], Steps=STEPS)
    box = unit(page)
    box.get_by_label("Enable", exact=True).check()
    set_unit(page, box, server["image"], "canny", server["net"].name, **{
        "Low Threshold": CN["low"], "High Threshold": CN["high"], "Control Weight": CN["weight"],
        "Ending Control Step": CN["end"]})
    box.get_by_label("My prompt is more important", exact=True).check()
    ui, ref = rendered_like_cli(panel, server, CN)
    text = Image.open(ui).text["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: control_tiny_canny [' in text
    assert "Weight: 0.7, " in text and "Guidance End: 0.75, " in text and "My prompt is more important" in text
    assert np.array_equal(shown(page, panel, f"seed {CN['seed']}"), pixels(ref))
    for other in ("img2img", "Inpainting"):  # the panel is on the image tabs too, listing the same model
        tab(page, other)
        kind = "img2img" if other == "img2img" else "inpaint"
        b = unit(page, kind)
        b.get_by_label("Model", exact=True).click()
        expect(page.get_by_role("option", name=server["net"].name, exact=True)).to_be_visible()
        page.keyboard.press("Escape")
    page.context.close()


def test_png_info_fills_the_controlnet_unit_and_hires_fix(browser, server):
    """Send to txt2img from PNG info ticks Unit 0 with the PNG's model, module and settings (the control
    image is not in a PNG: the notes say to give it again), and a hires image ticks Hires. fix."""
    page = open_page(browser, server)
    name = f"seed_{CN['seed']}_00000.png"
    panel = tab(page, "PNG info")
    panel.locator("input[type=file]").set_input_files(str(slug_dir(server["cli"], CN["prompt"]) / name))
    expect(panel.get_by_label("Parameters", exact=True)).to_have_value(re.compile("^" + re.escape(CN["prompt"])))
    panel.get_by_role("button", name="Send to txt2img").click()
    t = page.get_by_role("tabpanel")
    expect(t.get_by_label("Prompt", exact=True)).to_have_value(CN["prompt"])
    box = unit(page)
    expect(box.get_by_label("Enable", exact=True)).to_be_checked()
    expect(box.get_by_label("Model", exact=True)).to_have_value(server["net"].name)
    expect(box.get_by_label("Preprocessor", exact=True)).to_have_value("canny")
    expect(box.get_by_label("My prompt is more important", exact=True)).to_be_checked()
    for label, value in {"Control Weight": CN["weight"], "Ending Control Step": CN["end"],
                         "Low Threshold": CN["low"], "High Threshold": CN["high"]}.items():
        expect(box.get_by_role("spinbutton", name=f"number input for {label}", exact=True)).to_have_value(str(value))
    t.get_by_text("Hires. fix", exact=True).first.click()  # open the section
    expect(t.get_by_role("checkbox", name="Hires. fix", exact=True)).not_to_be_checked()
    notes = tab(page, "PNG info").get_by_label("Notes", exact=True)  # (hidden while txt2img is shown)
    expect(notes).to_have_value(re.compile("ControlNet 0: the control image is not in the PNG; give it again"))

    panel = tab(page, "PNG info")  # a hires image: Hires. fix ticked with its settings, the unit unticked
    panel.locator("input[type=file]").set_input_files(str(slug_dir(server["cli"], HIRES["prompt"]) /
                                                          f"seed_{HIRES['seed']}_00000.png"))
    expect(panel.get_by_label("Parameters", exact=True)).to_have_value(re.compile("^" + re.escape(HIRES["prompt"])))
    panel.get_by_role("button", name="Send to txt2img").click()
    t = page.get_by_role("tabpanel")
    expect(t.get_by_label("Prompt", exact=True)).to_have_value(HIRES["prompt"])
    expect(unit(page).get_by_label("Enable", exact=True)).not_to_be_checked()
    expect(t.get_by_role("checkbox", name="Hires. fix", exact=True)).to_be_checked()
    expect(t.get_by_role("spinbutton", name=re.compile("^(number input for )?Hires steps$"))).to_have_value(
        str(HIRES["steps"]))
    page.context.close()


def test_img2img_with_a_controlnet_gives_the_clis_image(browser, server):
    page = open_page(browser, server)
    panel = tab(page, "img2img")
    panel.locator("input[type=file]").first.set_input_files(str(server["image"]))  # the init image
    fill(panel, Prompt=I2I["prompt"], Seed=I2I["seed"], Steps=STEPS)
    panel.get_by_role("spinbutton", name="Denoising strength").fill(str(I2I["strength"]))
    box = unit(page, "img2img")
    box.get_by_label("Enable", exact=True).check()
    set_unit(page, box, server["image"], "invert (from white bg & black line)", server["net"].name)
    box.get_by_label("ControlNet is more important", exact=True).check()
    box.get_by_label("Just Resize", exact=True).check()
    ui, _ = rendered_like_cli(panel, server, I2I)
    assert 'ControlNet 0: "Module: invert, ' in Image.open(ui).text["parameters"]
    page.context.close()


def test_preview_shows_the_canny_edges_of_cv2(browser, server):
    import cv2

    page = open_page(browser, server)
    tab(page, "txt2img")
    box = unit(page)
    set_unit(page, box, server["image"], "canny", **{"Low Threshold": 60, "High Threshold": 140})
    box.get_by_role("button", name="Preview", exact=True).click()
    preview = page.locator("#txt2img-controlnet-0 .block:has-text('Preprocessor Preview') img").first
    expect(preview).to_be_visible(timeout=30_000)
    edges = cv2.Canny(np.asarray(Image.open(server["image"]).convert("RGB")), 60, 140)
    assert edges.any() and not edges.all()
    assert np.array_equal(fetched(page, preview), np.repeat(edges[..., None], 3, -1))
    page.context.close()


def test_a_bad_window_shows_its_message_and_the_next_request_works(browser, server):
    page = open_page(browser, server)
    panel = tab(page, "txt2img")
    fill(panel, Prompt="a green circle", Seed=23, Steps=STEPS)
    box = unit(page)
    box.get_by_label("Enable", exact=True).check()
    set_unit(page, box, server["image"], model=server["net"].name,
             **{"Starting Control Step": 0.8, "Ending Control Step": 0.2})
    panel.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("ControlNet: Starting Control Step 0.8 and Ending Control Step 0.2 must satisfy "
                            "0 <= start < end <= 1 (fractions of the steps where the net acts)")).to_be_visible(
        timeout=30_000)
    set_unit(page, box, server["image"], **{"Ending Control Step": 1})
    panel.get_by_role("button", name="Generate").click()
    assert wait_done(panel, 23).startswith("wrote 1 image(s)")
    assert "ControlNet 0: " in Image.open(slug_dir(server["ui"], "a green circle") / "seed_23_00000.png").text[
        "parameters"]
    page.context.close()


def test_clip_skip_slider_gives_the_clis_image(browser, server):
    page = open_page(browser, server)
    panel = tab(page, "txt2img")
    fill(panel, Prompt=CLIP_SKIP["prompt"], Seed=CLIP_SKIP["seed"], Steps=STEPS)
    skip = panel.get_by_role("spinbutton", name="number input for Clip skip", exact=True)
    skip.fill("2")
    skip.press("Enter")
    ui, _ = rendered_like_cli(panel, server, CLIP_SKIP)
    assert "Clip skip: 2" in Image.open(ui).text["parameters"]
    page.context.close()


def test_hires_fix_gives_the_clis_image(browser, server):
    page = open_page(browser, server)
    panel = tab(page, "txt2img")
    fill(panel, Prompt=HIRES["prompt"], Seed=HIRES["seed"], Steps=STEPS)
    panel.get_by_text("Hires. fix", exact=True).first.click()  # open the section
    panel.get_by_role("checkbox", name="Hires. fix", exact=True).check()
    for label, value in (("Upscale by", HIRES["scale"]), ("Hires steps", HIRES["steps"]),
                         ("Hires denoising strength", HIRES["denoise"])):
        field = panel.get_by_role("spinbutton", name=re.compile(f"^(number input for )?{label}$"))
        field.fill(str(value))
        field.press("Enter")
    ui, _ = rendered_like_cli(panel, server, HIRES)
    assert Image.open(ui).size == (128, 128) and "Hires upscale: 2" in Image.open(ui).text["parameters"]
    page.context.close()


def test_live_preview_appears_during_the_render(browser, server):
    page = open_page(browser, server)
    panel = tab(page, "txt2img")
    fill(panel, Prompt="a red square", Seed=29, Steps=50, **{"Batch count": 4})
    panel.get_by_role("button", name="Generate").click()
    preview = panel.locator(".block:has-text('Live preview') img").first
    expect(preview).to_be_visible(timeout=60_000)
    status = panel.get_by_label("Status", exact=True).input_value()
    assert not status.startswith("wrote"), "the preview came only after the render"
    image = fetched(page, preview)
    assert image.shape == (8, 8, 3) and image.std() > 0  # the latent approximation: one pixel per latent pixel
    panel.get_by_role("button", name="Interrupt").click()
    assert wait_done(panel, 29).startswith("interrupted")
    page.context.close()


def test_fill_names_a_model_not_in_the_list_and_units_past_the_pages(tmp_path):
    """`ui_controlnet.fill` without a browser: a PNG's unit whose model the server lacks is ticked with no
    model and a note; a third unit (the page has two) is left out with a note."""
    import gradio as gr

    from optimizedSD.engine.control import ControlUnit
    from optimizedSD.fronts import ui_controlnet

    net = write_controlnet(tmp_path / "ControlNet")
    with gr.Blocks():
        units = ui_controlnet.panel("txt2img", [net.parent])
    given = (ControlUnit("control_tiny_canny", None, weight=0.4), ControlUnit("control_v11p_sd15_openpose", None),
             ControlUnit("control_tiny_canny", None))
    notes = []
    updates = ui_controlnet.fill(units, given, notes)
    values = [u.get("value", "-") for u in updates]
    per = len(ui_controlnet.FILLED)
    first, second = dict(zip(ui_controlnet.FILLED, values[:per])), dict(zip(ui_controlnet.FILLED, values[per:]))
    assert first["enable"] is True and first["model"] == str(net) and first["weight"] == 0.4
    assert second["enable"] is True and second["model"] is None
    assert notes == ["ControlNet 1: model 'control_v11p_sd15_openpose' is not in the Model list; pick one (the "
                     "server's ControlNet folders)", "ControlNet 2: the page has 2 units; left out"]
