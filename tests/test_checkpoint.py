"""Checkpoint loading: every key lands once, the right weights load, and bad files fail clearly."""
from __future__ import annotations

import builtins
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import ema_key, expected_weights, write_tiny_checkpoint
from optimizedSD.model.checkpoint import CheckpointError, checkpoint_shapes, detect_family, load_fragments
from optimizedSD.model.config import SDConfig, UNetConfig, tiny_config
from optimizedSD.model.fragments import (FRAGMENTS, TEXT_ENCODER, UNET_IN, UNET_OUT, VAE, build_fragments,
                                   checkpoint_key, fragment_of)

UNET = "model.diffusion_model."


def assert_loaded(modules, written, *, dtype=torch.float32, ema=False, names=FRAGMENTS):
    """Every tensor of every fragment equals the written one in `dtype`; nothing is left on meta."""
    expected = expected_weights(written, ema=ema, names=names)
    assert set(modules) == set(names)
    for name, module in modules.items():
        state = module.state_dict()
        assert set(state) == set(expected[name]), name
        for key, tensor in state.items():
            assert tensor.device.type == "cpu", (name, key)
            want = expected[name][key]
            want = want.to(dtype) if want.is_floating_point() else want
            assert tensor.dtype == want.dtype and torch.equal(tensor, want), (name, key)
        for key, tensor in [*module.named_parameters(), *module.named_buffers()]:
            assert tensor.device.type == "cpu" and not tensor.requires_grad, (name, key)
        assert not any(m.training for m in module.modules()), name


def test_fragment_of_places_every_key_of_the_full_layout_once():
    with torch.device("meta"):
        modules = build_fragments(SDConfig())
    seen = {}
    for name, module in modules.items():
        for local in module.state_dict():
            key = checkpoint_key(name, local)
            assert key not in seen, (key, seen.get(key), name)
            seen[key] = name
            assert fragment_of(key) == (name, local)
    assert len(seen) > 1000  # 4 fragments of the real model, not an empty loop


@pytest.mark.parametrize("suffix, file_dtype, wrap, dtype", [
    (".ckpt", torch.float32, True, torch.float32),
    (".ckpt", torch.float16, False, torch.float32),
    (".pt", torch.float16, True, torch.float16),
    (".pth", torch.float32, False, torch.float16),
    (".safetensors", torch.float32, True, torch.float32),
    (".safetensors", torch.float16, True, torch.float32),
    (".safetensors", torch.float32, True, torch.float16),
])
def test_round_trip(tmp_path, suffix, file_dtype, wrap, dtype):
    path = tmp_path / f"tiny{suffix}"
    written = write_tiny_checkpoint(path, dtype=file_dtype, wrap=wrap)
    assert_loaded(load_fragments(path, tiny_config(), dtype=dtype), written, dtype=dtype)


def test_legacy_non_zip_pickle(tmp_path):
    written = write_tiny_checkpoint(tmp_path / "new.safetensors")
    torch.save({"state_dict": written}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    assert_loaded(load_fragments(tmp_path / "old.ckpt", tiny_config(), dtype=torch.float16), written,
                  dtype=torch.float16)


def test_round_trip_without_extra_keys(tmp_path):
    written = write_tiny_checkpoint(tmp_path / "bare.ckpt", extra_keys=False, wrap=False)
    assert_loaded(load_fragments(tmp_path / "bare.ckpt", tiny_config()), written)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_ema_copy_loads_only_when_asked(tmp_path, suffix):
    path = tmp_path / f"full{suffix}"
    written = write_tiny_checkpoint(path, ema="full")
    assert_loaded(load_fragments(path, tiny_config()), written, ema=False)
    assert_loaded(load_fragments(path, tiny_config(), ema=True), written, ema=True)
    key = "input_blocks.0.0.weight"
    assert not torch.equal(written[UNET + key], written[ema_key(UNET + key)])  # the test can tell


def test_ema_requested_but_absent(tmp_path):
    write_tiny_checkpoint(tmp_path / "pruned.safetensors")
    with pytest.raises(CheckpointError, match="no EMA weights.*drop --ema"):
        load_fragments(tmp_path / "pruned.safetensors", tiny_config(), ema=True)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_clip_keys_without_text_model_segment(tmp_path, suffix):
    path = tmp_path / f"old_clip{suffix}"
    written = write_tiny_checkpoint(path, text_model_segment=False)
    assert any(k.startswith("cond_stage_model.transformer.embeddings.") for k in written)
    assert_loaded(load_fragments(path, tiny_config()), written)


def test_both_clip_layouts_at_once_is_an_error(tmp_path):
    written = write_tiny_checkpoint(tmp_path / "a.safetensors", extra_keys=False)
    key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    written[key.replace("text_model.", "")] = written[key].clone()
    save_file(written, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="two copies"):
        load_fragments(tmp_path / "b.safetensors", tiny_config())


def test_subset_skips_other_fragments(tmp_path):
    written = write_tiny_checkpoint(tmp_path / "t.safetensors", extra_keys=False)
    no_encoder = {k: v for k, v in written.items() if not k.startswith("first_stage_model.")}
    save_file(no_encoder, str(tmp_path / "no_vae.safetensors"))
    names = (TEXT_ENCODER, UNET_IN, UNET_OUT)
    assert_loaded(load_fragments(tmp_path / "no_vae.safetensors", tiny_config(), names=names), written,
                  names=names)
    with pytest.raises(CheckpointError, match=r"lacks \d+ key.*first_stage_model\.encoder\.conv_in\.weight"):
        load_fragments(tmp_path / "no_vae.safetensors", tiny_config())


def test_lightning_and_numpy_extras_are_allowed(tmp_path):
    path = tmp_path / "lightning.ckpt"
    write_tiny_checkpoint(path)
    with open(path, "rb") as f:
        raw = f.read()
    assert b"pytorch_lightning.callbacks.model_checkpoint" in raw and b"numpy" in raw
    assert len(checkpoint_shapes(path)) == len(write_tiny_checkpoint(tmp_path / "same.safetensors"))


class _RunsCode:
    """Unpickling this calls exec: a stand-in for `os.system` that only creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("inside", [False, True])
def test_code_executing_pickle_is_refused_and_not_run(tmp_path, inside):
    state = {UNET + "input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}
    marker = tmp_path / "pwned"
    if inside:
        state["payload"] = _RunsCode(marker)
        obj = state
    else:
        obj = {"state_dict": state, "hyper_parameters": _RunsCode(marker)}
    torch.save(obj, tmp_path / "evil.ckpt")
    refused = r"refuses to unpickle .*exec.*not a plain weights file.*convert it to \.safetensors"
    with pytest.raises(CheckpointError, match=refused):
        load_fragments(tmp_path / "evil.ckpt", tiny_config())
    assert not marker.exists()
    torch.load(tmp_path / "evil.ckpt", weights_only=False)  # the payload is real: unsafe loading runs it
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_corrupt_truncated_and_empty_files(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    write_tiny_checkpoint(good, extra_keys=False)
    data = good.read_bytes()
    for name, content in [("random", os.urandom(4096)), ("truncated", data[: len(data) // 2]), ("empty", b"")]:
        bad = tmp_path / f"{name}{suffix}"
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*truncated or corrupt") as info:
            load_fragments(bad, tiny_config())
        assert "\n" not in str(info.value)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.ckpt"):
        load_fragments(tmp_path / "nope.ckpt", tiny_config())
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint file"):
        load_fragments(tmp_path / "model.bin", tiny_config())


def _sd_v1_shapes(**changes) -> dict[str, tuple]:
    shapes = {UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
              UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
              "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)}
    shapes.update(changes)
    return shapes


@pytest.mark.parametrize("shapes, family", [
    (_sd_v1_shapes(), "sd-v1"),
    (_sd_v1_shapes(**{UNET + "input_blocks.0.0.weight": (320, 9, 3, 3)}), "sd-v1-inpainting"),
    (_sd_v1_shapes(**{UNET + "input_blocks.0.0.weight": (320, 8, 3, 3)}), "instruct-pix2pix"),
    (_sd_v1_shapes(**{UNET + "input_blocks.0.0.weight": (320, 5, 3, 3)}), "unknown"),
    (_sd_v1_shapes(**{UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}), "sd-2"),
    (_sd_v1_shapes(**{"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)}),
     "sd-2"),
    (_sd_v1_shapes(**{"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,)}), "sdxl"),
    (_sd_v1_shapes(**{UNET + "label_emb.0.0.weight": (1280, 2816)}), "sdxl"),
    ({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, "not-sd"),
    ({"unet.conv_in.weight": (320, 4, 3, 3)}, "not-sd"),
])
def test_detect_family(shapes, family):
    assert detect_family(shapes) == family


@pytest.mark.parametrize("extra, words", [
    ({UNET + "input_blocks.0.0.weight": (320, 9, 3, 3)},
     r"SD v1 inpainting checkpoint \(9-channel UNet\); use optimized_inpaint\.py"),
    ({UNET + "input_blocks.0.0.weight": (320, 8, 3, 3)}, "InstructPix2Pix"),
    ({UNET + "input_blocks.0.0.weight": (320, 6, 3, 3)}, "UNet takes 6 input channels"),
    ({"cond_stage_model.model.ln_final.weight": (1024,)}, r"Stable Diffusion 2\.x"),
    ({UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}, r"Stable Diffusion 2\.x"),
    ({"conditioner.embedders.0.model.ln_final.weight": (1280,)}, "SDXL"),
    ({UNET + "label_emb.0.0.weight": (1280, 2816)}, "SDXL"),
])
def test_wrong_family_is_named_before_loading(tmp_path, extra, words):
    state = {k: torch.zeros(shape) for k, shape in _sd_v1_shapes(**extra).items()}
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=words):
        load_fragments(tmp_path / "other.safetensors", tiny_config())


def test_not_stable_diffusion(tmp_path):
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        load_fragments(tmp_path / "vae.safetensors", tiny_config())


def test_inpainting_checkpoint_loads_with_an_inpainting_config(tmp_path):
    base = tiny_config()
    inpaint = SDConfig(unet=UNetConfig(**{**base.unet.__dict__, "in_channels": 9}), vae=base.vae, text=base.text)
    written = write_tiny_checkpoint(tmp_path / "inpaint.safetensors", inpaint)
    modules = load_fragments(tmp_path / "inpaint.safetensors", inpaint, names=(UNET_IN,))
    assert torch.equal(modules[UNET_IN].input_blocks[0][0].weight, written[UNET + "input_blocks.0.0.weight"])
    write_tiny_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="4-channel UNet.*config expects a 9-channel UNet"):
        load_fragments(tmp_path / "plain.safetensors", inpaint)


def test_unknown_keys_are_named_with_their_count(tmp_path):
    written = write_tiny_checkpoint(tmp_path / "a.safetensors", extra_keys=False)
    strays = [f"{UNET}adapter.{i}.weight" for i in range(6)] + ["cond_stage_model.extra.weight"]
    save_file({**written, **{k: torch.zeros(1) for k in strays}}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match=r"has 7 key\(s\) .*adapter\.0\.weight.*\(7 in all\)"):
        load_fragments(tmp_path / "b.safetensors", tiny_config())


def test_missing_key_is_named(tmp_path):
    written = write_tiny_checkpoint(tmp_path / "a.ckpt")
    key = UNET + "output_blocks.2.0.skip_connection.weight"
    assert key in written
    del written[key]
    torch.save({"state_dict": written}, tmp_path / "b.ckpt")
    with pytest.raises(CheckpointError, match=r"lacks 1 key\(s\).*output_blocks\.2\.0\.skip_connection\.weight"):
        load_fragments(tmp_path / "b.ckpt", tiny_config())


def test_shape_mismatch_names_key_shapes_and_config(tmp_path):
    base = tiny_config()
    wide = SDConfig(unet=UNetConfig(**{**base.unet.__dict__, "context_dim": 48}), vae=base.vae,
                    text=base.text.__class__(**{**base.text.__dict__, "hidden_size": 48}))
    write_tiny_checkpoint(tmp_path / "wide.safetensors", wide)
    with pytest.raises(CheckpointError) as info:
        load_fragments(tmp_path / "wide.safetensors", base, names=(TEXT_ENCODER, VAE))
    key = r"cond_stage_model\.transformer\.text_model\.\S+"
    assert re.search(key + r" has shape \((\d+), 48\) in the checkpoint but \(\1, 32\).*--config", str(info.value))


def _rss_file_bytes() -> int:
    """This process's resident file-mapped memory (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc accounting")
def test_converting_a_mapped_safetensors_file_releases_its_pages(tmp_path):
    """fp32 -> fp16 reads every fp32 page of the file; without releasing them they stay mapped and
    resident until the load ends (that is how a full-size fp32 -> fp16 load peaked at 3x the fp16
    weights). Here 32 tensors of 4 MiB: the file-mapped resident set grows by about the file's
    size without the release (the control) and by at most a tenth of it with it; the values are
    the file's either way."""
    from optimizedSD.model.checkpoint import _convert, _open

    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(1024, 1024, generator=g) for i in range(32)}
    path = tmp_path / "big.safetensors"
    save_file(state, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())  # clean pages, which the kernel may drop from its page cache at will
    size = 32 * 4 * 2 ** 20
    grown = {}
    for release in (False, True):
        with _open(path) as (shapes, read, mapped):
            assert mapped
            before = _rss_file_bytes()
            out = {k: _convert(read(k), torch.float16, mapped=release) for k in sorted(shapes)}
            grown[release] = _rss_file_bytes() - before
        assert all(torch.equal(out[k], state[k].half()) for k in state)
    assert grown[False] > 0.8 * size and grown[True] < 0.1 * size, grown
    # Released from this process, not from the page cache: the next load must not read the disk.
    assert _cached_fraction(path) > 0.9


def _cached_fraction(path: Path) -> float:
    """The fraction of `path`'s pages in the kernel's page cache (Linux `mincore` of a fresh mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        vec = ctypes.create_string_buffer(pages)
        assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw) / pages
