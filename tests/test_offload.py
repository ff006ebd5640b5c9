"""The offload engine: which fragments are on the compute device while each one runs, in each mode.

The compute device here is `meta` (shape-only), so the test runs the real pipeline without a GPU
and every device copy is distinguishable from its CPU master.
"""
from __future__ import annotations

import pytest
import torch

from optimizedSD.config import tiny_config
from optimizedSD.fragments import FRAGMENTS, TEXT_ENCODER, UNET_IN, UNET_OUT, VAE, build_fragments
from optimizedSD.offload import Offloader, fragment_bytes, unet_units
from optimizedSD.pipeline import Pipeline, SampleSettings


def _run(mode):
    cfg = tiny_config()
    fragments = build_fragments(cfg)
    masters = {n: {k: v.data_ptr() for k, v in m.state_dict().items()} for n, m in fragments.items()}
    engine = Offloader(fragments, torch.device("meta"), mode=mode)
    seen = []  # (fragment that runs, fragments whose weights are on the device at that moment)
    # txt2img only decodes: the VAE counts as on the device when its decoder is; its encoder never is.
    probes = {**fragments, VAE: fragments[VAE].decoder}

    def on_device():
        assert next(fragments[VAE].encoder.parameters()).device.type == "cpu"
        return {n for n, m in probes.items() if next(m.parameters()).device.type == "meta"}

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
    # Each UNet half crosses once per step, for all its chunks; text encoder and VAE decoder once each.
    expected = (fragment_bytes(fragments[TEXT_ENCODER]) + _decoder_bytes(fragments)
                + steps * (fragment_bytes(fragments[UNET_IN]) + fragment_bytes(fragments[UNET_OUT])))
    assert engine.bytes_moved == expected


def test_turbo_keeps_both_unet_halves_for_the_sampling_loop():
    seen, engine, fragments = _run("turbo")
    for name, resident in seen:
        expected = {UNET_IN, UNET_OUT} if name in (UNET_IN, UNET_OUT) else {name}
        assert resident == expected, (name, resident)
    expected = sum(fragment_bytes(fragments[n]) for n in FRAGMENTS if n != VAE) + _decoder_bytes(fragments)
    assert engine.bytes_moved == expected  # everything crosses once, but the VAE encoder not at all


def _decoder_bytes(fragments):
    vae = fragments[VAE]
    return fragment_bytes(vae.decoder) + fragment_bytes(vae.post_quant_conv)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown offload mode"):
        Offloader(build_fragments(tiny_config(), [VAE]), torch.device("meta"), mode="fast")


# --- streaming UNet blocks ------------------------------------------------------------------------

def _stream_run(resident):
    """Stream mode on meta, recording which UNet units are on the device whenever a block starts."""
    cfg = tiny_config()
    fragments = build_fragments(cfg)
    units = dict(unet_units(fragments))
    engine = Offloader(fragments, torch.device("meta"), mode="stream", resident=resident)
    seen = []

    def on_device():
        return {u for u, m in units.items() if next(m.parameters()).device.type == "meta"}

    for u, m in units.items():
        m.register_forward_pre_hook(lambda mod, args, u=u: seen.append((u, on_device())))
    Pipeline(cfg, engine, unet_bs=2).txt2img("a fox", "", [1], 64, 64, SampleSettings("ddim", 2, 7.5))
    assert engine.on_device == set() and on_device() == set()
    return seen, engine, fragments, list(units)


@pytest.mark.parametrize("n_resident", [0, 5])
def test_stream_mode_holds_resident_blocks_plus_the_running_one(n_resident):
    """Registered after the engine's hook, each block sees itself and the resident blocks on the
    device, plus at most the next streamed block (prefetched); no other block."""
    cfg_units = [u for u, _ in unet_units(build_fragments(tiny_config(), (UNET_IN, UNET_OUT)))]
    resident = tuple(cfg_units[:n_resident])
    seen, engine, fragments, order = _stream_run(resident)
    streamed = [u for u in order if u not in resident]
    assert [u for u, _ in seen] == order * 2  # 2 steps, cond and uncond in one chunk (unet_bs 2)
    for u, present in seen:
        assert u in present and set(resident) <= present, u
        nxt = streamed[(streamed.index(u) + 1) % len(streamed)] if u in streamed else None
        assert present - set(resident) - {u} <= {nxt}, (u, present)
    unit_bytes = {u: fragment_bytes(m) for u, m in unet_units(fragments)}
    # Every streamed block crosses once per step, the resident ones once for the loop, and the first
    # streamed block once more: prefetched after the last block of the last step, for a step that
    # does not come (the engine does not know which step is the last).
    expected = 2 * sum(unit_bytes[u] for u in streamed) + sum(unit_bytes[u] for u in resident) + unit_bytes[streamed[0]]
    assert engine.phase_bytes["sample"] == expected


def test_every_mode_gives_the_same_image():
    """On the CPU with copies forced (every load, prefetch and drop really happens), the image of a
    seed is the same, bit for bit, in every mode, and equal to the run without offloading."""
    cfg = tiny_config()
    fragments = build_fragments(cfg)
    torch.manual_seed(0)
    for m in fragments.values():
        for p in m.parameters():
            p.data.normal_(0, 0.05)
    units = [u for u, _ in unet_units(fragments)]
    settings = SampleSettings("ddim", 3, 7.5)
    reference = Pipeline(cfg, Offloader(fragments, torch.device("cpu"))).txt2img("a fox", "", [4, 5], 64, 64, settings)
    for mode, resident in [("default", ()), ("turbo", ()), ("stream", ()), ("stream", tuple(units[:7]))]:
        engine = Offloader(fragments, torch.device("cpu"), mode, resident, copy_on_host=True)
        images = Pipeline(cfg, engine).txt2img("a fox", "", [4, 5], 64, 64, settings)
        assert engine.bytes_moved > 0
        assert torch.equal(images, reference), (mode, len(resident))
    # Other batch cuts change the CPU kernels' summation order, so only float rounding may differ.
    engine = Offloader(fragments, torch.device("cpu"), "stream", tuple(units[:3]), copy_on_host=True)
    images = Pipeline(cfg, engine, unet_bs=4).txt2img("a fox", "", [4, 5], 64, 64, settings)
    torch.testing.assert_close(images, reference, rtol=0, atol=1e-5)


def test_unknown_resident_unit_is_refused():
    with pytest.raises(ValueError, match="unknown resident units"):
        Offloader(build_fragments(tiny_config(), [UNET_IN]), torch.device("meta"), "stream", ("unet_in.nope",))


@pytest.mark.parametrize("mode, n_resident", [("default", 0), ("turbo", 0), ("stream", 0), ("stream", 5)])
def test_on_the_cpu_nothing_is_copied(mode, n_resident):
    """When the compute device is the host, every fragment computes with its host masters themselves:
    while each runs, every parameter and buffer is the tensor loaded (same storage), and no byte moves."""
    cfg = tiny_config()
    fragments = build_fragments(cfg)
    masters = {n: {k: v.data_ptr() for k, v in m.state_dict().items()} for n, m in fragments.items()}
    resident = tuple(u for u, _ in unet_units(fragments))[:n_resident]
    engine = Offloader(fragments, torch.device("cpu"), mode, resident)
    ran = []

    def same_storage(name, module):
        ran.append(name)
        assert {k: v.data_ptr() for k, v in module.state_dict().items()} == masters[name], name

    for name, module in fragments.items():
        module.register_forward_pre_hook(lambda mod, args, name=name: same_storage(name, mod))
    fragments[VAE].decoder.register_forward_pre_hook(lambda mod, args: same_storage(VAE, fragments[VAE]))
    Pipeline(cfg, engine).txt2img("a fox", "", [1], 64, 64, SampleSettings("ddim", 2, 7.5))
    assert set(ran) == set(FRAGMENTS) and engine.bytes_moved == 0
