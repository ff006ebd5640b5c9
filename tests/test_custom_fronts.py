"""LoRAs, embeddings, a separate VAE and adapters through the fronts: the CLI's flags and prompt tags,
and one engine serving requests with and without LoRAs, end to end against diffusers (and the
hooked reference of test_adapters); metadata; the planner; the errors of the fronts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_files import (LOCON_TARGETS, TEXT_TARGETS, UNET_TARGETS, allow_installed_peft, kohya_state, lora_tensors,
                        write_kohya, write_peft)
from PIL import Image
from reference import (NEGATIVE, PROMPT, assert_same_image, checkpoint, ddim_scheduler, diffusers_images,
                       diffusers_vae, tiny_fragments, write_yaml_config)
from test_adapters import COMBOS, hook_reference, write_folder

from optimizedSD.fronts.cli import main
from optimizedSD.model.config import AdapterConfig, tiny_config
from optimizedSD.engine.customize import lora_names, resolve_customizations, with_tag
from optimizedSD.engine.engine import Engine
from optimizedSD.outputs.infotext import read_parameters
from optimizedSD.engine.spec import resolve_model
from optimizedSD.engine.request import Request

SEED = 41
ROOT = Path(__file__).resolve().parent.parent
STEPS = 10


@pytest.fixture(scope="module")
def model(random_model, tmp_path_factory):
    cfg = random_model[0]
    return (*random_model, write_yaml_config(cfg, tmp_path_factory.mktemp("cfg") / "tiny.yaml"))


@pytest.fixture(scope="module")
def loras(model, tmp_path_factory):
    """A kohya LoCon file (UNet and text encoder) given by path, a PEFT file found by name in a LoRA folder."""
    d = tmp_path_factory.mktemp("loras")
    unet, text, _, _ = lora_tensors(model[:4], 1, LOCON_TARGETS, TEXT_TARGETS, rank=4, alpha=2)
    kohya = write_kohya(d / "film-grain.safetensors", kohya_state(unet, text, alpha=2))
    unet, text, uc, tc = lora_tensors(model[:4], 2, UNET_TARGETS, TEXT_TARGETS, rank=4, alpha=8)
    folder = d / "lora_dir"
    (folder / "styles").mkdir(parents=True)
    peft = shutil.copy(write_peft(d / "peft", unet, text, uc, tc), folder / "styles" / "inkwash.safetensors")
    return kohya, peft, folder


def ours_cli(model, out, *extra, prompt=PROMPT, config=None):
    """Our CLI's image (H, W, 3) int16 and its file, and the exit status."""
    cfg, path, _, _, yaml = model
    code = main(["--ckpt", str(path), "--config", str(config or yaml), "--device", "cpu", "--H", "64", "--W", "64",
                 "--ddim_steps", str(STEPS), "--sampler", "ddim", "--seed", str(SEED), "--n_samples", "1",
                 "--n_iter", "1", "--scale", "7.5", "--prompt", prompt, "--negative_prompt", NEGATIVE,
                 "--outdir", str(out), "--skip_grid", *map(str, extra)])
    files = sorted(out.rglob("*.png")) if out.exists() else []
    if code != 0:
        return None, None, code
    assert len(files) == 1
    return np.asarray(Image.open(files[0]).convert("RGB")).astype(np.int16), files[0], code


def reference(model, prepare=None):
    return diffusers_images(model[:4], SEED, 64, 64, ddim_scheduler(), steps=STEPS, prepare=prepare)[0]


def parameters(path) -> str:
    with Image.open(path) as im:
        return read_parameters(im)


# ---- LoRA --------------------------------------------------------------------------------------
def test_lora_flag_and_prompt_tag_equal_diffusers(model, loras, tmp_path, monkeypatch):
    """--lora FILE:0.7 and <lora:inkwash:-0.4> in the prompt (found in a subfolder of --lora_dir)
    against diffusers' load_lora_weights + set_adapters with those weights."""
    kohya, peft, folder = loras
    ours, path, _ = ours_cli(model, tmp_path / "out", "--lora", f"{kohya}:0.7", "--lora_dir", folder,
                             prompt=f"{PROMPT} <lora:inkwash:-0.4>")
    allow_installed_peft(monkeypatch)

    def prepare(pipe):
        pipe.load_lora_weights(str(kohya), adapter_name="a")
        pipe.load_lora_weights(str(peft), adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    theirs = reference(model, prepare)
    assert np.abs(theirs - reference(model)).mean() > 3  # the LoRAs change the image
    assert_same_image(ours, theirs)
    text = parameters(path)
    assert text.startswith(f"{PROMPT} <lora:inkwash:-0.4>")  # the prompt as written, tags and all
    assert 'Lora: "<lora:film-grain:0.7>"' in text and 'Lora hashes: "film-grain: ' in text and ", inkwash: " in text


def test_a_request_without_loras_after_one_with_equals_a_fresh_process(model, loras, tmp_path):
    """One engine (as the UI and the cluster workers keep it): LoRAs, then none, then other LoRAs, then
    none again; each request without equals, bit for bit, a fresh engine's image and the image a
    fresh process (the CLI, same threads) writes."""
    cfg, path, _, _, yaml = model
    kohya, peft, folder = loras

    def engine():
        return Engine(resolve_model(path, yaml, device="cpu", lora_dirs=[folder]))

    def image(e, prompt, files=()):
        r = e.complete(Request(prompt, negative_prompt=NEGATIVE, seed=SEED, n_samples=1, sampler="ddim",
                               steps=4, scale=7.5, width=64, height=64, loras=tuple((str(f), w) for f, w in files)))
        return np.asarray([item.image for batch in e.render(r) for item in batch][0]).astype(np.int16)

    fresh = image(engine(), PROMPT)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    subprocess.run([sys.executable, str(ROOT / "optimizedSD" / "optimized_txt2img.py"), "--ckpt", str(path),
                    "--config", str(yaml), "--device", "cpu", "--H", "64", "--W", "64", "--ddim_steps", "4",
                    "--sampler", "ddim", "--seed", str(SEED), "--n_samples", "1", "--scale", "7.5", "--prompt",
                    PROMPT, "--negative_prompt", NEGATIVE, "--skip_grid", "--outdir", str(tmp_path)],
                   check=True, capture_output=True, env=env)
    [file] = tmp_path.rglob("*.png")
    assert np.array_equal(np.asarray(Image.open(file).convert("RGB")).astype(np.int16), fresh)
    served = engine()
    with_lora = image(served, PROMPT, [(kohya, 0.8)])
    assert np.abs(with_lora - fresh).mean() > 3
    assert np.array_equal(image(served, PROMPT), fresh)
    image(served, f"{PROMPT} <lora:inkwash:1>", [(kohya, 0.3)])
    assert np.array_equal(image(served, PROMPT), fresh)
    assert served.loads == 1


@pytest.mark.parametrize("mode", [[], ["--lowvram"]])
def test_planned_peak_and_bytes_are_the_same_with_a_lora(model, loras, tmp_path, capsys, mode):
    """Patching host masters costs no device memory and moves no extra bytes (the file is read and
    checked on meta too)."""
    cfg, path, _, _, yaml = model

    def planned(*extra):
        assert main(["--config", str(yaml), "--device", "meta", "--H", "64", "--W", "64", "--n_samples", "2",
                     "--outdir", str(tmp_path), "--json", *mode, *map(str, extra)]) == 0
        figures = json.loads(capsys.readouterr().out)
        return figures["peak_bytes"], figures["host_to_device_bytes_per_step"]

    assert planned("--lora", loras[0]) == planned() and planned()[0]["sample"] > 0


@pytest.mark.parametrize("extra, prompt, message", [
    (["--lora_dir", "{dir}"], f"{PROMPT} <lora:nowhere:1>",
     "error: LoRA 'nowhere' not found: looked for nowhere{.safetensors,.pt,.pth,.ckpt,.bin} in {dir}; put the file "
     "there or pass --lora_dir"),
    (["--lora", "{tmp}/missing.safetensors"], PROMPT,
     "error: LoRA file not found: {tmp}/missing.safetensors; check the --lora path"),
    ([], f"{PROMPT} <lora:inkwash:strong>",
     "error: --prompt: cannot read the weight of <lora:inkwash:strong>: write a number, e.g. <lora:inkwash:0.8>"),
    (["--vae", "{tmp}/no-vae.safetensors"], PROMPT, "error: VAE file not found: {tmp}/no-vae.safetensors; check the "
     "--vae path"),
    (["--embeddings", "{tmp}/no-embeddings"], PROMPT, "error: embeddings folder not found: {tmp}/no-embeddings; pass "
     "an existing folder with --embeddings"),
    (["--adapter_path", "{tmp}"], PROMPT, "error: --adapter_path {tmp} given, but the model config names no adapters; "
     "pass that project's YAML (with unet_config.params.adapter_config) with --config"),
])
def test_bad_customizations_are_one_line_and_write_nothing(model, loras, tmp_path, capsys, extra, prompt, message):
    fill = lambda s: s.replace("{dir}", str(loras[2])).replace("{tmp}", str(tmp_path))  # noqa: E731
    _, _, code = ours_cli(model, tmp_path / "out", *map(fill, extra), prompt=prompt)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == fill(message)
    assert not (tmp_path / "out").exists()


def test_a_lora_for_another_model_is_refused_naming_the_file(model, tmp_path, capsys):
    """An SDXL-sized LoRA (2048-wide cross-attention keys) for our 32-wide tiny UNet."""
    from safetensors.torch import save_file

    bad = tmp_path / "sdxl-style.safetensors"
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 2048), f"{name}.lora_up.weight": torch.zeros(32, 4)}, str(bad))
    _, _, code = ours_cli(model, tmp_path / "out", "--lora", bad)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith(f"error: {bad}") and "2048" in err, err
    assert not (tmp_path / "out").exists()


# ---- embeddings, VAE, adapters -------------------------------------------------------------------
def test_embeddings_folder_equals_diffusers_load_textual_inversion(model, tmp_path):
    """A webui .pt of 3 vectors and a diffusers learned_embeds.bin, named in the prompt and the negative
    prompt."""
    hidden = model[0].text.hidden_size
    folder = tmp_path / "embeddings"
    folder.mkdir()
    g = torch.Generator().manual_seed(8)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(3, hidden, generator=g) * 0.5},
                "name": "moody-light", "step": 100}, folder / "moody-light.pt")  # as the webui saves it
    torch.save({"<pixel>": torch.randn(hidden, generator=g) * 0.5}, folder / "pixel-art.bin")
    prompt, negative = "a red fox, moody-light, oil painting", "pixel-art, blurry"
    cfg, path, _, _, yaml = model
    assert main(["--ckpt", str(path), "--config", str(yaml), "--device", "cpu", "--H", "64", "--W", "64",
                 "--ddim_steps", str(STEPS), "--sampler", "ddim", "--seed", str(SEED), "--n_samples", "1",
                 "--n_iter", "1", "--prompt", prompt, "--negative_prompt", negative, "--embeddings", str(folder),
                 "--outdir", str(tmp_path / "out"), "--skip_grid"]) == 0
    [file] = (tmp_path / "out").rglob("*.png")
    ours = np.asarray(Image.open(file).convert("RGB")).astype(np.int16)

    def prepare(pipe):
        for p in sorted(folder.iterdir()):
            pipe.load_textual_inversion(str(p), token=p.stem)
    theirs = diffusers_images(model[:4], SEED, 64, 64, ddim_scheduler(), steps=STEPS, prompt=prompt,
                              negative=negative, prepare=prepare)[0]
    plain = diffusers_images(model[:4], SEED, 64, 64, ddim_scheduler(), steps=STEPS, prompt=prompt,
                             negative=negative)[0]
    assert np.abs(theirs - plain).mean() > 3
    assert_same_image(ours, theirs)
    assert 'TI hashes: "moody-light: ' in parameters(file) and "pixel-art: " in parameters(file)


def test_vae_flag_equals_diffusers_with_that_vae(model, tmp_path):
    from safetensors.torch import save_file

    state = checkpoint(tiny_fragments(tiny_config(), seed=9))
    vae = tmp_path / "vae-ft-mse.safetensors"
    save_file({k: v for k, v in state.items() if k.startswith("first_stage_model.")}, str(vae))
    ours, path, _ = ours_cli(model, tmp_path / "out", "--vae", vae)

    def prepare(pipe):
        pipe.vae = diffusers_vae(model[0], state)
    theirs = reference(model, prepare)
    assert np.abs(theirs - reference(model)).mean() > 3
    assert_same_image(ours, theirs)
    assert "VAE: vae-ft-mse.safetensors, VAE hash: " in parameters(path)


def test_adapters_from_the_config_and_folder_equal_the_hooked_reference(model, tmp_path, capsys):
    """attn2o->ffni from that project's YAML and folder, at --adapter_scale 0.6; the planner counts them."""
    cfg, path, state, _, _ = model
    spec = COMBOS["attn2o-ffni"][0]
    yaml = write_yaml_config(cfg.with_adapters(AdapterConfig(spec)), tmp_path / "attn2o-ffni.yaml")
    folder = write_folder(tmp_path / "999-adapters", state, spec, None)
    ours, file, _ = ours_cli(model, tmp_path / "out", "--adapter_path", folder, "--adapter_scale", 0.6, config=yaml)
    theirs = reference(model, lambda pipe: hook_reference(pipe, state, folder, spec, None, 0.6))
    assert np.abs(theirs - reference(model)).mean() > 3
    assert_same_image(ours, theirs)
    assert f"Adapters: \"{folder} (attn2o->ffni (mid 12, default, scale 0.6))\"" in parameters(file)

    def planned(config, *extra):
        capsys.readouterr()
        assert main(["--config", str(config), "--device", "meta", "--H", "64", "--W", "64", "--outdir",
                     str(tmp_path), "--json", "--turbo", *map(str, extra)]) == 0
        return json.loads(capsys.readouterr().out)["peak_bytes"]["sample"]

    adapter_bytes = sum(2 * t.numel() for f in folder.glob("*.adapter_inout.pt")  # fp16 on the device
                        for t in torch.load(f, weights_only=True).values())
    more = planned(yaml, "--adapter_path", folder) - planned(model[4])
    assert adapter_bytes <= more <= adapter_bytes + 64 * 1024, (more, adapter_bytes)


def test_a_config_with_adapters_needs_their_folder(model, tmp_path, capsys):
    yaml = write_yaml_config(model[0].with_adapters(AdapterConfig(COMBOS["attn2o-ffni"][0])), tmp_path / "a.yaml")
    _, _, code = ours_cli(model, tmp_path / "out", config=yaml)
    assert code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the model config names adapters (unet_config.params.adapter_config) but no --adapter_path gives "
        "their weights; pass the folder save_adapter_to_dir wrote")


# ---- the UI's pickers --------------------------------------------------------------------------
def test_pickers_offer_the_folders_files_and_add_tags(loras, tmp_path):
    _, _, folder = loras
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "inkwash.pt").write_bytes(b"")  # a later folder's file of the same name is not offered twice
    (tmp_path / "b" / "zebra.safetensors").write_bytes(b"")
    (tmp_path / "b" / "notes.txt").write_text("not a LoRA")
    assert lora_names([folder, tmp_path / "b", tmp_path / "nowhere"]) == ["inkwash", "zebra"]
    assert with_tag("a fox ", "<lora:inkwash:1>") == "a fox <lora:inkwash:1>"
    assert with_tag("", "moody-light") == "moody-light"


def test_a_cluster_worker_resolves_what_the_driver_resolved(model, tmp_path, monkeypatch):
    """`Customizations.arguments` (what a Ray worker is given) gives the driver's choices again, from
    another working directory: no embeddings stays none even where an `embeddings/` folder exists."""
    cfg = model[0]
    _, driver = resolve_customizations(cfg, lora_dirs=[tmp_path / "loras"])
    assert driver.embeddings_dir is None
    (tmp_path / "elsewhere" / "embeddings").mkdir(parents=True)
    torch.save({"<x>": torch.zeros(cfg.text.hidden_size)}, tmp_path / "elsewhere" / "embeddings" / "stray.bin")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert resolve_customizations(cfg)[1].embeddings  # a run started here would find it
    _, worker = resolve_customizations(cfg, **driver.arguments())
    assert worker == driver
