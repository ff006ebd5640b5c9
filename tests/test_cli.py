"""The txt2img command line on a tiny checkpoint: files, metadata, no overwriting, one-line errors,
default checkpoint discovery, and the folder dropped into a CompVis checkout without `ldm`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import write_tiny_checkpoint
from optimizedSD.engine import spec
from optimizedSD.model import paths
from optimizedSD.outputs import images
from optimizedSD.engine.request import RequestError
from optimizedSD.fronts.cli import main
from optimizedSD.model.config import SDConfig, UNetConfig
from optimizedSD.model.hashes import file_hash

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = ("ldm", "pytorch_lightning", "taming", "clip", "diffusers", "transformers")  # transformers: import cost
ISSUE_FLAGS = ("--prompt --negative_prompt --outdir --skip_grid --skip_save --ddim_steps --fixed_code --ddim_eta "
               "--n_iter --H --W --C --f --n_samples --n_rows --scale --device --from-file --seed --unet_bs --turbo "
               "--precision --format --sampler --ckpt --config --ema --plms").split()


def run_cli(argv, capsys, kind: str = "txt2img") -> tuple[int, str, str]:
    """main() of the `kind` script in this process: (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv], kind=kind)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def tiny_args(tiny_model, outdir, *extra):
    ckpt, yaml, *_ = tiny_model
    return ["--ckpt", ckpt, "--config", yaml, "--outdir", outdir, "--H", 64, "--W", 64, "--ddim_steps", 2,
            "--sampler", "ddim", "--device", "cpu", *extra]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_run_writes_images_grid_and_metadata(tiny_model, tmp_path, capsys):
    ckpt = tiny_model[0]
    code, out, err = run_cli(tiny_args(tiny_model, tmp_path, "--prompt", "a red fox", "--seed", 42,
                                       "--n_samples", 2, "--negative_prompt", "blurry"), capsys)
    assert code == 0, err
    folder = tmp_path / "a_red_fox"
    assert sorted(os.listdir(folder)) == ["grid_0000.png", "seed_42_00000.png", "seed_43_00001.png"]
    info = Image.open(folder / "seed_43_00001.png").text
    assert {k: info[k] for k in ("prompt", "negative_prompt", "seed", "sampler", "steps", "scale", "size",
                                 "checkpoint", "checkpoint_hash")} == {
        "prompt": "a red fox", "negative_prompt": "blurry", "seed": "43", "sampler": "ddim", "steps": "2",
        "scale": "7.5", "size": "64x64", "checkpoint": ckpt.name, "checkpoint_hash": file_hash(ckpt)}
    assert "Seed: 43" in info["parameters"]
    assert Image.open(folder / "grid_0000.png").size == (128, 64)
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"wrote 2 images and 1 grid(s) to {folder}") and last.endswith("s/image)")


def test_second_run_never_overwrites(tiny_model, tmp_path, capsys):
    args = tiny_args(tiny_model, tmp_path, "--prompt", "a cat", "--seed", 7, "--n_samples", 1)
    assert run_cli(args, capsys)[0] == 0
    folder = tmp_path / "a_cat"
    first = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    assert run_cli(args, capsys)[0] == 0
    files = sorted(os.listdir(folder))
    assert files == ["grid_0000.png", "grid_0001.png", "seed_7_00000.png", "seed_7_00001.png"]
    assert all((folder / f).read_bytes() == data for f, data in first.items())
    # Same seed, same image: the second file only differs in its name.
    assert np.array_equal(pixels(folder / "seed_7_00000.png"), pixels(folder / "seed_7_00001.png"))


def test_image_of_a_seed_does_not_depend_on_its_run(tiny_model, tmp_path, capsys):
    """Image i of a run uses seed + i: the third image of a --seed 5 run is the --seed 7 image."""
    assert run_cli(tiny_args(tiny_model, tmp_path / "a", "--seed", 5, "--n_samples", 3, "--prompt", "p"), capsys)[0] == 0
    assert run_cli(tiny_args(tiny_model, tmp_path / "b", "--seed", 7, "--n_samples", 1, "--prompt", "p",
                             "--skip_grid"), capsys)[0] == 0
    assert np.array_equal(pixels(tmp_path / "a/p/seed_7_00002.png"), pixels(tmp_path / "b/p/seed_7_00000.png"))
    assert os.listdir(tmp_path / "b/p") == ["seed_7_00000.png"]


def test_from_file_jpg_and_skip_save(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\n   \n  a blue bird  \n", encoding="utf-8")
    out = tmp_path / "out"
    code, stdout, err = run_cli(tiny_args(tiny_model, out, "--from-file", prompts, "--seed", 1, "--n_samples", 1,
                                          "--n_iter", 2, "--format", "jpg"), capsys)
    assert code == 0, err
    assert sorted(os.listdir(out / "a_red_fox")) == ["grid_0000.jpg", "seed_1_00000.jpg", "seed_2_00001.jpg"]
    assert sorted(os.listdir(out / "a_blue_bird")) == ["grid_0000.jpg", "seed_3_00000.jpg", "seed_4_00001.jpg"]
    comment = Image.open(out / "a_blue_bird/seed_4_00001.jpg").info["comment"].decode()
    assert comment.startswith("a blue bird\n") and "Seed: 4" in comment and "Sampler: DDIM" in comment
    assert "wrote 4 images and 2 grid(s) to 2 folders" in stdout

    code, _, err = run_cli(tiny_args(tiny_model, tmp_path / "grid_only", "--prompt", "x", "--seed", 1,
                                     "--n_samples", 2, "--skip_save"), capsys)
    assert code == 0, err
    assert os.listdir(tmp_path / "grid_only/x") == ["grid_0000.png"]


def test_fixed_code_starts_every_image_from_the_first_noise(tiny_model, tmp_path, capsys):
    assert run_cli(tiny_args(tiny_model, tmp_path, "--prompt", "p", "--seed", 3, "--n_samples", 2,
                             "--fixed_code", "--skip_grid"), capsys)[0] == 0
    assert np.array_equal(pixels(tmp_path / "p/seed_3_00000.png"), pixels(tmp_path / "p/seed_4_00001.png"))


def _nine_channel_checkpoint(tmp_path) -> Path:
    from optimizedSD.model.config import tiny_config

    base = tiny_config()
    inpaint = SDConfig(unet=UNetConfig(**{**base.unet.__dict__, "in_channels": 9}), vae=base.vae, text=base.text)
    write_tiny_checkpoint(tmp_path / "inpaint.ckpt", inpaint)
    return tmp_path / "inpaint.ckpt"


BAD_INPUTS = {
    "missing checkpoint": (["--ckpt", "{tmp}/nope.ckpt"], "checkpoint not found"),
    "H not a multiple of 8": (["--H", "500"], "--H 500 is not a positive multiple of 8; try 496 or 504"),
    "W zero": (["--W", "0"], "--W 0 is not a positive multiple of 8"),
    "unknown sampler": (["--sampler", "magic"], "argument --sampler: invalid choice: 'magic'"),
    "unknown format": (["--format", "gif"], "argument --format: invalid choice"),
    "empty prompt file": (["--from-file", "{tmp}/empty.txt"], "has no prompts"),
    "missing prompt file": (["--from-file", "{tmp}/none.txt"], "prompt file not found"),
    "empty prompt": (["--prompt", "  "], "--prompt is empty"),
    "zero weights": (["--prompt", "a cat:1 a dog:-1"], "--prompt: "),
    "outdir under a file": (["--outdir", "{tmp}/afile/out"], "is a file; choose another --outdir"),
    "n_samples 0": (["--n_samples", "0"], "--n_samples must be at least 1"),
    "unet_bs 0": (["--unet_bs", "0"], "--unet_bs must be at least 1"),
    "f mismatch": (["--f", "16"], "--f 16 does not match the model's downsampling factor 8"),
    "C mismatch": (["--C", "3"], "--C 3 does not match the model's 4 latent channels"),
    "eta with plms": (["--sampler", "plms", "--ddim_eta", "0.5"], "--ddim_eta applies to --sampler ddim only"),
    "corrupt checkpoint": (["--ckpt", "{tmp}/corrupt.ckpt"], "corrupt.ckpt"),
    "9-channel checkpoint": (["--ckpt", "{tmp}/inpaint.ckpt"], "inpainting"),
    "ema absent": (["--ema"], "EMA"),
    "cuda absent": (["--device", "cuda"], "CUDA is not available here; use --device cpu"),
    "bad device": (["--device", "tpu9"], "--device"),
    "missing config": (["--config", "{tmp}/none.yaml"], "none.yaml"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_model, tmp_path, capsys):
    if case == "cuda absent" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    extra, words = BAD_INPUTS[case]
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "corrupt.ckpt").write_bytes(os.urandom(2048))
    if case == "9-channel checkpoint":
        _nine_channel_checkpoint(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, out, err = run_cli(tiny_args(tiny_model, tmp_path / "out", "--prompt", "p", "--seed", 1, *extra), capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no outdir, nothing half-written


def test_unwritable_outdir(tiny_model, tmp_path, capsys, monkeypatch):
    """(Tests run as root here, where permissions do not bind; the check itself is what is tested.)"""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(images.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    code, _, err = run_cli(tiny_args(tiny_model, locked / "out", "--prompt", "p"), capsys)
    assert code == 2 and err.strip() == f"error: output directory {locked} is not writable; choose another --outdir"
    assert os.listdir(locked) == []


def test_out_of_memory_is_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("optimizedSD.engine.pipeline.Pipeline.txt2img_latents", oom)
    code, _, err = run_cli(tiny_args(tiny_model, tmp_path / "out", "--prompt", "p", "--unet_bs", 2), capsys)
    lines = err.strip().splitlines()
    assert code == 1 and lines[-1] == ("error: out of GPU memory at 64x64, even with --unet_bs 1 and one image at "
                                       "once; try --lowvram, a smaller --vram or a smaller size")
    # first --unet_bs, then the images at once were halved, before giving up
    retries = [line for line in lines if line.startswith("out of GPU memory while sampling")]
    assert retries == ["out of GPU memory while sampling; retrying with --unet_bs 1",
                       "out of GPU memory while sampling; retrying 2 image(s) at once",
                       "out of GPU memory while sampling; retrying 1 image(s) at once"]
    assert os.listdir(tmp_path / "out") == []  # created (and proven writable) before sampling, left empty


def test_out_of_memory_retries_give_the_same_images(tiny_model, tmp_path, capsys, monkeypatch):
    """Sampling that fails above --unet_bs 1 or 2 images at once, and decoding that fails untiled,
    are retried smaller; the images are those of a run that never ran out of memory."""
    from optimizedSD.engine.pipeline import Pipeline

    args = tiny_args(tiny_model, tmp_path / "plain", "--prompt", "p", "--seed", 3, "--n_samples", 3, "--skip_grid")
    assert run_cli(args, capsys)[0] == 0
    sample, decode = Pipeline.txt2img_latents, Pipeline.decode

    def tight_sample(self, prompt, negative, seeds, *a, **k):
        if self.unet_bs > 1 or len(seeds) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return sample(self, prompt, negative, seeds, *a, **k)

    def tight_decode(self, latents):
        if not self.tile:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return decode(self, latents)

    monkeypatch.setattr(Pipeline, "txt2img_latents", tight_sample)
    monkeypatch.setattr(Pipeline, "decode", tight_decode)
    args = tiny_args(tiny_model, tmp_path / "tight", "--prompt", "p", "--seed", 3, "--n_samples", 3, "--skip_grid",
                     "--unet_bs", 2)
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert "retrying with --unet_bs 1" in err and "retrying 1 image(s) at once" in err
    assert "out of GPU memory while decoding; retrying with tiled VAE decode" in err
    for i, s in enumerate((3, 4, 5)):
        plain, tight = pixels(tmp_path / f"plain/p/seed_{s}_{i:05d}.png"), pixels(tmp_path / f"tight/p/seed_{s}_{i:05d}.png")
        assert np.abs(plain.astype(int) - tight.astype(int)).max() <= 1


def test_default_checkpoint_discovery(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "ROOT", tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RequestError, match="put sd-v1-4.ckpt .* in weights/ or at models/ldm/stable-diffusion-v1"):
        spec.find_checkpoint(None)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights/notes.txt").write_text("not a checkpoint")
    (tmp_path / "weights/v1-5.safetensors").write_bytes(b"x")
    assert spec.find_checkpoint(None) == tmp_path / "weights/v1-5.safetensors"
    (tmp_path / "weights/sd-v1-4.ckpt").write_bytes(b"x")
    with pytest.raises(RequestError, match=r"several checkpoints .*sd-v1-4.ckpt, v1-5.safetensors.*--ckpt"):
        spec.find_checkpoint(None)
    compvis = tmp_path / "models/ldm/stable-diffusion-v1/model.ckpt"
    compvis.parent.mkdir(parents=True)
    compvis.write_bytes(b"x")
    assert spec.find_checkpoint(None) == compvis  # the CompVis location wins
    assert spec.find_checkpoint(str(tmp_path / "weights/sd-v1-4.ckpt")) == tmp_path / "weights/sd-v1-4.ckpt"


def _poisoned_packages(where: Path) -> None:
    """Packages named like the forbidden ones that record their import in $IMPORT_LOG."""
    for name in FORBIDDEN:
        (where / name).mkdir(parents=True, exist_ok=True)
        (where / name / "__init__.py").write_text(
            "import os\nopen(os.environ['IMPORT_LOG'], 'a').write(__name__ + '\\n')\n")


def test_drop_in_folder_in_a_compvis_checkout(tiny_model, tmp_path):
    """optimizedSD/ copied alone into a CompVis checkout (with its own `ldm`): finds the checkpoint at
    the CompVis path, runs, and imports none of ldm, pytorch_lightning, taming, clip, diffusers, transformers."""
    ckpt, yaml, *_ = tiny_model
    checkout = tmp_path / "stable-diffusion"
    shutil.copytree(REPO / "optimizedSD", checkout / "optimizedSD", ignore=shutil.ignore_patterns("__pycache__"))
    (checkout / "models/ldm/stable-diffusion-v1").mkdir(parents=True)
    shutil.copy(ckpt, checkout / "models/ldm/stable-diffusion-v1/model.ckpt")
    shutil.copy(yaml, checkout / "tiny.yaml")
    _poisoned_packages(checkout)  # the checkout's own ldm, and look-alikes of the others
    _poisoned_packages(tmp_path / "site")
    log = tmp_path / "imports.log"
    log.write_text("")
    env = {**os.environ, "IMPORT_LOG": str(log), "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run([sys.executable, "optimizedSD/optimized_txt2img.py", "--config", "tiny.yaml",
                             "--prompt", "a fox", "--H", "64", "--W", "64", "--n_samples", "1", "--ddim_steps", "2",
                             "--seed", "3", "--device", "cpu"],
                            cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "models/ldm/stable-diffusion-v1/model.ckpt" in result.stdout
    assert sorted(os.listdir(checkout / "outputs/txt2img-samples/a_fox")) == ["grid_0000.png", "seed_3_00000.png"]
    assert log.read_text() == ""


def test_help_lists_every_flag():
    result = subprocess.run([sys.executable, str(REPO / "optimizedSD/optimized_txt2img.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    missing = [flag for flag in ISSUE_FLAGS if f"{flag} " not in result.stdout and f"{flag}\n" not in result.stdout]
    assert missing == []
