"""The browser UI used as a person uses it: the server (`python optimizedSD/webui.py --demo --device cpu`)
runs in a subprocess, Chromium (Debian's package, /usr/bin/chromium) is driven with Playwright, every
control is found by the words on the page. The images are compared with what the CLI, run in its own
subprocess with the same settings, writes: the same pixels, the same file names and metadata.

Screenshots of each tab for the README: `WEBUI_SCREENSHOTS=1 python -m pytest tests/test_webui.py`
writes docs/webui-*.png. Without Chromium or Playwright the tests skip, unless
OPTIMIZEDSD_REQUIRE_BROWSER=1 (as in .ci/run), which makes that a failure.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = ROOT / "docs" if os.environ.get("WEBUI_SCREENSHOTS") else None
STEPS = 8
PROMPT = "a red circle on a blue background, top left"
I2I = dict(prompt="a green square on a yellow background, bottom right", seed=7, strength=0.5)
# typed, then a LoRA and an embedding picked: the prompt the CLI is given
CUSTOM = dict(typed="a purple circle on an orange background", seed=9,
              prompt="a purple circle on an orange background <lora:inkwash:1> <lora:mix:1> glossy-style")
RUN_TIMEOUT = 120_000  # ms a render may take on a loaded CPU

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None
if sync_playwright is None or not CHROMIUM.is_file():
    reason = "needs the playwright package and Debian's chromium at /usr/bin/chromium (see .ci/run)"
    if os.environ.get("OPTIMIZEDSD_REQUIRE_BROWSER") == "1":
        raise RuntimeError(reason)
    pytest.skip(reason, allow_module_level=True)


# ---- the server, the CLI runs, the browser ---------------------------------------------------
class OpenCounter:
    """Counts open(2) calls on one file by any process (Linux inotify IN_OPEN): an observation of the
    server's checkpoint reads independent of the engine's own counter."""
    IN_OPEN, IN_NONBLOCK = 0x20, 0o4000

    def __init__(self, path: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(self.IN_NONBLOCK)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, str(path).encode(), self.IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), "inotify")
        self.count = 0

    def opens(self) -> int:
        """Opens seen so far."""
        while True:
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                return self.count
            at = 0
            while at < len(data):  # struct inotify_event: wd, mask, cookie, len, name[len]
                self.count += 1
                at += 16 + int.from_bytes(data[at + 12:at + 16], sys.byteorder)


def picture(path: Path) -> Path:
    """A 64x64 demo-style picture: a red square on blue, top left."""
    a = np.zeros((64, 64, 3), np.uint8)
    a[...] = (20, 40, 200)
    a[6:28, 8:30] = (220, 30, 30)
    Image.fromarray(a).save(path)
    return path


def customizations(tmp: Path) -> tuple[Path, Path]:
    """(a LoRA folder with a kohya LoRA for the demo model, an embeddings folder with a webui .pt), and a
    LyCORIS file mixing LoHa, LoKr and DoRA modules in the LyCORIS folder beside the first: random weights
    of visible effect."""
    import torch
    from lora_files import TEXT_TARGETS, UNET_TARGETS, kohya_state, lora_tensors, write_kohya
    from lycoris_files import demo_file
    from safetensors.torch import load_file

    from optimizedSD.model.config import SDConfig

    cfg = SDConfig.from_yaml(ROOT / "configs" / "demo.yaml")
    state = load_file(str(ROOT / "weights" / "demo.safetensors"))
    unet, text, _, _ = lora_tensors((cfg, None, state, None), 4, UNET_TARGETS, TEXT_TARGETS, rank=2, alpha=2)
    (tmp / "loras").mkdir()
    write_kohya(tmp / "loras" / "inkwash.safetensors", kohya_state(unet, text, alpha=2))
    (tmp / "LyCORIS").mkdir()
    demo_file(tmp / "LyCORIS" / "mix.safetensors")
    (tmp / "embeddings").mkdir()
    vectors = torch.randn(2, cfg.text.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.5
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "glossy-style"},
               tmp / "embeddings" / "glossy-style.pt")
    return tmp / "loras", tmp / "embeddings"


def cli(kind: str, outdir: Path, *args) -> subprocess.Popen:
    script = ROOT / "optimizedSD" / f"optimized_{kind}.py"
    return subprocess.Popen([sys.executable, str(script), "--demo", "--device", "cpu", "--ddim_steps", str(STEPS),
                             "--n_samples", "1", "--outdir", str(outdir), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The web UI on the demo model (a copy of its checkpoint, watched for opens), and the CLI runs
    it is compared with, started alongside it."""
    tmp = tmp_path_factory.mktemp("webui")
    weights = tmp / "weights"
    weights.mkdir()
    ckpt = shutil.copy(ROOT / "weights" / "demo.safetensors", weights / "demo.safetensors")
    counter = OpenCounter(ckpt)
    init = picture(tmp / "in.png")
    loras, embeddings = customizations(tmp)
    custom = ["--lora_dir", loras, "--embeddings", embeddings]
    runs = {"txt2img": cli("txt2img", tmp / "cli", "--prompt", PROMPT, "--seed", 5),
            "img2img": cli("img2img", tmp / "cli", "--prompt", I2I["prompt"], "--seed", I2I["seed"],
                           "--init-img", init, "--strength", I2I["strength"]),
            "custom": cli("txt2img", tmp / "cli", "--prompt", CUSTOM["prompt"], "--seed", CUSTOM["seed"], *custom)}
    with running_ui(["--ckpt", ckpt, "--outdir", tmp / "ui", *custom], tmp, runs) as (url, log):
        yield dict(url=url, ui=tmp / "ui", cli=tmp / "cli", init=init, tmp=tmp, counter=counter,
                   opens_at_start=counter.opens(), log=log)


@contextlib.contextmanager
def running_ui(args: list, tmp, runs: dict):
    """`webui.py --demo --device cpu ARGS` on a free port, up (its "serving ..." line seen), with the CLI
    runs `runs` (started beside it) finished: yields (its URL, the lines it printed); stopped after."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "optimizedSD" / "webui.py"), "--demo", "--device", "cpu",
                             "--port", str(port), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**env(), "GRADIO_TEMP_DIR": str(tmp / "gradio")})
    lines: queue.Queue = queue.Queue()
    log: list[str] = []
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 240
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            pytest.fail("the web UI did not start in 240 s:\n" + "".join(log))
        log.append(line)
        if line.startswith(("serving on ", "serving the UI and the API ")):  # with --api: both
            break
    for kind, run in runs.items():
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, f"{kind} CLI failed:\n{out}"
    try:
        yield f"http://127.0.0.1:{port}/", log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, server):
    """A page in a fresh browser context (its own gradio session); requests that would leave the
    machine are recorded and refused."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.external = []

    def route(r):
        if r.request.url.startswith(server["url"]) or r.request.url.startswith("data:"):
            return r.continue_()
        page.external.append(r.request.url)
        return r.abort()
    page.route("**/*", route)
    page.goto(server["url"])
    expect(page.get_by_role("button", name="Generate").first).to_be_visible(timeout=60_000)
    return page


def tab(page, name: str):
    page.get_by_role("tab", name=name).click()
    return page.get_by_role("tabpanel")


def fill(panel, **values) -> None:
    for label, value in values.items():
        panel.get_by_label(label, exact=True).fill(str(value))


def wait_done(panel, seed: int):
    """The status once the run of first seed `seed` has ended (written or interrupted); an error shown
    on the page instead fails the test with its words."""
    status = panel.get_by_label("Status", exact=True)
    done = re.compile(rf"^(wrote|interrupted)[^\n]*\(seeds {seed}-", re.M)  # a line of it: notes may come first
    errors = panel.page.locator(".toast-body")
    deadline = time.monotonic() + RUN_TIMEOUT / 1000
    while time.monotonic() < deadline:
        if done.search(status.input_value()):
            return status.input_value()
        if errors.count():
            pytest.fail("the page shows: " + " | ".join(errors.all_inner_texts()))
        time.sleep(0.2)
    pytest.fail(f"no result for seed {seed} in {RUN_TIMEOUT / 1000:.0f} s; status: {status.input_value()!r}")


def shown(page, panel, caption: str) -> np.ndarray:
    """The pixels of the gallery image with this caption, as the browser fetched them."""
    src = panel.get_by_role("img", name=caption, exact=True).first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        SCREENSHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"webui-{name}.png"), full_page=True)


def slug_dir(root: Path, prompt: str) -> Path:
    (folder,) = [p for p in root.iterdir() if p.name.startswith(prompt.split(",")[0].replace(" ", "_"))]
    return folder


# ---- the tests -------------------------------------------------------------------------------
def test_txt2img_gives_the_clis_image_and_files(browser, server):
    page = open_page(browser, server)
    panel = tab(page, "txt2img")
    fill(panel, Prompt=PROMPT, Seed=5, Steps=STEPS)
    panel.get_by_role("button", name="Generate").click()
    status = wait_done(panel, 5)
    assert status.startswith("wrote 1 image(s) and a grid to ") and "checkpoint reads since the server started: 1" in status
    ui, ref = slug_dir(server["ui"], PROMPT), slug_dir(server["cli"], PROMPT)
    assert ui.name == ref.name and sorted(os.listdir(ui)) == sorted(os.listdir(ref)) == ["grid_0000.png", "seed_5_00000.png"]
    cli_png = Image.open(ref / "seed_5_00000.png")
    assert np.array_equal(pixels(ui / "seed_5_00000.png"), pixels(ref / "seed_5_00000.png"))
    assert np.array_equal(shown(page, panel, "seed 5"), pixels(ref / "seed_5_00000.png"))
    assert Image.open(ui / "seed_5_00000.png").text == cli_png.text  # every metadata chunk, `parameters` too

    panel.get_by_role("img", name="seed 5", exact=True).first.click()
    expect(panel.get_by_label("Parameters of the selected image")).to_have_value(cli_png.text["parameters"])
    assert "Sampler: DDIM, CFG scale: 3.0, Seed: 5, Size: 64x64" in cli_png.text["parameters"]
    screenshot(page, "txt2img")

    panel.get_by_role("button", name="Send to img2img").click()
    panel = page.get_by_role("tabpanel")
    expect(page.get_by_role("tab", name="img2img")).to_have_attribute("aria-selected", "true")
    expect(panel.get_by_label("Prompt", exact=True)).to_have_value(PROMPT)
    expect(panel.get_by_label("Seed", exact=True)).to_have_value("5")
    expect(panel.get_by_role("img").first).to_be_visible()
    panel = tab(page, "txt2img")
    panel.get_by_role("button", name="Send to Inpainting").click()
    expect(page.get_by_role("tab", name="Inpainting")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_role("tabpanel").get_by_label("Prompt", exact=True)).to_have_value(PROMPT)
    assert page.external == []
    page.context.close()


def test_img2img_upload_gives_the_clis_image(browser, server):
    page = open_page(browser, server)
    panel = tab(page, "img2img")
    panel.locator("input[type=file]").set_input_files(str(server["init"]))
    fill(panel, Prompt=I2I["prompt"], Seed=I2I["seed"], Steps=STEPS)
    panel.get_by_role("spinbutton", name="Denoising strength").fill(str(I2I["strength"]))
    panel.get_by_role("button", name="Generate").click()
    assert wait_done(panel, I2I["seed"]).startswith("wrote 1 image(s)")
    ui, ref = slug_dir(server["ui"], I2I["prompt"]), slug_dir(server["cli"], I2I["prompt"])
    name = f"seed_{I2I['seed']}_00000.png"
    assert np.array_equal(pixels(ui / name), pixels(ref / name))
    assert np.array_equal(shown(page, panel, f"seed {I2I['seed']}"), pixels(ref / name))
    assert Image.open(ui / name).text == Image.open(ref / name).text  # init_image: in.png, strength 0.5, ...
    screenshot(page, "img2img")
    page.context.close()


def pick(page, panel, label: str, option: str) -> None:
    panel.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()


def test_lora_and_embedding_pickers_give_the_clis_image(browser, server):
    """Picking a LoRA, a LyCORIS file and an embedding adds them to the prompt; the image and its metadata (Lora and
    TI hashes) are the CLI's with that prompt."""
    page = open_page(browser, server)
    panel = tab(page, "txt2img")
    fill(panel, Prompt=CUSTOM["typed"], Seed=CUSTOM["seed"], Steps=STEPS)
    pick(page, panel, "Add LoRA", "inkwash")
    pick(page, panel, "Add LoRA", "mix")  # a LyCORIS file, from the LyCORIS folder
    pick(page, panel, "Add embedding", "glossy-style")
    expect(panel.get_by_label("Prompt", exact=True)).to_have_value(CUSTOM["prompt"])
    panel.get_by_role("button", name="Generate").click()
    assert wait_done(panel, CUSTOM["seed"]).startswith("wrote 1 image(s)")
    name = f"seed_{CUSTOM['seed']}_00000.png"
    ui, ref = slug_dir(server["ui"], CUSTOM["typed"]) / name, slug_dir(server["cli"], CUSTOM["typed"]) / name
    assert np.array_equal(pixels(ui), pixels(ref))
    text = Image.open(ui).text
    assert text == Image.open(ref).text and 'Lora hashes: "inkwash: ' in text["parameters"]
    assert ", mix: " in text["parameters"]
    assert 'TI hashes: "glossy-style: ' in text["parameters"]
    page.context.close()


def draw(page, panel, points: list[tuple[int, int]], image_size: int = 64) -> None:
    """Drag the mouse along `points` (image pixels) on the inpainting canvas, as a person paints."""
    canvas = panel.locator("canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    zoom = float(panel.get_by_text(re.compile(r"^\d+%$")).inner_text()[:-1]) / 100  # the editor's zoom
    x0, y0 = box["x"] + (box["width"] - image_size * zoom) / 2, box["y"] + (box["height"] - image_size * zoom) / 2
    page.mouse.move(x0 + points[0][0] * zoom, y0 + points[0][1] * zoom)
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(x0 + x * zoom, y0 + y * zoom, steps=4)
    page.mouse.up()


def test_inpainting_repaints_the_brush_stroke_only(browser, server):
    page = open_page(browser, server)
    panel = tab(page, "Inpainting")
    zoom = panel.get_by_text(re.compile(r"^\d+%$"))  # the editor's zoom: fitted to the canvas, then to the image
    expect(zoom).to_be_visible()
    empty = zoom.inner_text()
    panel.locator("input[type=file]").first.set_input_files(str(server["init"]))
    expect(zoom).not_to_have_text(empty)
    fill(panel, Prompt="a green circle on a blue background, bottom right", Seed=3, Steps=STEPS)
    stroke = [(36, 46), (44, 46), (52, 46)]  # the brush is 4 px in radius
    draw(page, panel, stroke)
    panel.get_by_role("button", name="Generate").click()
    assert wait_done(panel, 3).startswith("wrote 1 image(s)")
    out = pixels(slug_dir(server["ui"], "a green circle") / "seed_3_00000.png").astype(int)
    changed = np.abs(out - pixels(server["init"]).astype(int)).sum(-1) > 0
    near = np.zeros_like(changed)
    near[46 - 8:46 + 9, 36 - 8:52 + 9] = True  # the stroke and a margin of twice the brush radius
    assert changed[near].sum() >= 20, "the stroke was not repainted"
    assert not changed[~near].any(), f"{changed[~near].sum()} pixels changed away from the stroke"
    screenshot(page, "inpainting")

    # An uploaded mask (white: repaint) instead of painting one.
    mask = np.zeros((64, 64), np.uint8)
    mask[40:60, 4:24] = 255
    Image.fromarray(mask).save(server["tmp"] / "mask.png")
    panel.locator("input[type=file]").nth(1).set_input_files(str(server["tmp"] / "mask.png"))
    fill(panel, Prompt="a yellow square", Seed=4)
    panel.get_by_role("button", name="Generate").click()
    assert wait_done(panel, 4).startswith("wrote 1 image(s)")
    out = pixels(slug_dir(server["ui"], "a yellow square") / "seed_4_00000.png").astype(int)
    changed = np.abs(out - pixels(server["init"]).astype(int)).sum(-1) > 0
    assert changed[mask > 0].sum() >= 100 and not changed[mask == 0].any()
    page.context.close()


def test_bad_input_shows_its_message_and_the_next_request_succeeds(browser, server):
    page = open_page(browser, server)
    panel = tab(page, "txt2img")
    fill(panel, Prompt="a blue triangle", Seed=11, Steps=STEPS, Width=60)
    panel.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("Width 60 is not a positive multiple of 8; try 56 or 64")).to_be_visible(timeout=30_000)
    fill(panel, Width=64, Memory="lots")
    panel.get_by_role("button", name="Generate").click()
    expect(page.get_by_text(re.compile(r"^Memory: .*\(or one of default, lowvram, turbo\)$"))).to_be_visible(
        timeout=30_000)
    panel.get_by_label("Memory", exact=True).fill("default")
    panel.get_by_role("button", name="Generate").click()
    assert wait_done(panel, 11).startswith("wrote 1 image(s)")
    assert sorted(os.listdir(slug_dir(server["ui"], "a blue triangle"))) == ["grid_0000.png", "seed_11_00000.png"]
    page.context.close()


def test_two_pages_submitting_at_once_both_get_their_images(browser, server):
    pages = [open_page(browser, server) for _ in range(2)]
    panels = [tab(p, "txt2img") for p in pages]
    for panel, seed in zip(panels, (21, 31)):
        fill(panel, Prompt="a yellow circle", Seed=seed, Steps=STEPS)
    for panel in panels:
        panel.get_by_role("button", name="Generate").click()
    for page, panel, seed in zip(pages, panels, (21, 31)):
        assert wait_done(panel, seed).startswith("wrote 1 image(s)")
        expect(panel.get_by_role("img", name=f"seed {seed}", exact=True).first).to_be_visible()
        page.context.close()
    files = sorted(os.listdir(slug_dir(server["ui"], "a yellow circle")))  # numbered in the order they ran
    assert files in (["grid_0000.png", "grid_0001.png", "seed_21_00000.png", "seed_31_00001.png"],
                     ["grid_0000.png", "grid_0001.png", "seed_21_00001.png", "seed_31_00000.png"])


def test_a_waiting_page_sees_its_place_and_interrupt_keeps_finished_batches(browser, server):
    long, short = open_page(browser, server), open_page(browser, server)
    lp, sp = tab(long, "txt2img"), tab(short, "txt2img")
    fill(lp, Prompt="a red square", Seed=100, Steps=50, **{"Batch count": 10})  # DDIM: 50 steps a batch
    fill(sp, Prompt="a green triangle", Seed=200, Steps=STEPS)
    lp.get_by_role("button", name="Generate").click()
    # The live step bar, past the first batch (so that batch was written).
    expect(lp.get_by_text(re.compile(r"\b([6-9]\d|[1-4]\d\d)/500 steps"))).to_be_visible(timeout=RUN_TIMEOUT)
    sp.get_by_role("button", name="Generate").click()
    expect(sp.get_by_text(re.compile(r"queue: 1/\d"))).to_be_visible(timeout=30_000)
    expect(lp.get_by_text(re.compile(r"\d+/500 steps"))).to_be_visible()  # still running: one at a time
    lp.get_by_role("button", name="Interrupt").click()
    status = wait_done(lp, 100)
    kept = int(re.match(r"interrupted: kept the (\d+) image\(s\)", status).group(1))
    assert 1 <= kept < 10
    files = sorted(os.listdir(server["ui"] / "a_red_square"))
    assert files == [f"seed_{100 + i}_{i:05d}.png" for i in range(kept)]  # no grid, nothing half-written
    assert lp.get_by_role("img", name=re.compile(r"^seed \d+$")).count() == kept
    assert wait_done(sp, 200).startswith("wrote 1 image(s)")
    long.context.close()
    short.context.close()


def test_png_info_reads_ours_and_the_webuis_and_fills_txt2img(browser, server):
    page = open_page(browser, server)
    panel = tab(page, "PNG info")
    ours = slug_dir(server["cli"], PROMPT) / "seed_5_00000.png"
    panel.locator("input[type=file]").set_input_files(str(ours))
    expect(panel.get_by_label("Parameters", exact=True)).to_have_value(Image.open(ours).text["parameters"])
    screenshot(page, "png-info")
    panel.get_by_role("button", name="Send to txt2img").click()
    expect(page.get_by_role("tab", name="txt2img")).to_have_attribute("aria-selected", "true")
    t = page.get_by_role("tabpanel")
    expect(t.get_by_label("Prompt", exact=True)).to_have_value(PROMPT)
    expect(t.get_by_label("Seed", exact=True)).to_have_value("5")
    expect(t.get_by_label("Steps", exact=True)).to_have_value(str(STEPS))

    # A PNG as AUTOMATIC1111's webui writes it (its newer Schedule type field).
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", "a cat\nNegative prompt: dogs\nSteps: 23, Sampler: DPM++ 2M, Schedule type: Karras, "
                                "CFG scale: 6.5, Seed: 1234, Size: 128x96, Model hash: 6ce0161689, Version: v1.10.1")
    Image.new("RGB", (128, 96)).save(server["tmp"] / "webui.png", pnginfo=info)
    panel = tab(page, "PNG info")
    panel.locator("input[type=file]").set_input_files(str(server["tmp"] / "webui.png"))
    expect(panel.get_by_label("Parameters", exact=True)).to_have_value(re.compile("^a cat"))
    panel.get_by_role("button", name="Send to txt2img").click()
    t = page.get_by_role("tabpanel")
    for label, value in {"Prompt": "a cat", "Negative prompt": "dogs", "Steps": "23", "CFG scale": "6.5",
                         "Seed": "1234", "Width": "128", "Height": "96", "Sampler": "DPM++ 2M"}.items():
        expect(t.get_by_label(label, exact=True)).to_have_value(value)
    expect(t.get_by_label("Karras", exact=True)).to_be_checked()
    page.context.close()


def test_closing_a_page_stops_its_render(browser, server):
    """A page closed mid-run stops its render at the next step (gradio's unload), as Interrupt does."""
    gone, waiting = open_page(browser, server), open_page(browser, server)
    gp, wp = tab(gone, "txt2img"), tab(waiting, "txt2img")
    fill(gp, Prompt="a white square", Seed=300, Steps=50, **{"Batch count": 10})
    fill(wp, Prompt="a black triangle", Seed=400, Steps=STEPS)
    gp.get_by_role("button", name="Generate").click()
    expect(gp.get_by_text(re.compile(r"\d+/500 steps"))).to_be_visible(timeout=RUN_TIMEOUT)
    gone.context.close()
    wp.get_by_role("button", name="Generate").click()
    assert wait_done(wp, 400).startswith("wrote 1 image(s)")
    folder = server["ui"] / "a_white_square"
    files = sorted(os.listdir(folder)) if folder.exists() else []
    assert len(files) < 10 and not any(f.startswith("grid") for f in files), files
    waiting.context.close()


def test_the_checkpoint_is_read_once_per_server(browser, server):
    page = open_page(browser, server)
    panel = tab(page, "txt2img")
    fill(panel, Prompt="a blue circle", Seed=1, Steps=STEPS, **{"Batch size": 2})
    panel.get_by_role("button", name="Generate").click()
    assert "checkpoint reads since the server started: 1" in wait_done(panel, 1)
    assert server["counter"].opens() == server["opens_at_start"], "a request opened the checkpoint again"
    page.context.close()
