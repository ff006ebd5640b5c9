"""The CPU's default precision: bf16 where the CPU computes bf16 natively (said on the run's first line,
recorded in the metadata), fp32 elsewhere; --precision full gives the exact fp32 image (diffusers')."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from reference import NEGATIVE, PROMPT, assert_same_image, ddim_scheduler, diffusers_images, random_tiny_model, write_yaml_config

from optimizedSD.engine import pipeline
from optimizedSD.engine.spec import resolve_model
from optimizedSD.fronts.cli import main

SEED = 5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg, path, state, workdir = random_tiny_model(tmp_path_factory)
    return cfg, path, state, workdir, write_yaml_config(cfg, tmp_path_factory.mktemp("cfg") / "tiny.yaml")


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with AMX or AVX512-BF16 and no precision set in the environment (conftest sets one)."""
    monkeypatch.delenv(pipeline.CPU_PRECISION_ENV, raising=False)
    monkeypatch.setattr(pipeline, "native_bf16", lambda: True)


def test_default_is_bf16_on_a_native_bf16_cpu_and_says_so(model, bf16_cpu):
    cfg, path, _, _, yaml = model
    said = []
    spec = resolve_model(path, yaml, device="cpu", notify=said.append)
    assert (spec.precision, spec.dtype) == ("bf16", torch.bfloat16)
    assert len(said) == 1 and "bf16 natively" in said[0] and "--precision full" in said[0]
    assert resolve_model(path, yaml, device="cpu", precision="full").precision == "full"


def test_default_is_fp32_without_native_bf16(model, monkeypatch):
    monkeypatch.delenv(pipeline.CPU_PRECISION_ENV, raising=False)
    monkeypatch.setattr(pipeline, "native_bf16", lambda: False)
    cfg, path, _, _, yaml = model
    spec = resolve_model(path, yaml, device="cpu")
    assert spec.dtype == torch.float32


def _run(model, out, capsys, *extra):
    cfg, path, _, _, yaml = model
    assert main(["--ckpt", str(path), "--config", str(yaml), "--device", "cpu", "--H", "64", "--W", "64",
                 "--ddim_steps", "4", "--sampler", "ddim", "--scale", "7.5", "--seed", str(SEED), "--n_samples", "1",
                 "--prompt", PROMPT, "--negative_prompt", NEGATIVE, "--skip_grid", "--outdir", str(out), *extra]) == 0
    [file] = out.rglob("*.png")
    return Image.open(file), capsys.readouterr().out.splitlines()


def test_cli_bf16_default_and_full_is_the_exact_fp32_image(model, bf16_cpu, tmp_path, capsys):
    image, lines = _run(model, tmp_path / "default", capsys)
    assert "bf16 natively" in lines[0]  # the first line of the run
    assert "Precision: bf16" in image.info["parameters"]
    full, lines = _run(model, tmp_path / "full", capsys, "--precision", "full")
    assert not any("natively" in line for line in lines), lines
    assert "Precision" not in full.info["parameters"]
    ours = np.asarray(full.convert("RGB")).astype(np.int16)
    assert_same_image(ours, diffusers_images(model[:4], SEED, 64, 64, ddim_scheduler(), steps=4)[0])
    bf16 = np.asarray(image.convert("RGB")).astype(np.int16)
    assert not np.array_equal(bf16, ours)  # bf16 is not the fp32 image
