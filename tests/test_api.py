"""The webui's HTTP API (`webui.py --api`) driven by real clients: the published `webuiapi` package and
`gradio_client`, against one server (a subprocess on the demo model, CPU, 64x64, a few steps) for the
whole module. Images are compared with what the CLI writes for the same settings (pixel for pixel, and
the saved PNG's `parameters`): plain, with the hires fix (`enable_hr`) and with a ControlNet sent the
ControlNet extension's way (webuiapi's `ControlNetUnit`: a random ControlNet for the demo model in the
original layout, in the server's --controlnet_dir); hostile requests get their status code and the
server goes on serving.
"""
from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "weights" / "demo.safetensors"
PROMPT = "a red circle on a blue background, top left"
CONTROLNET = "control_demo"  # its file in the server's --controlnet_dir
USER, PASSWORD = "alice", "s3cret"
UI_USER, UI_PASSWORD = "bob", "pw"
FAST = dict(steps=6, cfg_scale=3, width=64, height=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_demo_controlnet(path: Path) -> None:
    """A random ControlNet for the demo model's UNet, zero convs included (else it adds nothing), saved in
    the original layout (`control_model.*`) as tests/test_controlnet.py writes its nets."""
    import torch
    from reference import randomize

    from optimizedSD.model.config import SDConfig
    from optimizedSD.model.controlnet import ControlNet

    torch.manual_seed(3)
    net = ControlNet(SDConfig.from_yaml(ROOT / "configs" / "demo.yaml").unet).eval()
    randomize(net, 503)
    torch.save({f"control_model.{k}": v.clone() for k, v in net.state_dict().items()}, path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server and its folders: --ckpt-dir holds demo.safetensors and copy.safetensors (the demo model
    twice, each with its YAML beside it) and a link to a file outside the folder, which must not count;
    --controlnet_dir holds one ControlNet for the demo model."""
    d = tmp_path_factory.mktemp("api")
    (d / "ControlNet").mkdir()
    write_demo_controlnet(d / "ControlNet" / f"{CONTROLNET}.pth")
    ckpts = d / "Stable-diffusion"
    ckpts.mkdir()
    for name in ("demo", "copy"):
        shutil.copy(DEMO, ckpts / f"{name}.safetensors")
        shutil.copy(ROOT / "configs" / "demo.yaml", ckpts / f"{name}.yaml")
    (d / "Lora").mkdir()
    (d / "LyCORIS").mkdir()  # the webui's sibling folder of LyCORIS files
    from lycoris_files import demo_file
    demo_file(d / "LyCORIS" / "mix.safetensors")
    (d / "secret.safetensors").write_bytes(b"not for you")
    (ckpts / "outside.safetensors").symlink_to(d / "secret.safetensors")
    port = free_port()
    out = d / "out"
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "optimizedSD/webui.py", "--demo", "--ckpt", str(ckpts / "demo.safetensors"), "--device", "cpu",
         "--api", "--port", str(port), "--outdir", str(out), "--ckpt-dir", str(ckpts),
         "--api-auth", f"{USER}:{PASSWORD}", "--gradio-auth", f"{UI_USER}:{UI_PASSWORD}",
         "--controlnet_dir", str(d / "ControlNet"), "--lora_dir", str(d / "Lora")],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if requests.get(f"{url}/sdapi/v1/progress", auth=(USER, PASSWORD), timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("the server did not start:\n" + (d / "server.log").read_text())
        time.sleep(0.5)
    yield dict(url=url, port=port, out=out, dir=d, ckpts=ckpts, controlnet=d / "ControlNet" / f"{CONTROLNET}.pth",
               lora_dir=d / "Lora")
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(port=server["port"], username=USER, password=PASSWORD)


def cli(kind: str, tmp: Path, *argv) -> list[Path]:
    """Run the CLI (in this process) with --demo on the CPU; the images it wrote, in seed order."""
    from optimizedSD.fronts import cli as cli_module

    out = tmp / f"cli-{kind}-{time.monotonic_ns()}"
    args = ["--demo", "--device", "cpu", "--outdir", str(out), "--skip_grid", *map(str, argv)]
    assert cli_module.main(args, kind=kind) == 0
    return sorted(out.rglob("seed_*.png"), key=lambda p: int(p.name.split("_")[1]))


def pixels(im) -> np.ndarray:
    return np.asarray((im if isinstance(im, Image.Image) else Image.open(im)).convert("RGB"))


def b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def picture() -> Image.Image:
    im = Image.new("RGB", (64, 64), (30, 40, 200))
    im.paste((220, 30, 30), (4, 4, 30, 30))
    return im


def mask() -> Image.Image:
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (32, 32, 64, 64))
    return m


# ---- the same images as the CLI -------------------------------------------------------------
def test_txt2img_batch_equals_the_cli_and_saves_the_same_parameters(api, server, tmp_path):
    r = api.txt2img(prompt=PROMPT, seed=11, sampler_name="Euler a", batch_size=2, save_images=True, **FAST)
    assert r.info["all_seeds"] == [11, 12] and r.info["index_of_first_image"] == 1  # the grid first, as the webui
    assert r.info["warnings"] == []
    grid, *images = r.images
    assert grid.size == (128, 64) and len(images) == 2
    want = cli("txt2img", tmp_path, "--prompt", PROMPT, "--seed", 11, "--sampler", "euler_a", "--n_samples", 2,
               "--ddim_steps", 6, "--scale", 3, "--W", 64, "--H", 64)
    for got, path in zip(images, want):
        assert np.array_equal(pixels(got), pixels(path))
    saved = sorted(server["out"].rglob("seed_1[12]_*.png"))
    assert len(saved) == 2
    for path, ref in zip(saved, want):
        assert Image.open(path).info["parameters"] == Image.open(ref).info["parameters"]
        assert np.array_equal(pixels(path), pixels(ref))
    assert r.info["infotexts"][1] == Image.open(want[0]).info["parameters"]


def test_txt2img_with_enable_hr_equals_the_clis_hires_fix_and_saves_its_parameters(api, server, tmp_path):
    r = api.txt2img(prompt=PROMPT, seed=51, sampler_name="Euler a", enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                    hr_second_pass_steps=4, denoising_strength=0.6, save_images=True, **FAST)
    assert r.image.size == (128, 128) and r.info["warnings"] == [] and r.info["denoising_strength"] == 0.6
    assert r.info["extra_generation_params"] == {"Hires upscale": "2", "Hires steps": 4, "Hires upscaler": "Latent"}
    (want,) = cli("txt2img", tmp_path, "--prompt", PROMPT, "--seed", 51, "--sampler", "euler_a", "--ddim_steps", 6,
                  "--scale", 3, "--W", 64, "--H", 64, "--n_samples", 1, "--hr_scale", 2, "--hr_upscaler", "latent",
                  "--hr_steps", 4, "--hr_denoise", 0.6)
    assert np.array_equal(pixels(r.image), pixels(want))
    (saved,) = server["out"].rglob("seed_51_*.png")
    assert Image.open(saved).info["parameters"] == Image.open(want).info["parameters"] == r.info["infotexts"][0]
    assert "Hires upscaler: Latent" in r.info["infotexts"][0]
    # Lanczos to a given width (the height from the aspect); denoising_strength left to the webui's 0.75
    r = api.txt2img(prompt=PROMPT, seed=52, sampler_name="DDIM", eta=0, enable_hr=True, hr_upscaler="Lanczos",
                    hr_resize_x=96, denoising_strength=None, **FAST)
    (want,) = cli("txt2img", tmp_path, "--prompt", PROMPT, "--seed", 52, "--sampler", "ddim", "--ddim_steps", 6,
                  "--scale", 3, "--W", 64, "--H", 64, "--n_samples", 1, "--hr_resize_x", 96, "--hr_upscaler", "lanczos",
                  "--hr_denoise", 0.75)
    assert r.image.size == (96, 96) and np.array_equal(pixels(r.image), pixels(want))


def test_a_lycoris_file_by_its_lyco_tag_equals_the_clis_image_and_names_its_hash(api, server, tmp_path):
    """A file mixing LoHa, LoKr and DoRA modules, in the LyCORIS folder beside --lora_dir, asked for by
    `<lyco:mix:0.8>`: listed by /loras, the CLI's image, and `Lora hashes` in the infotext as the webui writes it."""
    assert "mix" in [item["name"] for item in api.get_loras()]
    prompt = f"{PROMPT} <lyco:mix:0.8>"
    r = api.txt2img(prompt=prompt, seed=71, sampler_name="Euler", **FAST)
    (want,) = cli("txt2img", tmp_path, "--prompt", prompt, "--seed", 71, "--sampler", "euler", "--ddim_steps", 6,
                  "--scale", 3, "--W", 64, "--H", 64, "--n_samples", 1, "--lora_dir", server["lora_dir"])
    (plain,) = cli("txt2img", tmp_path, "--prompt", PROMPT, "--seed", 71, "--sampler", "euler", "--ddim_steps", 6,
                   "--scale", 3, "--W", 64, "--H", 64, "--n_samples", 1)
    assert np.array_equal(pixels(r.image), pixels(want))
    assert not np.array_equal(pixels(want), pixels(plain))  # the file changes the image
    from lora_files import addnet_hash
    assert f'Lora hashes: "mix: {addnet_hash(server["dir"] / "LyCORIS" / "mix.safetensors")}"' in r.info["infotexts"][0]
    assert r.info["infotexts"][0] == Image.open(want).info["parameters"]


def test_controlnet_unit_through_webuiapi_equals_the_clis_controlnet(api, server, tmp_path):
    assert api.controlnet_model_list() == [f"{CONTROLNET} [{model_hash(server['controlnet'])}]"]
    assert {"none", "canny", "invert"} <= set(api.controlnet_module_list())
    control = tmp_path / "control.png"
    picture().save(control)
    unit = webuiapi.ControlNetUnit(image=picture(), module="canny", model=api.controlnet_model_list()[0], weight=0.8,
                                   resize_mode="Just Resize", threshold_a=60, threshold_b=140, guidance_end=0.75,
                                   control_mode=1, processor_res=64)
    # a fresh alwayson_scripts each call: webuiapi adds the units to its default {} (shared by later calls)
    r = api.txt2img(prompt=PROMPT, seed=61, sampler_name="Euler", controlnet_units=[unit], alwayson_scripts={},
                    save_images=True, **FAST)
    assert r.info["warnings"] == []
    (want,) = cli("txt2img", tmp_path, "--prompt", PROMPT, "--seed", 61, "--sampler", "euler", "--ddim_steps", 6,
                  "--scale", 3, "--W", 64, "--H", 64, "--n_samples", 1, "--controlnet", server["controlnet"],
                  "--control_image", control, "--control_weight", 0.8, "--control_resize", "just resize",
                  "--control_preprocessor", "canny", "--control_low", 60, "--control_high", 140, "--control_end", 0.75,
                  "--control_mode", "prompt")
    assert np.array_equal(pixels(r.image), pixels(want))
    (saved,) = server["out"].rglob("seed_61_*.png")
    text = Image.open(saved).info["parameters"]
    assert text == Image.open(want).info["parameters"]
    assert f'ControlNet 0: "Module: canny, Model: {CONTROLNET} [' in text
    plain = api.txt2img(prompt=PROMPT, seed=61, sampler_name="Euler", **FAST)  # the net does act
    assert not np.array_equal(pixels(plain.image), pixels(r.image))
    # the model by name alone, the mode by its label; a unit not enabled is skipped, as the extension does
    unit.model, unit.control_mode = CONTROLNET, "My prompt is more important"
    off = webuiapi.ControlNetUnit(image=picture(), model="no such net", enabled=False)
    again = api.txt2img(prompt=PROMPT, seed=61, sampler_name="Euler", controlnet_units=[off, unit],
                        alwayson_scripts={}, **FAST)
    assert np.array_equal(pixels(again.image), pixels(want))


def model_hash(path: Path) -> str:
    """The webui's short model hash (`sd_models.model_hash`), as the ControlNet extension lists a model."""
    import hashlib

    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def test_img2img_and_inpaint_with_webui_labels_equal_the_cli(api, tmp_path):
    init = tmp_path / "init.png"
    picture().save(init)
    r = api.img2img(images=[picture()], prompt="a green square", seed=3, sampler_name="DPM++ 2M Karras",
                    denoising_strength=0.5, **FAST)
    want = cli("img2img", tmp_path, "--init-img", init, "--prompt", "a green square", "--seed", 3, "--sampler",
               "dpmpp_2m", "--karras", "--strength", 0.5, "--n_samples", 1, "--ddim_steps", 6, "--scale", 3)
    assert np.array_equal(pixels(r.image), pixels(want[0]))

    mask_path = tmp_path / "mask.png"
    mask().save(mask_path)
    r = api.img2img(images=[picture()], mask_image=mask(), prompt="a yellow circle", seed=4, sampler_name="DDIM",
                    eta=0, denoising_strength=0.8, inpainting_fill=1, mask_blur=0, inpaint_full_res=False, **FAST)
    assert r.info["warnings"] == [] and r.info["denoising_strength"] == 0.8
    want = cli("inpaint", tmp_path, "--init-img", init, "--mask", mask_path, "--prompt", "a yellow circle", "--seed", 4,
               "--sampler", "ddim", "--strength", 0.8, "--n_samples", 1, "--ddim_steps", 6, "--scale", 3)
    assert np.array_equal(pixels(r.image), pixels(want[0]))
    # the webui's defaults for what we do not do: accepted, ignored, said in info
    r = api.img2img(images=[picture()], mask_image=mask(), prompt="a yellow circle", seed=4, sampler_name="DDIM",
                    eta=0, denoising_strength=0.8, restore_faces=True, **FAST)
    assert any(w.startswith("mask_blur ignored") for w in r.info["warnings"])
    assert any(w.startswith("restore_faces ignored") for w in r.info["warnings"])
    assert np.array_equal(pixels(r.image), pixels(want[0]))


def test_override_settings_model_and_clip_skip_then_restored(api, tmp_path, server):
    r = api.txt2img(prompt=PROMPT, seed=21, sampler_name="DDIM", eta=0, **FAST,
                    override_settings={"sd_model_checkpoint": "copy", "CLIP_stop_at_last_layers": 2})
    assert r.info["sd_model_name"] == "copy" and r.info["clip_skip"] == 2
    want = cli("txt2img", tmp_path, "--ckpt", server["ckpts"] / "copy.safetensors", "--prompt", PROMPT, "--seed", 21,
               "--sampler", "ddim", "--clip_skip", 2, "--n_samples", 1, "--ddim_steps", 6, "--scale", 3)
    assert np.array_equal(pixels(r.image), pixels(want[0]))
    assert api.get_options()["sd_model_checkpoint"].startswith("demo.safetensors")  # restored afterwards


def test_options_round_trip_and_model_lists(api):
    models = {m["title"].split(" [")[0] for m in api.get_sd_models()}
    assert models == {"copy.safetensors", "demo.safetensors"}  # the link out of the folder is not listed
    api.set_options({"sd_model_checkpoint": "copy.safetensors", "jpeg_quality": 77})
    options = api.get_options()
    assert options["sd_model_checkpoint"].startswith("copy.safetensors [") and options["jpeg_quality"] == 77
    api.set_options({"sd_model_checkpoint": "demo.safetensors [ignored-hash]"})
    assert api.get_options()["sd_model_checkpoint"].startswith("demo.safetensors [")
    labels = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "DPM++ 2M", "DDIM", "PLMS"} <= set(labels)
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "karras"]
    for getter in (api.get_loras, api.get_embeddings, api.get_sd_vae, api.get_memory, api.get_cmd_flags):
        getter()
    assert api.get_cmd_flags()["api_auth"] == "***"
    api.refresh_checkpoints()


def test_openapi_docs_and_the_ui_on_the_same_port(server):
    assert requests.get(server["url"] + "/docs", timeout=30).status_code == 200
    paths = requests.get(server["url"] + "/openapi.json", timeout=30).json()["paths"]
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/options"} <= set(paths)
    assert requests.get(server["url"] + "/", timeout=30).status_code == 200  # gradio's page (its login form)


def started(api, ready, **fields):
    """A webuiapi txt2img (Euler, CFG 3, 64x64, `fields`) running in a thread, polled until `ready(state)`
    holds for /progress's `state` (within 120 s): (the thread, {"r": its result once joined}, that progress)."""
    result = {}

    def run():
        result["r"] = api.txt2img(prompt=PROMPT, sampler_name="Euler", cfg_scale=3, width=64, height=64, **fields)
    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 120
    while True:
        p = api.get_progress()
        if ready(p["state"]):
            return t, result, p
        assert time.time() < deadline and t.is_alive()
        time.sleep(0.02)


def test_interrupt_during_a_run_keeps_the_finished_batches(api, server):
    t, result, p = started(api, lambda s: s["job_no"] >= 1 and s["sampling_step"] > 0, seed=31, n_iter=4, steps=40)
    assert p["state"]["job"] == "txt2img" and 0 < p["progress"] < 1 and p["current_image"]  # batch 1's image
    api.interrupt()
    t.join(120)
    r = result["r"]
    assert 1 <= len(r.images) < 4 and any(w.startswith("interrupted") for w in r.info["warnings"])
    assert api.get_progress()["state"]["job"] == ""


def test_skip_during_a_batch_of_two_drops_that_batch_and_renders_the_next(api, tmp_path):
    t, result, _ = started(api, lambda s: s["job"] == "txt2img" and s["job_no"] == 0 and s["sampling_step"] > 0,
                           seed=71, n_iter=2, steps=50)
    api.skip()
    t.join(120)
    r = result["r"]
    assert r.info["all_seeds"] == [72] and len(r.images) == 1
    assert "batch 1 of 2 skipped" in r.info["warnings"]
    (want,) = cli("txt2img", tmp_path, "--prompt", PROMPT, "--seed", 72, "--sampler", "euler", "--ddim_steps", 50,
                  "--scale", 3, "--W", 64, "--H", 64, "--n_samples", 1)
    assert np.array_equal(pixels(r.image), pixels(want))


def test_bad_hires_and_controlnet_fields_are_422_naming_the_field(server):
    url, auth = server["url"] + "/sdapi/v1", (USER, PASSWORD)

    def post(**body):
        return requests.post(f"{url}/txt2img", auth=auth, timeout=120, json={"prompt": PROMPT, **FAST, **body})
    hires = dict(enable_hr=True, hr_scale=2)
    for bad, field in ((dict(hr_upscaler="R-ESRGAN 4x+"), "hr_upscaler"), (dict(hr_scale=0), "hr_scale"),
                       (dict(hr_second_pass_steps=-1), "hr_second_pass_steps"),
                       (dict(denoising_strength=0), "denoising_strength"), (dict(hr_resize_x=-8), "hr_resize_x")):
        r = post(**{**hires, **bad})
        assert r.status_code == 422 and r.json()["field"] == field, (bad, r.json())
    assert "R-ESRGAN 4x+" in post(**hires, hr_upscaler="R-ESRGAN 4x+").json()["detail"]
    r = post(enable_hr=True, hr_scale="big")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "hr_scale"]

    good = {"enabled": True, "image": b64(picture()), "model": CONTROLNET, "module": "none"}

    def unit(**change):
        return post(alwayson_scripts={"controlnet": {"args": [{**good, **change}]}})
    for change, loc in ((dict(weight="heavy"), "weight"), (dict(weight=3), "weight"),
                        (dict(guidance_end=1.5), "guidance_end")):
        r = unit(**change)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == \
            ["body", "alwayson_scripts", "controlnet", "args", 0, loc], (change, r.json())
    where = "alwayson_scripts.controlnet.args[0]"
    for change, field in ((dict(module="openpose"), "module"), (dict(model="no such net"), "model"),
                          (dict(model=f"../ControlNet/{CONTROLNET}"), "model"), (dict(model="None"), "model"),
                          (dict(image="not base64!"), "image"), (dict(image=None), "image"),
                          (dict(control_mode=7), "control_mode"), (dict(resize_mode="Stretch"), "resize_mode"),
                          (dict(guidance_start=0.5, guidance_end=0.5), "guidance_start")):
        r = unit(**change)
        assert r.status_code == 422 and r.json()["field"] == f"{where}.{field}", (change, r.json())
    assert "openpose" in unit(module="openpose").json()["detail"]
    r = post(**hires, alwayson_scripts={"controlnet": {"args": [good]}})
    assert r.status_code == 422 and r.json()["field"] == "enable_hr", r.json()
    assert "turn it off (enable_hr)" in r.json()["detail"]
    r = post(alwayson_scripts={"controlnet": {"args": "no"}})
    assert r.status_code == 422 and r.json()["field"] == "alwayson_scripts.controlnet.args"
    # other scripts, and a unit not enabled: ignored, said in info
    r = post(seed=5, alwayson_scripts={"ADetailer": {"args": [True]}, "controlnet": {"args": [{"model": "x"}]}})
    assert r.status_code == 200
    assert json.loads(r.json()["info"])["warnings"] == ["alwayson_scripts.ADetailer ignored: no such script here "
                                                        "(only controlnet)"]


# ---- gradio's endpoints, and the queue they share with the API ------------------------------
def test_gradio_client_named_endpoints_share_the_queue(server, api):
    from gradio_client import Client, handle_file

    client = Client(server["url"] + "/", auth=(UI_USER, UI_PASSWORD), verbose=False)
    info = client.view_api(return_format="dict", print_info=False)
    assert set(info["named_endpoints"]) == {"/txt2img", "/img2img", "/inpaint", "/png_info", "/interrupt"}
    assert not info["unnamed_endpoints"]
    # prompt, negative, sampler, karras, steps, scale, width, height, seed, batch count, batch size, memory, ...
    args = [PROMPT, "", "euler_a", False, 30, 3, 64, 64, 41, 1, 1, "default"]
    extra = [p for p in info["named_endpoints"]["/txt2img"]["parameters"][len(args):]]
    job = client.submit(*args, *[p["parameter_default"] for p in extra], api_name="/txt2img")
    seen = None
    deadline = time.time() + 120
    while not job.done() and time.time() < deadline:  # the UI's render, seen by the API
        state = api.get_progress()["state"]
        if state["job"] == "txt2img" and state["sampling_step"] > 0:
            seen = state
        time.sleep(0.05)
    gallery = job.result()[0]
    assert seen is not None and seen["sampling_steps"] == 30
    ui_image = Image.open(gallery[0]["image"]["path"] if isinstance(gallery[0]["image"], dict) else gallery[0]["image"])
    r = api.txt2img(prompt=PROMPT, seed=41, sampler_name="Euler a", steps=30, cfg_scale=3, width=64, height=64)
    assert np.array_equal(pixels(ui_image), pixels(r.image))
    raw = server["dir"] / "api.png"
    raw.write_bytes(base64.b64decode(r.json["images"][0]))
    text = client.predict(handle_file(str(raw)), api_name="/png_info")
    assert text == r.info["infotexts"][0]
    client.predict(api_name="/interrupt")


# ---- malformed and hostile requests ---------------------------------------------------------
def test_hostile_requests_get_their_status_and_the_server_goes_on(server):
    url, auth = server["url"] + "/sdapi/v1", (USER, PASSWORD)
    post = lambda path, **kw: requests.post(f"{url}/{path}", auth=auth, timeout=120, **kw)  # noqa: E731

    r = post("txt2img", json={"prompt": PROMPT, "steps": "many"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"]
    r = post("txt2img", json={"prompt": PROMPT, "batch_size": [1]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "batch_size"]
    r = post("txt2img", json={"prompt": PROMPT, "steps": 0, "width": 64, "height": 64})
    assert r.status_code == 422 and r.json()["field"] == "steps"
    r = post("txt2img", json={"prompt": PROMPT, "width": 100_000, "height": 100_000})
    assert r.status_code == 422 and r.json()["field"] == "width"
    r = post("txt2img", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = post("txt2img", json={"prompt": PROMPT, "sampler_name": "Euler z"})
    assert r.status_code == 404 and "Euler a" in r.json()["detail"]
    r = post("img2img", json={"prompt": PROMPT, "init_images": ["not base64!"], **FAST})
    assert r.status_code == 422 and r.json()["field"] == "init_images"
    big = Image.new("L", (9000, 9000))  # past the pixel limit: refused from its header
    r = post("img2img", json={"prompt": PROMPT, "init_images": [b64(big)], **FAST})
    assert r.status_code == 422 and "pixels" in r.json()["detail"]
    r = post("img2img", json={"prompt": PROMPT, "init_images": ["http://127.0.0.1:1/x.png"], **FAST})
    assert r.status_code == 422
    # 60 MB: refused with 413 before it is read whole, declared or chunked
    r = post("txt2img", data=b'{"prompt": "' + b"a" * (60 << 20) + b'"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = post("txt2img", data=(b"a" * (1 << 20) for _ in range(60)), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    # names resolve only inside their folders
    for name in ("../demo.safetensors", "outside.safetensors", "outside", str(server["dir"] / "secret.safetensors")):
        assert post("options", json={"sd_model_checkpoint": name}).status_code == 404, name
        r = post("txt2img", json={"prompt": PROMPT, **FAST, "override_settings": {"sd_model_checkpoint": name}})
        assert r.status_code == 404, name
    r = post("txt2img", json={"prompt": f"{PROMPT} <lora:../../weights/demo:1>", **FAST})
    assert r.status_code == 422 and "'..'" in r.json()["detail"]
    assert post("options", json={"outdir_txt2img_samples": "/tmp/elsewhere"}).status_code == 422
    # auth
    assert requests.get(f"{url}/progress").status_code == 401
    assert requests.get(f"{url}/progress", auth=(USER, "wrong")).status_code == 401
    assert requests.get(f"{url}/progress", auth=("mallory", PASSWORD)).status_code == 401
    # still serving
    r = post("txt2img", json={"prompt": PROMPT, "seed": 5, **FAST})
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_eight_concurrent_clients_each_get_their_image(server, api):
    """8 clients at once: every request answered (they wait their turn), each image its sequential replay's."""
    results = {}

    def client(i):
        c = webuiapi.WebUIApi(port=server["port"], username=USER, password=PASSWORD)
        results[i] = c.txt2img(prompt=PROMPT, seed=100 + i, sampler_name="Euler a", steps=3, cfg_scale=3,
                               width=64, height=64).image
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(8))
    for i in (0, 7):
        replay = api.txt2img(prompt=PROMPT, seed=100 + i, sampler_name="Euler a", steps=3, cfg_scale=3,
                             width=64, height=64).image
        assert np.array_equal(pixels(results[i]), pixels(replay))


@pytest.mark.parametrize("argv, message", [
    (["--api", "--api-auth", "alice"], "error: --api-auth takes USER:PASS[,USER2:PASS2], each name and password non-empty"),
    (["--gradio-auth", "bob:"], "error: --gradio-auth takes USER:PASS[,USER2:PASS2], each name and password non-empty"),
    (["--nowebui", "--api-max-body", "lots"], "error: --api-max-body: cannot read 'lots' as a memory size; write e.g. "
                                              "2G, 1536M or 0.75G"),
])
def test_api_flag_errors_are_one_line_before_anything_is_read(capsys, monkeypatch, argv, message):
    from optimizedSD import webui
    from optimizedSD.engine.engine import Engine

    monkeypatch.setattr(Engine, "load", lambda self: pytest.fail("the checkpoint was read"))
    assert webui.main(["--demo", "--device", "cpu", *argv]) == 2
    assert capsys.readouterr().err.strip() == message
