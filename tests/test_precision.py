"""Precision: --precision upcast (fp16 weights, fp32 arithmetic), the redo of an overflowing fp16 UNet
step, the default precision of a CUDA card, and what upcast costs in planned device memory.

The CPU normally computes in fp32; these tests put fp16 weights on the CPU to run the fp16 and upcast
paths there.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from reference import tiny_fragments

from optimizedSD.model.config import SDConfig, tiny_config
from optimizedSD.model.fragments import UNET_IN, UNET_OUT
from optimizedSD.engine.inputs import to_pil
from optimizedSD.engine.offload import Offloader
from optimizedSD.engine.pipeline import Pipeline, SampleSettings, default_precision, weight_dtype
from optimizedSD.engine.planner import MemoryPlan, predict
from optimizedSD.model.upcast import UpcastMode

CFG = tiny_config()
SETTINGS = SampleSettings("ddim", 5, 7.5)


@pytest.fixture(scope="module")
def fp16_fragments():
    """The tiny model with every weight random and stored in fp16."""
    return {k: v.half() for k, v in tiny_fragments(CFG).items()}


def _pipe(fragments, dtype, precision):
    return Pipeline(CFG, Offloader(fragments, torch.device("cpu")), dtype=dtype, precision=precision)


def _pixels(images):
    return np.stack([np.asarray(im) for im in to_pil(images)]).astype(np.int16)


def test_upcast_mode_computes_layers_in_fp32_and_leaves_the_weights_alone():
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3), torch.nn.GroupNorm(8, 32), torch.nn.Flatten(),
                                 torch.nn.LayerNorm(32 * 36), torch.nn.Linear(32 * 36, 8)).half()
    table = torch.nn.Embedding(10, 8).half()
    before = [(p, p.dtype, p.detach().clone()) for p in [*layers.parameters(), *table.parameters()]]
    x, ids = torch.randn(2, 4, 8, 8), torch.tensor([1, 7])
    fp32 = copy.deepcopy(layers).float()  # the same fp16-rounded weights, converted
    with torch.no_grad(), UpcastMode():
        out, rows = layers(x), table(ids)
        assert torch.equal(out, fp32(x)) and out.dtype == torch.float32
        assert rows.dtype == torch.float32 and torch.equal(rows, table.weight[ids].float())
    now = [*layers.parameters(), *table.parameters()]
    assert all(p is p0 and p.dtype == d and torch.equal(p, v) for p, (p0, d, v) in zip(now, before))


def test_upcast_equals_fp32_arithmetic_on_the_fp16_weights(fp16_fragments):
    """fp16-stored weights computed in fp32 (upcast) give the image of an fp32 run of the same
    fp16-rounded weights (within 1/255), and the weights stay fp16."""
    fp32_fragments = {k: copy.deepcopy(v).float() for k, v in fp16_fragments.items()}
    upcast = _pipe(fp16_fragments, torch.float16, "upcast").txt2img("a fox", "", [1, 2], 64, 64, SETTINGS)
    full = _pipe(fp32_fragments, torch.float32, "full").txt2img("a fox", "", [1, 2], 64, 64, SETTINGS)
    a, b = _pixels(upcast), _pixels(full)
    assert ((b > 0) & (b < 255)).mean() > 0.5 and b.std() > 10  # real pixels, not a flat image
    print(f"upcast vs fp32: max {np.abs(a - b).max()}/255")
    assert np.abs(a - b).max() <= 1
    assert all(p.dtype == torch.float16 for m in fp16_fragments.values() for p in m.parameters())


def test_a_nan_unet_output_is_redone_in_upcast(fp16_fragments, monkeypatch):
    """fp16 arithmetic (autocast's weights; on the CPU without autocast): the first UNet evaluation
    is made to return NaN; it is computed again in upcast, counted once, and the image is finite."""
    out = fp16_fragments[UNET_OUT].out
    calls = []

    def first_is_nan(x):
        calls.append(x.dtype)
        y = torch.nn.Sequential.forward(out, x)
        return torch.full_like(y, float("nan")) if len(calls) == 1 else y

    monkeypatch.setattr(out, "forward", first_is_nan)
    pipe = _pipe(fp16_fragments, torch.float16, "autocast")
    images = pipe.txt2img("a fox", "", [1], 64, 64, SETTINGS)
    assert pipe.redone_in_upcast == 1 and torch.isfinite(images).all()
    # two chunks (unet_bs 1: uncond, cond) per evaluation: fp16, its redo in fp32, then fp16 again
    assert calls[:6] == [torch.float16] * 2 + [torch.float32] * 2 + [torch.float16] * 2


def test_every_overflowing_step_is_redone_and_equals_upcast(fp16_fragments):
    """A real fp16 overflow: the first convolution scaled by 1e5 makes fp16 activations exceed 65504
    (GroupNorm then gives NaN) at every step, while fp32 holds them. Every evaluation is redone, so
    the latents are exactly those of an upcast run from the same (fp16-encoded) conditioning."""
    big = {k: copy.deepcopy(v) for k, v in fp16_fragments.items()}
    with torch.no_grad():
        big[UNET_IN].input_blocks[0][0].weight.mul_(1e5)
    pipe = _pipe(big, torch.float16, "autocast")
    latents = pipe.txt2img_latents("a fox", "", [3], 64, 64, SETTINGS)
    upcast = _pipe(big, torch.float16, "upcast")
    upcast.conditioning = pipe.conditioning  # the text encoded as the autocast run encodes it
    reference = upcast.txt2img_latents("a fox", "", [3], 64, 64, SETTINGS)
    assert pipe.redone_in_upcast == SETTINGS.steps and torch.isfinite(latents).all()
    assert torch.equal(latents, reference)


@pytest.mark.parametrize("name, capability, expected", [
    ("NVIDIA GeForce GTX 1660 SUPER", (7, 5), "upcast"),
    ("NVIDIA GeForce GTX 1650", (7, 5), "upcast"),
    ("NVIDIA GeForce GTX 1650 Ti with Max-Q Design", (7, 5), "upcast"),
    ("NVIDIA T1000", (7, 5), "upcast"),
    ("NVIDIA GeForce MX450", (7, 5), "upcast"),
    ("NVIDIA GeForce RTX 2060", (7, 5), "autocast"),  # Turing with tensor cores
    ("Tesla T4", (7, 5), "autocast"),
    ("NVIDIA GeForce GTX 1080", (6, 1), "autocast"),
    ("NVIDIA GeForce RTX 3060", (8, 6), "autocast"),
])
def test_default_precision_of_a_cuda_card(monkeypatch, name, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    precision, note = default_precision(torch.device("cuda"))
    assert precision == expected
    assert (note is not None) == (expected == "upcast") and (note is None or name in note)


def test_default_precision_off_cuda():
    assert default_precision(torch.device("cpu")) == ("autocast", None)
    assert weight_dtype(torch.device("cpu"), "upcast") == torch.float32
    assert weight_dtype(torch.device("meta"), "upcast") == torch.float16


def test_upcast_plans_near_fp16_memory():
    """Full-size SD v1 at 512x512, one image, the default mode: upcast holds fp16 weights and fp32
    activations, within 1.15x of the fp16 (autocast) peak."""
    cfg = SDConfig()
    fp16, _ = predict(cfg, torch.float16, MemoryPlan("default"), 512, 512, 1)
    upcast, _ = predict(cfg, torch.float16, MemoryPlan("default"), 512, 512, 1, precision="upcast")
    ratio = max(upcast.values()) / max(fp16.values())
    print(f"planned 512x512 default peak: autocast {max(fp16.values()) / 2**30:.3f} GiB, "
          f"upcast {max(upcast.values()) / 2**30:.3f} GiB ({ratio:.3f}x)")
    assert ratio <= 1.15
    assert fp16["decode"] < upcast["decode"]  # fp32 activations are counted
