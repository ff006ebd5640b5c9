"""The planner: full-size SD v1 runs on the meta device, their planned peaks, and budgets."""
from __future__ import annotations

import json

import pytest
import torch

from optimizedSD.config import SDConfig
from optimizedSD.fragments import TEXT_ENCODER, UNET_OUT, build_fragment
from optimizedSD.planner import GiB, MemoryPlan, PlanError, parse_size, plan_budget, predict

CFG = SDConfig()
FP16 = torch.float16
MiB = 2 ** 20


def fp16_bytes(name: str) -> int:
    with torch.device("meta"):
        return 2 * sum(p.numel() for p in build_fragment(name, CFG).parameters())


@pytest.fixture(scope="module")
def peaks_512():
    return {mode: predict(CFG, FP16, MemoryPlan(mode, ()), 512, 512, 1)[0] for mode in ("default", "stream", "turbo")}


def test_parse_size():
    assert parse_size("2G") == parse_size("2GiB") == parse_size("2gb") == 2 * GiB
    assert parse_size("1536M") == 1536 * MiB and parse_size("0.75G") == int(0.75 * GiB) and parse_size("4096") == 4096
    for bad in ("", "two", "-1G", "0", "2X"):
        with pytest.raises(ValueError, match="memory size"):
            parse_size(bad)


def test_default_512_is_the_output_half_plus_activations(peaks_512):
    """One UNet half at a time: the sampling peak is the larger (output) half's fp16 weights plus the
    activations of one 512x512 latent pair, which at 64x64 are tens of MiB (bounded by 256 MiB)."""
    out_half = fp16_bytes(UNET_OUT)
    assert abs(out_half - 974 * MiB) < 2 * MiB  # the figure for the output half
    assert out_half < peaks_512["default"]["sample"] < out_half + 256 * MiB
    text = fp16_bytes(TEXT_ENCODER)
    assert text < peaks_512["default"]["text"] < text + 32 * MiB
    assert max(peaks_512["default"].values()) <= 1.5 * GiB  # acceptance: default mode


def test_modes_are_ordered_and_lowvram_is_lowest(peaks_512):
    low, default, turbo = (max(peaks_512[m].values()) for m in ("stream", "default", "turbo"))
    assert low <= 0.75 * GiB  # acceptance: lowest mode at 512x512
    assert low < default < turbo
    unet = fp16_bytes("unet_in") + fp16_bytes(UNET_OUT)
    assert turbo >= unet and peaks_512["turbo"]["sample"] < unet + 256 * MiB


def test_budgets_fit_and_order_their_peaks(peaks_512):
    plans = [plan_budget(CFG, FP16, budget, 512, 512, 1) for budget in (int(0.8 * GiB), 1 * GiB, 2 * GiB)]
    peaks = [p.peak() for p in plans]
    assert all(p <= b for p, b in zip(peaks, (0.8 * GiB, 1 * GiB, 2 * GiB)))
    assert max(peaks_512["stream"].values()) <= peaks[0] <= peaks[1] <= peaks[2]
    assert len(plans[0].resident) <= len(plans[1].resident)
    # 2 GiB holds the whole UNet at 512x512, with cond and uncond in one pass (unet_bs 2)
    assert (plans[2].mode, plans[2].unet_bs) == ("turbo", 2)
    turbo_bs2, _ = predict(CFG, FP16, MemoryPlan("turbo", (), None, 2), 512, 512, 1)
    assert peaks[2] == max(turbo_bs2.values())
    with pytest.raises(PlanError, match="too small"):
        plan_budget(CFG, FP16, 200 * MiB, 512, 512, 1)


def test_2048_fits_in_4g():
    plan = plan_budget(CFG, FP16, 4 * GiB, 2048, 2048, 1)
    assert plan.peak() <= 4 * GiB
    assert plan.tile  # an untiled decode of 2048x2048 does not fit


def test_tiled_encode_keeps_a_large_img2img_low():
    """Untiled, encoding a 2048x2048 init image holds full-resolution 128-channel fp16 maps
    (128 * 2048^2 * 2 bytes = 1 GiB each, at least two at once); in 512x512-pixel tiles it holds one
    tile's (64 MiB each) plus the 65 MiB encoder."""
    untiled, _ = predict(CFG, FP16, MemoryPlan("stream"), 2048, 2048, 1, encode=True)
    tiled, _ = predict(CFG, FP16, MemoryPlan("stream", tile=True), 2048, 2048, 1, encode=True)
    assert untiled["encode"] >= 2 * GiB and tiled["encode"] <= 0.5 * GiB
    assert tiled["sample"] == untiled["sample"]  # tiles change the VAE only


def test_cli_plans_without_a_checkpoint(tmp_path, capsys, monkeypatch):
    from optimizedSD.cli import main

    monkeypatch.chdir(tmp_path)  # no checkpoint anywhere near
    code = main(["--device", "meta", "--n_samples", "1", "--ddim_steps", "2", "--sampler", "ddim",
                              "--lowvram", "--json", "--outdir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    figures = json.loads(out.strip().splitlines()[-1])
    assert set(figures["peak_bytes"]) == {"text", "sample", "decode"}
    assert max(figures["peak_bytes"].values()) <= 0.75 * GiB and figures["mode"] == "stream"
    assert not (tmp_path / "out").exists()
