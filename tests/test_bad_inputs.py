"""Every bad numeric value is one clear line, found before anything is loaded or written, with the
same rule (and words, but for the field's name) for every front; Ctrl-C leaves no partial file."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import run_cli, tiny_args

from optimizedSD.model.config import SDConfig, tiny_config
from optimizedSD.outputs.images import ImageWriter
from optimizedSD.engine.request import UI_LABELS, Request, RequestError, complete, smallest_side

REPO = Path(__file__).resolve().parent.parent

# flags -> the words of the one line (CLI labels)
BAD_VALUES = {
    "size below the floor": (["--H", "8", "--W", "8"], "--W 8 x --H 8 is too small for this model; use at least"),
    "negative height": (["--H", "-64"], "--H -64 is not a positive multiple of 8"),
    "steps beyond the schedule": (["--ddim_steps", "5000"], "--ddim_steps must be at most 1000"),
    "steps zero": (["--ddim_steps", "0"], "--ddim_steps must be at least 1"),
    "scale nan": (["--scale", "nan"], "--scale must be a finite number, got nan"),
    "scale inf": (["--scale", "inf"], "--scale must be a finite number, got inf"),
    "scale -inf": (["--scale=-inf"], "--scale must be a finite number"),
    "eta nan": (["--ddim_eta", "nan"], "--ddim_eta must be a finite number"),
    "eta negative": (["--ddim_eta", "-0.5"], "--ddim_eta must be 0 or more"),
    "n_iter zero": (["--n_iter", "0"], "--n_iter must be at least 1"),
    "n_samples negative": (["--n_samples", "-2"], "--n_samples must be at least 1"),
    "n_rows negative": (["--n_rows", "-1"], "--n_rows must be 0 (automatic) or more"),
    "seed negative": (["--seed", "-1"], "--seed must be a whole number between 0 and 2^63-1"),
    "seed too large": (["--seed", str(2 ** 63)], "--seed must be a whole number between 0 and 2^63-1"),
    "vram unreadable": (["--vram", "lots"], "--vram: cannot read 'lots' as a memory size"),
    "vram too small": (["--vram", "1K"], "--vram 0.00 GiB is too small"),
    "two memory modes": (["--lowvram", "--turbo"], "--turbo and --lowvram exclude each other"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_value_is_one_line_before_anything_is_written(case, tiny_model, tmp_path, capsys):
    extra, words = BAD_VALUES[case]
    args = tiny_args(tiny_model, tmp_path / "out", "--prompt", "p", "--n_samples", 1, *extra)
    if "--seed" not in extra:
        args += ["--seed", 1]
    code, out, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind,extra,words", [
    ("img2img", ["--strength", "nan"], "--strength must be a finite number"),
    ("img2img", ["--strength", "inf"], "--strength must be a finite number"),
    ("inpaint", ["--strength", "-0.1"], "--strength must be in (0, 1]"),
])
def test_bad_strength(kind, extra, words, tiny_model, tmp_path, capsys):
    from test_img2img import picture

    picture((64, 64)).save(tmp_path / "in.png")
    args = tiny_args(tiny_model, tmp_path / "out", "--prompt", "p", "--seed", 1, "--init-img", tmp_path / "in.png",
                     *(["--mask", tmp_path / "in.png"] if kind == "inpaint" else []), *extra)
    code, _, err = run_cli(args, capsys, kind)
    assert code == 2 and err.strip().startswith("error: ") and words in err, err
    assert not (tmp_path / "out").exists()


def test_size_floor_follows_the_model():
    """torch's GroupNorm refuses a group with one value: the tiny UNet (32 channels in 32 groups
    before its one halving) cannot take 8x8 or 16x16 latents... of 1x1 and 2x2; SD v1 (10+ channels
    a group everywhere) takes the smallest image, 8x8."""
    assert smallest_side(tiny_config()) == 24
    assert smallest_side(SDConfig()) == 8
    complete(Request("p", width=8, height=8), SDConfig())  # accepted


def test_tiny_model_really_fails_below_its_floor_and_runs_at_it():
    """The floor is where torch stops refusing: below it the model raises, at it the model runs."""
    import torch

    from optimizedSD.model.fragments import build_fragments
    from optimizedSD.engine.offload import Offloader
    from optimizedSD.engine.pipeline import Pipeline, SampleSettings

    cfg = tiny_config()
    pipe = Pipeline(cfg, Offloader(build_fragments(cfg), torch.device("cpu")))
    side = smallest_side(cfg)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        pipe.txt2img("a", "", [0], side - 8, side - 8, SampleSettings("ddim", 1, 7.5))
    assert pipe.txt2img("a", "", [0], side, side, SampleSettings("ddim", 1, 7.5)).isfinite().all()


def test_the_ui_hears_the_same_rule_in_its_own_words():
    with pytest.raises(RequestError) as cli:
        complete(Request("p", scale=float("nan")), SDConfig())
    with pytest.raises(RequestError) as ui:
        complete(Request("p", scale=float("nan")), SDConfig(), labels=UI_LABELS)
    assert str(cli.value) == "--scale must be a finite number, got nan"
    assert str(ui.value) == "CFG scale must be a finite number, got nan"


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    """Ctrl-C while an image is being written: neither the image nor its temporary file remains."""
    from PIL import Image

    writer = ImageWriter(tmp_path, "p")
    real_replace = os.replace

    def interrupted(src, dst):
        assert Path(src).stat().st_size > 0  # the bytes went to the temporary file first
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer.save(Image.new("RGB", (8, 8)), 1)
    assert os.listdir(tmp_path / "p") == []
    monkeypatch.setattr(os, "replace", real_replace)
    assert writer.save(Image.new("RGB", (8, 8)), 1).name == "seed_1_00000.png"


def test_ctrl_c_exits_130_with_one_line(tiny_model, tmp_path):
    """SIGINT while sampling: status 130, one line, and every file left is a whole image."""
    ckpt, yaml, *_ = tiny_model
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "optimizedSD/optimized_txt2img.py"), "--ckpt", str(ckpt),
                             "--config", str(yaml), "--H", "64", "--W", "64", "--ddim_steps", "20", "--sampler", "ddim",
                             "--n_samples", "1", "--n_iter", "500", "--seed", "1", "--prompt", "p", "--device", "cpu",
                             "--outdir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "p").is_dir() or not os.listdir(out / "p"):  # wait for the first image
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no image within 300 s: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    bars = re.compile(r"sampling seeds|prompt \d+/\d+|\d+%\||image/s\]|it/s\]")  # tqdm's progress lines
    shown = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err).replace("\r", "\n")  # without the bars' cursor moves
    lines = [line for line in shown.splitlines() if line.strip() and not bars.search(line)]
    assert lines == ["interrupted: the images finished before Ctrl-C are kept, none is half-written"], err
    from PIL import Image

    for f in os.listdir(out / "p"):
        assert not f.startswith("."), f  # no temporary file
        Image.open(out / "p" / f).load()  # every file is a whole image
