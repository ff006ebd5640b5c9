"""--fp8: images against diffusers' pipeline whose Linear/Conv2d weights were round-tripped through
float8_e4m3fn the same way (not against our fp16 or fp32 image), LoRA merged into the fp8 masters and
undone, the metadata, bad input, and the planner's figures against a count of live meta bytes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_files import LOCON_TARGETS, TEXT_TARGETS, allow_installed_peft, kohya_state, lora_tensors, write_kohya
from reference import (NEGATIVE, PROMPT, assert_same_image, ddim_scheduler, diffusers_images, random_tiny_model,
                       write_yaml_config)

from optimizedSD.engine.engine import Engine
from optimizedSD.engine.request import Request, RequestError
from optimizedSD.engine.spec import resolve_model
from optimizedSD.fronts.cli import main

SEED = 23
FP8 = torch.float8_e4m3fn
MiB = 2 ** 20


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg, path, state, workdir = random_tiny_model(tmp_path_factory)
    yaml = write_yaml_config(cfg, tmp_path_factory.mktemp("cfg") / "tiny.yaml")
    return cfg, path, state, workdir, yaml


def round_trip(module: torch.nn.Module, skip: str = "") -> int:
    """Every nn.Linear / nn.Conv2d weight of a diffusers or transformers model (not under `skip`)
    replaced by its float8_e4m3fn round trip, as an fp8-storing runner computes with it."""
    n = 0
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not (skip and name.startswith(skip)):
                # a new tensor: the converted model's weights may share storage with the state dict
                m.weight = torch.nn.Parameter(m.weight.to(FP8).to(m.weight.dtype), requires_grad=False)
                n += 1
    return n


def fp8_pipe(which: str):
    """A `prepare` for `diffusers_images`: the UNet's layers round-tripped (its time embedding kept,
    as ours), with `all` the text encoder's too; the VAE is left."""
    def prepare(pipe):
        assert round_trip(pipe.unet, skip="time_embedding") > 20
        if which == "all":
            assert round_trip(pipe.text_encoder) > 4
    return prepare


def ours(model, fp8, loras=(), engine=None, steps=10):
    cfg, path, _, _, yaml = model
    engine = engine or Engine(resolve_model(path, yaml, device="cpu", precision="full", fp8=fp8))
    r = engine.complete(Request(PROMPT, negative_prompt=NEGATIVE, seed=SEED, n_samples=1, sampler="ddim", steps=steps,
                                scale=7.5, width=64, height=64, loras=tuple((str(p), w) for p, w in loras)))
    return np.asarray([it.image for batch in engine.render(r) for it in batch][0]).astype(np.int16), engine


def reference(model, prepare, steps=10):
    cfg, path, state, workdir, _ = model  # a copy of the state: fuse_lora writes into the weights
    return diffusers_images((cfg, path, {k: v.clone() for k, v in state.items()}, workdir), SEED, 64, 64,
                            ddim_scheduler(), steps=steps, prepare=prepare)[0]


@pytest.mark.parametrize("which", ["unet", "all"])
def test_fp8_equals_diffusers_with_round_tripped_weights(model, which):
    image, engine = ours(model, which)
    expected = reference(model, fp8_pipe(which))
    assert_same_image(image, expected)
    # the stored dtypes: fp8 for the layers' weights, the rest fp32 (CPU, full precision)
    unet = engine.fragments["unet_in"]
    assert unet.input_blocks[1][0].in_layers[2].weight.dtype == FP8
    assert unet.input_blocks[1][0].in_layers[2].bias.dtype == torch.float32
    assert unet.time_embed[0].weight.dtype == torch.float32
    assert engine.fragments["vae"].decoder.conv_in.weight.dtype == torch.float32
    text = engine.fragments["text_encoder"]
    assert {p.dtype for p in text.parameters()} == ({FP8, torch.float32} if which == "all" else {torch.float32})


def test_fp8_is_not_the_fp32_image_and_round_trip_matters(model):
    """The comparison means something: diffusers' own fp32 image differs from its fp8 round trip's."""
    plain = reference(model, None)
    fp8 = reference(model, fp8_pipe("unet"))
    assert np.abs(plain - fp8).max() > 2


@pytest.fixture(scope="module")
def kohya(model, tmp_path_factory):
    unet, text, _, _ = lora_tensors(model[:4], 1, LOCON_TARGETS, TEXT_TARGETS, rank=4, alpha=2)
    return write_kohya(tmp_path_factory.mktemp("lora") / "locon.safetensors", kohya_state(unet, text, alpha=2))


def test_lora_is_merged_into_the_fp8_masters_and_undone(model, kohya, monkeypatch):
    """A LoRA patch of fp8 masters: W8 <- fp8(fp32(W8) + delta), one rounding (ours), equals diffusers'
    round-tripped UNet with the LoRA fused (`fuse_lora`) and round-tripped again; the request after,
    without it, equals a fresh engine's image bit for bit (undo restores the fp8 masters)."""
    allow_installed_peft(monkeypatch)

    def prepare(pipe):
        round_trip(pipe.unet, skip="time_embedding")
        pipe.load_lora_weights(str(kohya), adapter_name="k")
        pipe.fuse_lora(lora_scale=0.8)
        pipe.unload_lora_weights()
        round_trip(pipe.unet, skip="time_embedding")

    plain, engine = ours(model, "unet")
    with_lora, _ = ours(model, "unet", [(kohya, 0.8)], engine=engine)
    expected = reference(model, prepare)
    assert np.abs(with_lora - plain).mean() > 3  # the LoRA survives the fp8 rounding
    assert_same_image(with_lora, expected)
    after, _ = ours(model, "unet", engine=engine)
    assert np.array_equal(after, plain) and engine.loads == 1


def test_metadata_records_fp8_and_a_replay_reads_it(model, tmp_path):
    from PIL import Image

    from optimizedSD.outputs.infotext import model_fields, parse, read_parameters

    cfg, path, _, _, yaml = model
    for which, value in (("unet", "UNet"), ("all", "Enable")):
        out = tmp_path / which
        assert main(["--ckpt", str(path), "--config", str(yaml), "--device", "cpu", "--precision", "full", "--H", "64",
                     "--W", "64", "--ddim_steps", "2", "--sampler", "ddim", "--n_samples", "1", "--seed", "3",
                     "--skip_grid", "--outdir", str(out), "--fp8", *([which] if which == "all" else [])]) == 0
        [file] = out.rglob("*.png")
        text = read_parameters(Image.open(file))
        assert f"FP8 weight: {value}" in text
        assert model_fields(parse(text))["fp8"] == which
    assert model_fields(parse("a\nSteps: 2, Seed: 1, Size: 64x64, FP8 weight: Disable"))["fp8"] is None


def test_bad_fp8_input_is_one_line(model, tmp_path, capsys, monkeypatch):
    cfg, path, _, _, yaml = model
    base = ["--ckpt", str(path), "--config", str(yaml), "--device", "cpu", "--H", "64", "--W", "64",
            "--outdir", str(tmp_path / "out")]
    assert main([*base, "--fp8", "vae"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --fp8 vae: choose unet") and not (tmp_path / "out").exists()
    with pytest.raises(RequestError, match="choose unet"):
        resolve_model(path, yaml, device="cpu", fp8="vae")
    from optimizedSD.model import fp8 as fp8_weights

    monkeypatch.setattr(fp8_weights, "FP8", None)  # a torch without float8 dtypes
    assert main([*base, "--fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "float8_e4m3fn" in err and not (tmp_path / "out").exists()


# --- the planner -----------------------------------------------------------------------------------

def _stored_unet_bytes(cfg) -> tuple[int, int]:
    """(fp16 bytes, fp8-storage bytes) of the UNet, counted from freshly built halves by layer type:
    Linear/Conv2d weights outside time_embed at 1 byte, every other parameter at 2."""
    from optimizedSD.model.fragments import UNET_IN, UNET_OUT, build_fragment

    fp16 = fp8 = 0
    with torch.device("meta"):
        for half in (UNET_IN, UNET_OUT):
            for name, m in build_fragment(half, cfg).named_modules():
                for pname, p in m.named_parameters(recurse=False):
                    fp16 += 2 * p.numel()
                    eight = (type(m) in (torch.nn.Linear, torch.nn.Conv2d) and pname == "weight"
                             and not name.startswith("time_embed"))
                    fp8 += (1 if eight else 2) * p.numel()
    return fp16, fp8


def test_lowvram_streams_half_the_unet_bytes_per_evaluation():
    """Full-size SD v1 at 512x512 under --lowvram: per evaluation the whole UNet crosses the bus, at
    the stored bytes (1.60 GiB in fp16, about 0.80 GiB with fp8)."""
    from optimizedSD.engine.planner import MemoryPlan, predict
    from optimizedSD.model.config import SDConfig

    cfg = SDConfig()
    fp16, fp8 = _stored_unet_bytes(cfg)
    plan = MemoryPlan("stream", (), None, 1, True)
    _, moved16 = predict(cfg, torch.float16, plan, 512, 512, 1)
    _, moved8 = predict(cfg, torch.float16, plan, 512, 512, 1, fp8="unet")
    assert (moved16, moved8) == (fp16, fp8)
    assert 0.79 < fp8 / 2 ** 30 < 0.82 and 1.58 < fp16 / 2 ** 30 < 1.62


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("fp8", ["unet", "all"])
def test_fp8_plans_are_what_a_full_run_counts(fp8, batch, monkeypatch):
    """predict's fp8 figures (one step, replayed ops and calls) equal a 3-step run of the whole pipeline
    on meta with nothing replayed, fp8 masters on the host (tiny model, 64x64, --lowvram)."""
    from optimizedSD.engine import memory
    from optimizedSD.engine.memory import MetaMeter
    from optimizedSD.engine.offload import Offloader
    from optimizedSD.engine.pipeline import Pipeline, SampleSettings
    from optimizedSD.engine.planner import MemoryPlan, predict
    from optimizedSD.model.attention import auto_policy, using_policy
    from optimizedSD.model.checkpoint import empty_fragments
    from optimizedSD.model.config import tiny_config
    from optimizedSD.model.fp8 import store_fragments_fp8

    cfg, fp16 = tiny_config(), torch.float16
    plan = MemoryPlan("stream", (), None, 2, True)
    peaks, moved = predict(cfg, fp16, plan, 64, 64, batch, fp8=fp8)
    plain, moved16 = predict(cfg, fp16, plan, 64, 64, batch)
    assert moved < moved16 and peaks["sample"] < plain["sample"]
    monkeypatch.setattr(memory, "_signature", lambda *a: None)
    monkeypatch.setattr(memory._Replayed, "__call__", lambda self, *a, **k: self.forward(*a, **k))
    with using_policy(auto_policy("cuda")), MetaMeter() as meter:
        fragments = empty_fragments(cfg, dtype=fp16)
        store_fragments_fp8(fragments, fp8)
        engine = Offloader(fragments, torch.device("meta"), plan.mode, plan.resident, meter=meter)
        pipe = Pipeline(cfg, engine, dtype=fp16, unet_bs=plan.unet_bs, tile=plan.tile)
        pipe.decode(pipe.txt2img_latents("a fox", "", list(range(batch)), 64, 64, SampleSettings("ddim", 3)))
    assert engine.peaks == peaks
    assert engine.phase_bytes["sample"] - engine.setup_bytes["sample"] == 3 * moved
