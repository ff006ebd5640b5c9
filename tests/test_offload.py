"""The offload engine: which fragments are on the compute device while each one runs, in each mode.

The compute device here is `meta` (shape-only), so the test runs the real pipeline without a GPU
and every device copy is distinguishable from its CPU master.
"""
from __future__ import annotations

import pytest
import torch

from optimizedSD.model.config import tiny_config
from optimizedSD.model.fragments import FRAGMENTS, TEXT_ENCODER, UNET_IN, UNET_OUT, VAE, build_fragments
from optimizedSD.engine.offload import Offloader, fragment_bytes, unet_units
from optimizedSD.engine.pipeline import Pipeline, SampleSettings


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

    # The UNet halves run layer by layer (their `steps`), not through forward: watch each half's first layer.
    watched = {**fragments, UNET_IN: fragments[UNET_IN].time_embed, UNET_OUT: fragments[UNET_OUT].output_blocks[0][0]}
    for name, module in watched.items():
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

def _stream_run(resident, seeds=(1,), unet_bs=1):
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
    Pipeline(cfg, engine, unet_bs=unet_bs).txt2img("a fox", "", list(seeds), 64, 64, SampleSettings("ddim", 2, 7.5))
    assert engine.on_device == set() and on_device() == set()
    return seen, engine, fragments, list(units)


@pytest.mark.parametrize("n_resident", [0, 5])
def test_stream_mode_runs_each_block_on_every_chunk_and_moves_it_once(n_resident):
    """Block-major: each block runs on every chunk of the evaluation (cond and uncond rows, unet_bs
    1: two chunks) before the next block. The block sees itself and the resident blocks on the
    device, plus at most the next streamed block after it in run order (prefetched); no other block.
    Each evaluation moves every streamed block exactly once; the resident ones cross once, when
    sampling begins."""
    cfg_units = [u for u, _ in unet_units(build_fragments(tiny_config(), (UNET_IN, UNET_OUT)))]
    resident = tuple(cfg_units[:n_resident])
    seen, engine, fragments, order = _stream_run(resident)
    streamed = [u for u in order if u not in resident]
    assert [u for u, _ in seen] == [u for u in order for _chunk in range(2)] * 2  # 2 steps x 2 chunks
    for u, present in seen:
        assert u in present and set(resident) <= present, u
        after = [v for v in order[order.index(u) + 1:] if v in streamed]
        assert present - set(resident) - {u} <= set(after[:1]), (u, present)
    unit_bytes = {u: fragment_bytes(m) for u, m in unet_units(fragments)}
    streamed_bytes, resident_bytes = sum(unit_bytes[u] for u in streamed), sum(unit_bytes[u] for u in resident)
    assert engine.setup_bytes["sample"] == resident_bytes
    assert engine.phase_bytes["sample"] == 2 * streamed_bytes + resident_bytes


@pytest.mark.parametrize("seeds, unet_bs", [((1, 2, 3), 1), ((1, 2, 3), 4), ((1, 2, 3, 4, 5), 3)])
def test_stream_mode_moves_the_unet_once_per_step_whatever_the_batch(seeds, unet_bs):
    seen, engine, fragments, order = _stream_run((), seeds, unet_bs)
    chunks = -(-2 * len(seeds) // unet_bs)
    assert [u for u, _ in seen] == [u for u in order for _chunk in range(chunks)] * 2
    unet = sum(fragment_bytes(m) for _, m in unet_units(fragments))
    assert engine.phase_bytes["sample"] == 2 * unet and engine.setup_bytes["sample"] == 0


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

    units = dict(unet_units(fragments))  # the UNet runs block by block, not through its halves' forward
    blocks = {u: {k: v.data_ptr() for k, v in m.state_dict().items()} for u, m in units.items()}

    def same_block(unit, module):
        ran.append(unit)
        assert {k: v.data_ptr() for k, v in module.state_dict().items()} == blocks[unit], unit

    for name, module in fragments.items():
        module.register_forward_pre_hook(lambda mod, args, name=name: same_storage(name, mod))
    for unit, module in units.items():
        module.register_forward_pre_hook(lambda mod, args, unit=unit: same_block(unit, mod))
    fragments[VAE].decoder.register_forward_pre_hook(lambda mod, args: same_storage(VAE, fragments[VAE]))
    Pipeline(cfg, engine).txt2img("a fox", "", [1], 64, 64, SampleSettings("ddim", 2, 7.5))
    assert set(ran) == {TEXT_ENCODER, VAE, *units} and engine.bytes_moved == 0


# --- the lowest setting: layers streamed, the VAE decoder part by part, banded -------------------

def _random_fragments(cfg):
    fragments = build_fragments(cfg)
    torch.manual_seed(0)
    for m in fragments.values():
        for p in m.parameters():
            p.data.normal_(0, 0.05)
    return fragments


@pytest.fixture(scope="module")
def lowest_plan():
    """--lowvram's plan (every UNet layer streamed, the VAE tiled: its decoder streamed part by part),
    as `choose_plan` makes it, with one image's two rows in one chunk."""
    from optimizedSD.engine.planner import choose_plan

    plan = choose_plan(tiny_config(), torch.float16, turbo=False, lowvram=True, vram=None, unet_bs=2, height=64,
                       width=64, n_samples=1, guided=True)
    assert plan.mode == "stream" and plan.tile and plan.resident == ()
    return plan


@pytest.mark.parametrize("sampler", sorted(__import__("optimizedSD.sampling.samplers", fromlist=["SAMPLERS"]).SAMPLERS))
def test_the_lowest_budget_renders_every_sampler_as_the_resident_run(sampler, lowest_plan):
    """Every sampler, rendered on the CPU with every copy forced under the lowest plan (layers
    streamed, the decoder part by part; full-size, it plans 512x512 under 512 MiB with every sampler:
    tests/test_planner.py), gives the resident run's image bit for bit."""
    cfg = tiny_config()
    fragments = _random_fragments(cfg)
    settings = SampleSettings(sampler, 3, 7.5)
    reference = Pipeline(cfg, Offloader(fragments, torch.device("cpu")), unet_bs=lowest_plan.unet_bs).txt2img(
        "a fox", "", [4], 64, 64, settings)
    engine = Offloader(fragments, torch.device("cpu"), lowest_plan.mode, lowest_plan.resident, copy_on_host=True)
    images = Pipeline(cfg, engine, unet_bs=lowest_plan.unet_bs, tile=lowest_plan.tile).txt2img(
        "a fox", "", [4], 64, 64, settings)
    assert engine.bytes_moved > 0 and torch.isfinite(images).all()
    assert torch.equal(images, reference), sampler


def test_the_decoder_streams_part_by_part_and_bands_give_the_unbanded_image(monkeypatch):
    """A tiled decode moves each decoder part to the device only while it runs (its weights never all
    at once), with the same bits as the resident decode; with row bands forced small (every
    full-resolution layer in several bands, sizes that do not divide evenly), the image is the
    unbanded one up to float rounding."""
    from optimizedSD.engine import tiling
    from optimizedSD.engine.offload import VAE_DECODER

    cfg = tiny_config()
    fragments = _random_fragments(cfg)
    decoder = fragments[VAE].decoder
    z = torch.randn(2, cfg.channels, 13, 11)
    reference = Pipeline(cfg, Offloader(fragments, torch.device("cpu"))).decode(z)
    engine = Offloader(fragments, torch.device("cpu"), "stream", copy_on_host=True)
    on_device = []
    for name, modules in decoder.parts():
        modules[0].register_forward_pre_hook(lambda m, a: on_device.append(
            sum(p.untyped_storage().data_ptr() not in masters for p in decoder.parameters())))
    masters = {p.untyped_storage().data_ptr() for p in decoder.parameters()}
    images = Pipeline(cfg, engine, tile=True).decode(z)
    assert torch.equal(images, reference)
    parts = sum(1 for _ in decoder.parameters())
    assert on_device and 0 < max(on_device) < parts  # some weights, never the whole decoder
    # each image decoded on its own brings each part once; post_quant_conv (80 bytes) stays for the phase
    assert engine.phase_bytes["decode"] == 2 * fragment_bytes(decoder) + fragment_bytes(fragments[VAE].post_quant_conv)
    assert all(p.untyped_storage().data_ptr() in masters for p in decoder.parameters())
    monkeypatch.setattr(tiling, "BAND_BYTES", 3000)  # 1 to 3 rows per band at this size
    banded = Pipeline(cfg, Offloader(fragments, torch.device("cpu"), "stream", copy_on_host=True), tile=True).decode(z)
    torch.testing.assert_close(banded, reference, rtol=0, atol=1e-5)
    assert not torch.equal(banded, reference)  # the bands really ran (float rounding differs)
    assert VAE_DECODER in engine.units[VAE]
