"""The offload engine: which fragments are on the compute device while each one runs, in each mode.

The compute device here is `meta` (shape-only), so the test runs the real pipeline without a GPU
and every device copy is distinguishable from its CPU master.
"""
from __future__ import annotations

import pytest
import torch

from optimizedSD.config import tiny_config
from optimizedSD.fragments import FRAGMENTS, TEXT_ENCODER, UNET_IN, UNET_OUT, VAE, build_fragments
from optimizedSD.offload import Offloader, fragment_bytes
from optimizedSD.pipeline import Pipeline, SampleSettings


def _run(mode):
    cfg = tiny_config()
    fragments = build_fragments(cfg)
    masters = {n: {k: v.data_ptr() for k, v in m.state_dict().items()} for n, m in fragments.items()}
    engine = Offloader(fragments, torch.device("meta"), mode=mode)
    seen = []  # (fragment that runs, fragments whose weights are on the device at that moment)

    def on_device():
        return {n for n, m in fragments.items() if next(m.parameters()).device.type == "meta"}

    for name, module in fragments.items():
        module.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, on_device())))
    # The VAE is called through .decode, not forward: watch its decoder instead.
    fragments[VAE].decoder.register_forward_pre_hook(lambda mod, args: seen.append((VAE, on_device())))
    images = Pipeline(cfg, engine).txt2img("a fox", "", [1, 2], 64, 64, SampleSettings("ddim", 3, 7.5))
    assert images.shape == (2, 3, 64, 64) and images.device.type == "meta"
    assert on_device() == set() and engine.on_device == set()
    # Weights never came back from the device: every parameter is its original CPU master.
    for n, m in fragments.items():
        assert {k: v.data_ptr() for k, v in m.state_dict().items()} == masters[n]
        assert all(p.device.type == "cpu" for p in m.parameters())
    return seen, engine, fragments


def test_default_mode_has_one_fragment_on_the_device_at_a_time():
    seen, engine, fragments = _run("default")
    assert [n for n, _ in seen][:1] == [TEXT_ENCODER]
    for name, resident in seen:
        assert resident == {name}, (name, resident)
    # 3 DDIM steps (timesteps 1, 334, 667); 2 images x (cond, uncond) = 4 rows, unet_bs 1.
    steps = 3
    assert [n for n, _ in seen].count(UNET_IN) == [n for n, _ in seen].count(UNET_OUT) == steps * 4
    # Each UNet half crosses once per step, for all its chunks; text encoder and VAE once each.
    expected = (fragment_bytes(fragments[TEXT_ENCODER]) + fragment_bytes(fragments[VAE])
                + steps * (fragment_bytes(fragments[UNET_IN]) + fragment_bytes(fragments[UNET_OUT])))
    assert engine.bytes_moved == expected


def test_turbo_keeps_both_unet_halves_for_the_sampling_loop():
    seen, engine, fragments = _run("turbo")
    for name, resident in seen:
        expected = {UNET_IN, UNET_OUT} if name in (UNET_IN, UNET_OUT) else {name}
        assert resident == expected, (name, resident)
    expected = sum(fragment_bytes(fragments[n]) for n in FRAGMENTS)  # everything crosses once
    assert engine.bytes_moved == expected


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown offload mode"):
        Offloader(build_fragments(tiny_config(), [VAE]), torch.device("meta"), mode="fast")
