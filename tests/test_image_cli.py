"""optimized_img2img.py and optimized_inpaint.py from the command line: sizes, notes, metadata,
and one-line errors for bad inputs with nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import run_cli
from test_img2img import picture

ROOT = Path(__file__).resolve().parent.parent


def run(kind, argv, capsys) -> tuple[int, str, str]:
    return run_cli(argv, capsys, kind)


def base_args(tiny_model, outdir, *extra):
    ckpt, yaml, *_ = tiny_model
    return ["--ckpt", ckpt, "--config", yaml, "--outdir", outdir, "--ddim_steps", 4, "--sampler", "ddim",
            "--device", "cpu", "--prompt", "a boat", "--seed", 5, "--n_samples", 1, *extra]


def test_img2img_takes_the_image_size_rounded_down_and_records_its_inputs(tiny_model, tmp_path, capsys):
    picture((70, 61)).save(tmp_path / "in.png")
    code, out, err = run("img2img", base_args(tiny_model, tmp_path / "out", "--init-img", tmp_path / "in.png",
                                              "--strength", 0.5), capsys)
    assert code == 0, err
    assert "note: init image 70x61 resized to 64x56 (Lanczos)" in out
    result = Image.open(tmp_path / "out/a_boat/seed_5_00000.png")
    assert result.size == (64, 56)
    assert (result.text["init_image"], result.text["strength"], result.text["size"]) == ("in.png", "0.5", "64x56")
    assert "Denoising strength: 0.5, init_image: in.png" in result.text["parameters"]
    assert "wrote 1 images and 1 grid(s)" in out


@pytest.mark.parametrize("name, mode", [("in.jpg", "RGB"), ("in.webp", "RGB"), ("in.png", "RGBA"), ("in.png", "L"),
                                        ("in.png", "P")])
def test_img2img_reads_common_formats_and_modes(tiny_model, tmp_path, capsys, name, mode):
    picture((48, 40)).convert(mode).save(tmp_path / name)
    code, out, err = run("img2img", base_args(tiny_model, tmp_path / "out", "--init-img", tmp_path / name,
                                              "--skip_grid"), capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "out/a_boat/seed_5_00000.png").size == (48, 40)


def test_explicit_size_resizes_and_says_so(tiny_model, tmp_path, capsys):
    picture((64, 64)).save(tmp_path / "in.png")
    code, out, err = run("img2img", base_args(tiny_model, tmp_path / "out", "--init-img", tmp_path / "in.png",
                                              "--W", 32, "--H", 48, "--skip_grid"), capsys)
    assert code == 0, err
    assert "note: init image 64x64 resized to 32x48 (Lanczos)" in out
    assert Image.open(tmp_path / "out/a_boat/seed_5_00000.png").size == (32, 48)


def test_a_seed_gives_one_image_across_runs_and_batches(tiny_model, tmp_path, capsys):
    picture((48, 48)).save(tmp_path / "in.png")
    common = ["--init-img", tmp_path / "in.png", "--strength", 0.8, "--skip_grid"]
    assert run("img2img", base_args(tiny_model, tmp_path / "a", *common), capsys)[0] == 0
    args = base_args(tiny_model, tmp_path / "b", *common)
    args[args.index("--seed") + 1], args[args.index("--n_samples") + 1] = 4, 2
    assert run("img2img", args, capsys)[0] == 0
    one = np.asarray(Image.open(tmp_path / "a/a_boat/seed_5_00000.png")).astype(int)
    two = np.asarray(Image.open(tmp_path / "b/a_boat/seed_5_00001.png")).astype(int)
    assert np.abs(one - two).max() <= 1


def test_planning_an_img2img_run_counts_the_encoder(tiny_model, tmp_path, capsys):
    import json

    picture((64, 64)).save(tmp_path / "in.png")
    code, out, err = run("img2img", ["--init-img", tmp_path / "in.png", "--device", "meta", "--json",
                                     "--ddim_steps", 2, "--config", tiny_model[1], "--n_samples", 1], capsys)
    assert code == 0, err
    peaks = json.loads(out)["peak_bytes"]
    assert set(peaks) == {"text", "encode", "sample", "decode"} and peaks["encode"] > 0
    assert not (tmp_path / "outputs").exists()


def test_the_init_image_is_encoded_once_per_run(tiny_model, tmp_path, capsys, monkeypatch):
    """Two iterations (two sampling batches) of one init image: one encoder pass, and the second
    batch's images are those a run starting at its seed writes."""
    from optimizedSD.model.vae import AutoencoderKL

    picture((48, 48)).save(tmp_path / "in.png")
    common = ["--init-img", tmp_path / "in.png", "--strength", 0.8, "--skip_grid"]
    encode, calls = AutoencoderKL.encode, []
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x: calls.append(1) or encode(self, x))
    assert run("img2img", base_args(tiny_model, tmp_path / "two", *common, "--n_iter", 2), capsys)[0] == 0
    assert len(calls) == 1
    args = base_args(tiny_model, tmp_path / "one", *common)
    args[args.index("--seed") + 1] = 6
    assert run("img2img", args, capsys)[0] == 0
    second = np.asarray(Image.open(tmp_path / "two/a_boat/seed_6_00001.png")).astype(int)
    alone = np.asarray(Image.open(tmp_path / "one/a_boat/seed_6_00000.png")).astype(int)
    assert np.abs(second - alone).max() <= 1


def test_out_of_memory_while_encoding_retries_with_tiled_vae(tiny_model, tmp_path, capsys, monkeypatch):
    """The init image's encoding runs out of GPU memory once: the run switches to tiled VAE (not a
    smaller batch), says so, and writes the image a run that never ran out of memory writes."""
    import torch

    from optimizedSD.model.vae import AutoencoderKL

    picture((48, 48)).save(tmp_path / "in.png")
    common = ["--init-img", tmp_path / "in.png", "--strength", 0.8, "--skip_grid"]
    assert run("img2img", base_args(tiny_model, tmp_path / "plain", *common), capsys)[0] == 0
    encode, calls = AutoencoderKL.encode, []

    def encode_once_short(self, x):
        calls.append(x.shape)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return encode(self, x)

    monkeypatch.setattr(AutoencoderKL, "encode", encode_once_short)
    code, _, err = run("img2img", base_args(tiny_model, tmp_path / "tight", *common), capsys)
    assert code == 0, err
    assert "out of GPU memory while encoding the init image; retrying with tiled VAE" in err
    assert "while sampling" not in err and len(calls) == 2
    plain, tight = (np.asarray(Image.open(tmp_path / f"{d}/a_boat/seed_5_00000.png")).astype(int) for d in ("plain", "tight"))
    assert np.abs(plain - tight).max() <= 1


IMG2IMG_BAD = {
    "missing init image": (["--init-img", "{tmp}/none.png"], "init image not found: "),
    "init image not an image": (["--init-img", "{tmp}/notes.txt"], "is not an image PIL can read"),
    "truncated init image": (["--init-img", "{tmp}/cut.png"], "truncated or corrupt"),
    "strength 0": (["--init-img", "{tmp}/in.png", "--strength", "0"], "--strength must be in (0, 1]"),
    "strength above 1": (["--init-img", "{tmp}/in.png", "--strength", "1.5"], "--strength must be in (0, 1]"),
    "strength walks no step": (["--init-img", "{tmp}/in.png", "--strength", "0.1"],
                               "--strength 0.1 of 4 steps runs no sampling step"),
    "size not a multiple of 8": (["--init-img", "{tmp}/in.png", "--H", "60"], "--H 60 is not a positive multiple"),
    "no init image": ([], "the following arguments are required: --init-img"),
}
INPAINT_BAD = {
    "missing mask": (["--init-img", "{tmp}/in.png", "--mask", "{tmp}/none.png"], "mask not found: "),
    "mask not an image": (["--init-img", "{tmp}/in.png", "--mask", "{tmp}/notes.txt"], "is not an image PIL can read"),
    "no mask": (["--init-img", "{tmp}/in.png"], "the following arguments are required: --mask"),
    "strength above 1": (["--init-img", "{tmp}/in.png", "--mask", "{tmp}/in.png", "--strength", "2"],
                         "--strength must be in (0, 1]"),
}


@pytest.mark.parametrize("kind, case", [("img2img", c) for c in IMG2IMG_BAD] + [("inpaint", c) for c in INPAINT_BAD])
def test_bad_input_is_one_line_and_writes_nothing(kind, case, tiny_model, tmp_path, capsys):
    extra, words = (IMG2IMG_BAD if kind == "img2img" else INPAINT_BAD)[case]
    picture((64, 64)).save(tmp_path / "in.png")
    (tmp_path / "notes.txt").write_text("not an image")
    data = (tmp_path / "in.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    before = sorted(p.name for p in tmp_path.iterdir())
    args = base_args(tiny_model, tmp_path / "out", *[a.replace("{tmp}", str(tmp_path)) for a in extra])
    code, out, err = run(kind, args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("script, flags", [
    ("optimized_img2img.py", ["--init-img", "--strength", "--H", "--sampler", "--karras", "--lowvram"]),
    ("optimized_inpaint.py", ["--init-img", "--mask", "--strength", "--sampler"]),
])
def test_scripts_run_and_list_their_flags(script, flags):
    result = subprocess.run([sys.executable, str(ROOT / "optimizedSD" / script), "--help"], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    for flag in flags:
        assert flag in result.stdout


def test_planning_an_inpainting_checkpoint_run(tmp_path, capsys):
    """A 9-channel UNet is planned through its own path (mask and masked-image latents as input)."""
    import json
    from dataclasses import replace

    from optimizedSD.model.config import tiny_config

    cfg = tiny_config()
    yaml = tmp_path / "inpaint.yaml"
    replace(cfg, unet=replace(cfg.unet, in_channels=9)).save_yaml(yaml)
    picture((64, 64)).save(tmp_path / "in.png")
    code, out, err = run("inpaint", ["--init-img", tmp_path / "in.png", "--mask", tmp_path / "in.png", "--device", "meta",
                                     "--json", "--ddim_steps", 2, "--config", yaml, "--n_samples", 1, "--vram", "1G"],
                         capsys)
    assert code == 0, err
    assert set(json.loads(out)["peak_bytes"]) == {"text", "encode", "sample", "decode"}
