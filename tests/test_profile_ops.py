"""`bench.py --profile-ops`: the torch profiler's op table of one warm CPU image (tools/profile_ops.py).

Its counts are checked against the model itself: a txt2img image of `steps` euler steps runs every
UNet convolution once per evaluation (an image's guided pair in one batch on the CPU) and every
convolution of the VAE decoder once, so the profiled image's `aten::conv2d` calls are a count of
nn.Conv2d modules, made here from the checkpoint without the engine.
"""
from __future__ import annotations

import json
import sys

from torch import nn

from optimizedSD.model.checkpoint import load_fragments
from optimizedSD.model.config import SDConfig
from optimizedSD.model.paths import DEMO_CKPT, DEMO_CONFIG, ROOT

STEPS = 2


def bench_main(argv):
    sys.path.insert(0, str(ROOT / "optimizedSD"))
    import bench

    return bench.main(argv)


def convs(*modules: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for module in modules for m in module.modules())


def test_profile_counts_each_convolution_of_one_image(capsys):
    assert bench_main(["--profile-ops", "--ckpt", str(ROOT / DEMO_CKPT), "--config", str(ROOT / DEMO_CONFIG),
                       "--precision", "full", "--sizes", "64", "--steps", str(STEPS), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    calls = {r["op"]: r["calls"] for r in result["ops"]}
    f = load_fragments(ROOT / DEMO_CKPT, SDConfig.from_yaml(ROOT / DEMO_CONFIG))
    expected = STEPS * convs(f["unet_in"], f["unet_out"]) + convs(f["vae"].post_quant_conv, f["vae"].decoder)
    assert calls["aten::conv2d"] == expected
    seconds = [r["self_s"] for r in result["ops"]]
    assert seconds == sorted(seconds, reverse=True) and 0 < sum(seconds) <= result["image_s"] * 1.05
    # the phases: one UNet evaluation a step (the guided pair in one batch), one decode, one text encoding
    phases = {p["phase"]: p for p in result["phases"]}
    assert [phases[k]["calls"] for k in ("text", "unet", "decode")] == [1, STEPS, 1]
    # inside the profiled render, which image_s times (to 0.01 s; the phases to 0.001 s)
    assert 0 < sum(p["total_s"] for p in phases.values()) <= result["image_s"] * 1.05 + 0.01


def test_profile_table_and_its_bad_input(capsys):
    assert bench_main(["--profile-ops", "--ckpt", str(ROOT / DEMO_CKPT), "--config", str(ROOT / DEMO_CONFIG),
                       "--precision", "full", "--sizes", "64", "--steps", "1", "--rows", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("one warm 64² image, 1 euler step, --precision full:")
    assert [line.split(":")[0] for line in lines[1:4]] == ["  text", "  unet", "  decode"] and len(lines) == 4 + 1 + 3
    assert bench_main(["--profile-ops"]) == 2
    assert capsys.readouterr().err.strip() == "error: --profile-ops needs --ckpt CKPT"
    assert bench_main(["--profile-ops", "--ckpt", str(ROOT / "missing.ckpt")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: checkpoint not found")


def test_openvino_profile_skipped_with_one_line_where_it_is_not_installed(capsys, tmp_path):
    assert bench_main(["--profile-ops", "--vs-openvino", "--openvino-python", str(tmp_path / "no-python"),
                       "--ckpt", str(ROOT / DEMO_CKPT), "--config", str(ROOT / DEMO_CONFIG), "--precision", "full",
                       "--sizes", "64", "--steps", "1", "--rows", "2"]) == 0
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if "OpenVINO" in line] == [
        f"OpenVINO: skipped, no Python at {tmp_path / 'no-python'} (python -m venv /tmp/ov-venv && "
        "/tmp/ov-venv/bin/pip install 'optimum-intel[openvino]' diffusers; it brings its own torch)"]
    assert "OpenVINO" not in out and len(out.splitlines()) == 4 + 1 + 2
