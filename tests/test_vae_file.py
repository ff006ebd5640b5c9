"""A separate VAE (--vae): the three layouts load the same weights, end to end against diffusers with
that VAE, and bad files are refused naming the file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import (assert_same_image, checkpoint, ddim_scheduler, diffusers_images, diffusers_vae, our_images,
                       tiny_fragments)

from optimizedSD.model.checkpoint import CheckpointError
from optimizedSD.model.config import VAEConfig, tiny_config
from optimizedSD.model.fragments import VAE
from optimizedSD.custom.vae_file import load_vae

SEED = 11


@pytest.fixture(scope="module")
def model(random_model):
    return random_model


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another tiny model's weights, whose VAE is the separate one, written in the three layouts."""
    from safetensors.torch import save_file

    cfg = tiny_config()
    state = checkpoint(tiny_fragments(cfg, seed=7))
    d = tmp_path_factory.mktemp("vae")
    full = d / "full-model.safetensors"
    save_file(state, str(full))  # a whole checkpoint: only its first_stage_model.* keys are read
    compvis = d / "vae-ft-mse.ckpt"  # VAE-only, Lightning-wrapped, with the training losses' weights
    vae_only = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    torch.save({"state_dict": {**vae_only, "loss.logvar": torch.zeros(()),
                               "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4)}}, compvis)
    diffusers = d / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_vae(cfg, state).state_dict().items()}, str(diffusers))
    return state, {"full": full, "compvis": compvis, "diffusers": diffusers}


def test_three_layouts_load_the_same_weights(other):
    state, files = other
    expected = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    for layout, path in files.items():
        loaded = load_vae(path, tiny_config()).state_dict()
        assert set(loaded) == set(expected), layout
        for k, v in expected.items():
            assert torch.equal(loaded[k], v), (layout, k)


def test_separate_vae_equals_diffusers_with_that_vae(model, other):
    state, files = other
    cfg = model[0]

    def ours(fragments):
        fragments[VAE] = load_vae(files["diffusers"], cfg)

    def theirs(pipe):
        pipe.vae = diffusers_vae(cfg, state)

    a = our_images(model, [SEED], 64, 64, "ddim", prepare=ours)[0]
    b = diffusers_images(model, SEED, 64, 64, ddim_scheduler(), prepare=theirs)[0]
    plain = our_images(model, [SEED], 64, 64, "ddim")[0]
    assert np.abs(a - plain).mean() > 3  # another VAE, another image
    assert_same_image(a, b)


def test_fp16_load(other):
    vae = load_vae(other[1]["compvis"], tiny_config(), torch.float16)
    assert {p.dtype for p in vae.parameters()} == {torch.float16}


def test_bad_vae_files(tmp_path, other):
    from dataclasses import replace

    from safetensors.torch import save_file

    state, files = other
    vae = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    cases = {
        "lora.safetensors": ({"lora_unet_x.lora_down.weight": torch.zeros(1)}, "holds no VAE weights"),
        "missing.safetensors": ({k: v for k, v in vae.items() if "decoder.up.0" not in k}, "missing keys decoder.up.0"),
        "extra.safetensors": ({**vae, "encoder.extra.weight": torch.zeros(1)}, "unknown keys encoder.extra.weight"),
    }
    for name, (tensors, message) in cases.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name))
        with pytest.raises(CheckpointError, match=message) as e:
            load_vae(tmp_path / name, tiny_config())
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)
    # a VAE of 16 latent channels (SD3, Flux) has other shapes
    wide = tiny_config()
    wide = replace(wide, vae=replace(wide.vae, z_channels=16, embed_dim=16))
    sixteen = checkpoint(tiny_fragments(wide))
    save_file({k: v for k, v in sixteen.items() if k.startswith("first_stage_model.")}, str(tmp_path / "sd3.safetensors"))
    with pytest.raises(CheckpointError, match="16 latent channels .SD v1: 4.*another model"):
        load_vae(tmp_path / "sd3.safetensors", tiny_config())
    with pytest.raises(CheckpointError, match="VAE not found"):
        load_vae(tmp_path / "nowhere.safetensors", tiny_config())
    assert VAEConfig().z_channels == 4


def test_vae_metadata_is_the_webui_name_and_short_hash(other):
    import hashlib

    from optimizedSD.custom.vae_file import vae_metadata

    path = other[1]["compvis"]
    assert vae_metadata(path) == {"VAE": "vae-ft-mse.ckpt", "VAE hash": hashlib.sha256(path.read_bytes()).hexdigest()[:10]}
