"""LyCORIS kinds (LoHa, LoKr, CP LoCon, DoRA, (IA)^3, full and norm diffs) in the kohya layout: our patched
weights against the lycoris-lora package's own modules merged into diffusers' UNet / transformers' CLIP
(`lycoris_files.lycoris_merge`), an image against diffusers with those merged weights, undo bit for bit,
tags, folders, metadata and every refused file."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from lora_files import addnet_hash, kohya_state, lora_tensors
from lycoris_files import lycoris_merge, lycoris_state, write
from reference import (assert_same_image, checkpoint, ddim_scheduler, diffusers_images, diffusers_unet, our_images,
                       transformers_clip)

from optimizedSD.custom.lora import LoraError, apply_loras, extract_lora_tags, find_lora, read_lora
from optimizedSD.engine.customize import custom_metadata, request_loras, resolve_customizations
from optimizedSD.engine.request import Request, RequestError
from optimizedSD.model.checkpoint import load_fragments
from optimizedSD.model.config import tiny_config
from optimizedSD.model.fragments import FRAGMENTS

pytest.importorskip("lycoris")
SEED, WEIGHT = 31, 0.8
B0, B1 = "down_blocks.0.attentions.0.transformer_blocks.0", "up_blocks.0.attentions.0.transformer_blocks.0"
PLANS = {  # kind -> [(prefix, diffusers module, tensors of lycoris_files.module_tensors)]
    "LoHa": [("unet", f"{B0}.attn1.to_q", "loha"), ("unet", "down_blocks.0.resnets.0.conv1", "loha_cp"),
             ("unet", "down_blocks.0.resnets.1.conv1", "loha"), ("te", "text_model.encoder.layers.0.self_attn.q_proj", "loha")],
    "LoKr": [("unet", f"{B0}.attn1.to_k", "lokr"), ("unet", "down_blocks.0.resnets.0.conv2", "lokr_cp"),
             ("unet", "down_blocks.0.resnets.1.conv2", "lokr"), ("unet", f"{B0}.attn1.to_v", "lokr_w1ab"),
             ("te", "text_model.encoder.layers.0.mlp.fc1", "lokr")],
    "LoCon-CP": [("unet", "up_blocks.0.resnets.0.conv1", "locon_cp"), ("unet", "down_blocks.1.resnets.0.conv1", "locon_cp"),
                 ("unet", "down_blocks.0.downsamplers.0.conv", "locon_cp")],
    "DoRA": [("unet", "up_blocks.0.resnets.0.conv2", "dora_out"), ("unet", "up_blocks.0.resnets.1.conv1", "dora_in"),
             ("unet", f"{B1}.attn2.to_q", "dora_out"), ("unet", f"{B1}.attn2.to_k", "dora_in"),
             ("te", "text_model.encoder.layers.0.mlp.fc2", "dora_out")],
    "IA3": [("unet", f"{B1}.ff.net.2", "ia3_in"), ("unet", f"{B1}.attn2.to_v", "ia3_out"),
            ("unet", "up_blocks.0.resnets.2.conv1", "ia3_out")],
    "full": [("unet", "up_blocks.0.attentions.0.proj_in", "full"), ("unet", f"{B1}.attn1.to_q", "full"),
             ("te", "text_model.encoder.layers.1.self_attn.v_proj", "full")],
    "norm": [("unet", "up_blocks.0.resnets.1.norm1", "norm"), ("unet", f"{B1}.norm1", "norm"),
             ("unet", "conv_norm_out", "norm"), ("te", "text_model.final_layer_norm", "norm")],
}
MIXED = [entry for plan in PLANS.values() for entry in plan]


@pytest.fixture(scope="module")
def model(random_model):
    return random_model


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    """{kind: (path, state, plan)}: one file per kind, and "mixed": every kind plus plain LoRA modules."""
    cfg, _, state, _ = model
    unet, text = diffusers_unet(cfg, state), transformers_clip(cfg, state)
    d = tmp_path_factory.mktemp("lycoris")
    out = {}
    for i, (kind, plan) in enumerate({**PLANS, "mixed": MIXED}.items()):
        st = lycoris_state(unet, text, plan, seed=i)
        if kind == "mixed":  # and plain kohya LoRA modules on layers no other kind touches
            u, t, _, _ = lora_tensors(model, 9, ["proj_out"], ["out_proj"], rank=4, alpha=2)
            st.update(kohya_state(u, t, alpha=2))
            plan = plan + sorted({("unet", k.split(".lora_")[0], "locon") for k in u} | {
                ("te", "text_model." + k.split(".lora_")[0].removeprefix("text_model."), "locon") for k in t})
        out[kind] = (write(d / f"{kind}.safetensors", st), st, plan)
    return out


def _reference_model(model, state, plan, weight):
    """diffusers' UNet and CLIP with `state` merged by lycoris-lora's modules."""
    cfg, _, base, _ = model
    clone = {k: v.clone() for k, v in base.items()}  # merge_to writes in place
    unet, text = diffusers_unet(cfg, clone), transformers_clip(cfg, clone)
    lycoris_merge(unet, text, plan, state, weight)
    return unet, text


@pytest.mark.parametrize("kind", [*PLANS, "mixed"])
def test_patched_weights_equal_lycoris_merge(model, files, kind):
    """Weight by weight at 0.8: ours (converted by diffusers' converter) = lycoris' merge, to fp32 rounding;
    every layer of the plan changed, no other did."""
    cfg, path, state, _ = model
    file, st, plan = files[kind]
    fragments = load_fragments(path, cfg)
    apply_loras(fragments, [(read_lora(file, cfg), WEIGHT)])
    patched = checkpoint(fragments)
    ours = (diffusers_unet(cfg, patched).state_dict(), transformers_clip(cfg, patched).state_dict())
    theirs = [m.state_dict() for m in _reference_model(model, st, plan, WEIGHT)]
    plain = (diffusers_unet(cfg, state).state_dict(), transformers_clip(cfg, state).state_dict())
    changed = set()
    for o, t, p, prefix in zip(ours, theirs, plain, ("unet", "te")):
        for key in o:
            torch.testing.assert_close(o[key], t[key], rtol=1e-5, atol=1e-6, msg=key)
            if not torch.equal(o[key], p[key]):
                changed.add((prefix, key.rsplit(".", 1)[0]))
    planned = {(prefix, name.removeprefix("text_model.") if prefix == "te" else name) for prefix, name, _ in plan}
    assert changed == planned


@pytest.fixture(scope="module")
def plain_image(model):
    return our_images(model, [SEED], 64, 64, "ddim", steps=5)[0]


@pytest.mark.parametrize("kind", [*PLANS, "mixed"])
def test_image_equals_diffusers_with_lycoris_merged_weights(model, files, plain_image, kind):
    """One image at 0.8 through our pipeline vs diffusers' pipeline whose UNet and text encoder lycoris merged."""
    cfg = model[0]
    file, st, plan = files[kind]

    def prepare_ours(fragments):
        apply_loras(fragments, [(read_lora(file, cfg), WEIGHT)])

    def prepare_theirs(pipe):
        lycoris_merge(pipe.unet, pipe.text_encoder, plan, st, WEIGHT)

    clone = (model[0], model[1], {k: v.clone() for k, v in model[2].items()}, model[3])
    a = our_images(model, [SEED], 64, 64, "ddim", steps=5, prepare=prepare_ours)[0]
    b = diffusers_images(clone, SEED, 64, 64, ddim_scheduler(), steps=5, prepare=prepare_theirs)[0]
    assert np.abs(b - plain_image).mean() > 1  # the file changes the image; the comparison means something
    assert_same_image(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_undo_restores_bit_for_bit(model, files, dtype):
    """Two files at once (mixed at 0.7, LoHa at -0.4), then undo: every parameter as a fresh load's."""
    cfg, path, _, _ = model
    fresh = load_fragments(path, cfg, dtype=dtype)
    fragments = load_fragments(path, cfg, dtype=dtype)
    patch = apply_loras(fragments, [(read_lora(files["mixed"][0], cfg), 0.7), (read_lora(files["LoHa"][0], cfg), -0.4)])
    assert len(patch) > 30  # weights and biases
    patch.undo()
    for name in FRAGMENTS:
        for (k, a), b in zip(fragments[name].state_dict().items(), fresh[name].state_dict().values()):
            assert torch.equal(a, b), k


def test_two_files_with_weights_add_up(model, files):
    """LoHa at 0.7 and LoKr at -0.4 together = lycoris merging one then the other (they touch different
    layers but the changes must not interfere)."""
    cfg, path, _, _ = model
    fragments = load_fragments(path, cfg)
    apply_loras(fragments, [(read_lora(files["LoHa"][0], cfg), 0.7), (read_lora(files["LoKr"][0], cfg), -0.4)])
    patched = checkpoint(fragments)
    clone = {k: v.clone() for k, v in model[2].items()}
    unet, text = diffusers_unet(cfg, clone), transformers_clip(cfg, clone)
    for kind, w in (("LoHa", 0.7), ("LoKr", -0.4)):
        lycoris_merge(unet, text, files[kind][2], files[kind][1], w)
    for ours, theirs in ((diffusers_unet(cfg, patched), unet), (transformers_clip(cfg, patched), text)):
        for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


# ---- tags, folders, metadata -----------------------------------------------------------------------
def test_lyco_tag_lycoris_folder_and_hashes(model, files, tmp_path):
    """`<lyco:NAME:W>` is `<lora:NAME:W>`; a `LyCORIS` folder beside --lora_dir is searched (as the webui's
    models/LyCORIS); `Lora hashes` is the webui's: name and kohya's addnet hash (SHA-256 after the header)."""
    cfg = model[0]
    assert extract_lora_tags("a fox <lyco:grain:0.6>, <lora:x>") == ("a fox , ", [("grain", 0.6), ("x", 1.0)])
    (tmp_path / "models" / "Lora").mkdir(parents=True)
    (tmp_path / "models" / "LyCORIS").mkdir()
    data = files["LoHa"][0].read_bytes()
    (tmp_path / "models" / "LyCORIS" / "my_loha.safetensors").write_bytes(data)
    _, custom = resolve_customizations(cfg, lora_dirs=[tmp_path / "models" / "Lora"])
    assert custom.lora_dirs == (tmp_path / "models" / "Lora", tmp_path / "models" / "LyCORIS")
    assert find_lora("my_loha", custom.lora_dirs) == tmp_path / "models" / "LyCORIS" / "my_loha.safetensors"
    r = Request(prompt="a fox <lyco:my_loha:0.8>")
    [(lora, w)] = request_loras(r, cfg, custom.lora_dirs)
    assert w == 0.8 and lora.name == "my_loha"
    assert custom_metadata(custom, cfg, r)["Lora hashes"] == f"my_loha: {addnet_hash(files['LoHa'][0])}"


def test_lyco_tag_through_the_cli_equals_diffusers_with_lycoris_merged_weights(model, files, tmp_path):
    """The mixed file, found by `<lyco:mix:0.8>` in the LyCORIS folder beside --lora_dir, through the CLI:
    its PNG is diffusers' image with lycoris' merge, and its metadata names the file and hash as the webui."""
    from reference import NEGATIVE, PROMPT, write_yaml_config

    from optimizedSD.fronts.cli import main
    from optimizedSD.outputs.infotext import read_parameters

    cfg, path = model[0], model[1]
    file, st, plan = files["mixed"]
    (tmp_path / "Lora").mkdir()
    (tmp_path / "LyCORIS").mkdir()
    (tmp_path / "LyCORIS" / "mix.safetensors").write_bytes(file.read_bytes())
    out = tmp_path / "out"
    assert main(["--ckpt", str(path), "--config", str(write_yaml_config(cfg, tmp_path / "tiny.yaml")), "--device", "cpu",
                 "--H", "64", "--W", "64", "--ddim_steps", "5", "--sampler", "ddim", "--seed", str(SEED), "--n_samples", "1",
                 "--n_iter", "1", "--scale", "7.5", "--prompt", f"{PROMPT} <lyco:mix:0.8>", "--negative_prompt", NEGATIVE,
                 "--lora_dir", str(tmp_path / "Lora"), "--outdir", str(out), "--skip_grid"]) == 0
    (png,) = out.rglob("*.png")
    clone = (model[0], model[1], {k: v.clone() for k, v in model[2].items()}, model[3])
    want = diffusers_images(clone, SEED, 64, 64, ddim_scheduler(), steps=5,
                            prepare=lambda pipe: lycoris_merge(pipe.unet, pipe.text_encoder, plan, st, WEIGHT))[0]
    with Image.open(png) as im:
        assert_same_image(np.asarray(im.convert("RGB")).astype(np.int16), want)
        text = read_parameters(im)
    assert text.startswith(f"{PROMPT} <lyco:mix:0.8>")
    assert f'Lora hashes: "mix: {addnet_hash(file)}"' in text


# ---- refused files ---------------------------------------------------------------------------------
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # (32, 32), no bias
C = "lora_unet_down_blocks_0_resnets_0_conv1"  # (32, 32, 3, 3)


def _loha(w1b=(4, 32)):
    return {f"{Q}.hada_w1_a": torch.zeros(32, 4), f"{Q}.hada_w1_b": torch.zeros(w1b), f"{Q}.hada_w2_a": torch.zeros(32, 4),
            f"{Q}.hada_w2_b": torch.zeros(4, 32), f"{Q}.alpha": torch.tensor(2.0)}


@pytest.mark.parametrize("state, message", [
    ({f"{Q}.oft_blocks": torch.zeros(4, 8, 8), f"{Q}.alpha": torch.tensor(1.0)}, rf"{Q}.oft_blocks is a OFT/BOFT layer"),
    ({f"{Q}.oft_diag": torch.zeros(4, 8, 8)}, "is a OFT layer"),
    ({f"{Q}.a1.weight": torch.zeros(4, 32), f"{Q}.a2.weight": torch.zeros(32, 4)}, r"a1.weight is a GLoRA layer"),
    (_loha((4, 31)), rf"{Q} \(LoHa: hada_w1_a \(32, 4\), hada_w1_b \(4, 31\).*does not fit"),
    ({k: v for k, v in _loha().items() if "w2_a" not in k}, rf"{Q} is a LoHa layer without hada_w2_a"),
    ({**_loha(), f"{Q}.lora_up.weight": torch.zeros(32, 4)}, "holds the tensors of LoCon and LoHa"),
    ({f"{Q}.lokr_w1": torch.zeros(4, 4)}, "LoKr layer without lokr_w2 or lokr_w2_a/b"),
    ({f"{Q}.lokr_w1": torch.zeros(4, 4), f"{Q}.lokr_w2": torch.zeros(8, 4)}, rf"{Q} \(LoKr\) makes the product \(32, 16\), which does not fit the layer's \(32, 32\)"),
    ({f"{Q}.diff": torch.zeros(32, 32), f"{Q}.diff_b": torch.zeros(32)}, "changes the bias of .*to_q, which has none"),
    ({f"{Q}.weight": torch.zeros(31), f"{Q}.on_input": torch.tensor(0)}, rf"{Q} \(\(IA\)\^3.*does not fit"),
    ({f"{C}.lora_up.weight": torch.zeros(32, 4, 1, 1), f"{C}.lora_down.weight": torch.zeros(4, 32, 1, 1),
      f"{C}.lora_mid.weight": torch.zeros(4, 4, 3, 3), f"{C}.dora_scale": torch.zeros(1, 7, 1, 1)},
     "dora_scale of \\(1, 7, 1, 1\\), which fits neither"),
    ({"lora_unet_up_blocks_0_resnets_0_norm1.w_norm": torch.zeros(33)}, r"norm1 \(norm diff\) makes the product \(33,\), which does not fit the layer's \(128,\)"),
])
def test_bad_lycoris_files_get_one_line_naming_the_key(tmp_path, state, message):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(LoraError, match=message) as e:
        read_lora(path, tiny_config())
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_lycoris_file_is_refused_before_anything_runs(model, files, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(files["LoKr"][0].read_bytes()[:-64])
    with pytest.raises(LoraError, match="truncated or corrupt"):
        read_lora(cut, model[0])
    with pytest.raises(RequestError, match="truncated or corrupt"):
        request_loras(Request(prompt="x", loras=((str(cut), 1.0),)), model[0], ())
