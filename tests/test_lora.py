"""LoRA: the name table, kohya and PEFT files end to end against diffusers' `load_lora_weights`
(`set_adapters` for weights), exact undo, the planner, and every bad file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lora_files import (LOCON_TARGETS, TEXT_TARGETS, UNET_TARGETS, addnet_hash, allow_installed_peft, kohya_state, lora_tensors,
                        write_kohya, write_peft)
from reference import (assert_same_image, checkpoint, ddim_scheduler, diffusers_images, diffusers_unet, ldm_config,
                       our_images, pipeline_images, sd_pipeline, transformers_clip)

from optimizedSD.model.checkpoint import load_fragments
from optimizedSD.model.config import SDConfig, tiny_config
from optimizedSD.model.fragments import FRAGMENTS, TEXT_ENCODER, build_fragments, checkpoint_key
from optimizedSD.custom.lora import (LoraError, apply_loras, extract_lora_tags, find_lora, lora_metadata, lora_tag,
                              lora_targets, parse_lora_arg, read_lora)
from optimizedSD.engine.offload import Offloader
from optimizedSD.engine.pipeline import Pipeline

SEED = 31



@pytest.fixture(scope="module")
def model(random_model):
    return random_model


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    """kohya: LoCon on the UNet + text encoder, rank 4, alpha 2; PEFT: attention + text, rank 4, alpha 8
    (from diffusers' metadata); unet_only: PEFT, rank 2, no text encoder."""
    d = tmp_path_factory.mktemp("loras")
    unet, text, _, _ = lora_tensors(model, 1, LOCON_TARGETS, TEXT_TARGETS, rank=4, alpha=2)
    kohya = write_kohya(d / "kohya_locon.safetensors", kohya_state(unet, text, alpha=2))
    unet, text, uc, tc = lora_tensors(model, 2, UNET_TARGETS, TEXT_TARGETS, rank=4, alpha=8)
    peft = write_peft(d / "peft", unet, text, uc, tc)
    unet, _, uc, _ = lora_tensors(model, 3, ["to_q", "to_v", "proj_out"], [], rank=2, alpha=2)
    unet_only = write_peft(d / "unet_only", unet, {}, uc, None)
    return {"kohya": kohya, "peft": peft, "unet_only": unet_only}


def _ours(model, loras, mode="default"):
    """Our image with `loras` [(path, weight)] patched into the host masters."""
    cfg = model[0]

    def prepare(fragments):
        apply_loras(fragments, [(read_lora(p, cfg), w) for p, w in loras])
    return our_images(model, [SEED], 64, 64, "ddim", prepare=prepare, mode=mode)[0]


def _reference(model, loras, monkeypatch):
    """diffusers' image with `loras` [(path, weight)] loaded by `load_lora_weights`, weighted by `set_adapters`."""
    allow_installed_peft(monkeypatch)

    def prepare(pipe):
        for i, (path, _) in enumerate(loras):
            pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
        pipe.set_adapters([f"lora{i}" for i in range(len(loras))], adapter_weights=[w for _, w in loras])
    return diffusers_images(model, SEED, 64, 64, ddim_scheduler(), prepare=prepare)[0]


@pytest.fixture(scope="module")
def plain(model):
    return our_images(model, [SEED], 64, 64, "ddim")[0]


@pytest.mark.parametrize("name, weight", [("kohya", 0.8), ("peft", 1.0), ("unet_only", 1.5)])
def test_lora_equals_diffusers(model, files, plain, monkeypatch, name, weight):
    a = _ours(model, [(files[name], weight)])
    b = _reference(model, [(files[name], weight)], monkeypatch)
    assert np.abs(b - plain).mean() > 3  # the LoRA changes the image; the comparison means something
    assert_same_image(a, b)


def test_two_loras_with_weights_equal_diffusers_set_adapters(model, files, plain, monkeypatch):
    loras = [(files["kohya"], 0.7), (files["peft"], -0.4)]
    a = _ours(model, loras, mode="stream")
    b = _reference(model, loras, monkeypatch)
    assert np.abs(b - _reference(model, loras[:1], monkeypatch)).mean() > 3  # the second one counts
    assert_same_image(a, b)


def test_patched_weights_equal_diffusers_fused_weights(model, files, monkeypatch):
    """Weight by weight: our patched checkpoint, converted by diffusers' own converter, equals diffusers'
    UNet and text encoder after `fuse_lora` (fp32 sums in another order: 1e-5)."""
    allow_installed_peft(monkeypatch)
    cfg, path, state, workdir = model
    fragments = load_fragments(path, cfg)
    apply_loras(fragments, [(read_lora(files["kohya"], cfg), 0.8)])
    patched = checkpoint(fragments)
    pipe = sd_pipeline(cfg, {k: v.clone() for k, v in state.items()}, ddim_scheduler(), workdir)  # fuse_lora writes in place
    pipe.load_lora_weights(str(files["kohya"]), adapter_name="k")
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    plain = {**diffusers_unet(cfg, state).state_dict(), **transformers_clip(cfg, state).state_dict()}
    changed = 0
    for theirs, ours in ((pipe.unet.state_dict(), diffusers_unet(cfg, patched).state_dict()),
                         (pipe.text_encoder.state_dict(), transformers_clip(cfg, patched).state_dict())):
        assert set(theirs) == set(ours)
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5, msg=key)
            changed += not torch.equal(ours[key], plain[key])
    assert changed > 100  # most weights did change


def test_undo_restores_a_fresh_load_bit_for_bit(model, files):
    """A render after undo equals a render of a fresh load exactly, in a mode that copies every
    block from its host master; so do the weights."""
    cfg, path, _, _ = model
    fresh = load_fragments(path, cfg)
    fragments = load_fragments(path, cfg)
    pipe = Pipeline(cfg, Offloader(fragments, torch.device("cpu"), mode="stream", copy_on_host=True))
    before = pipeline_images(pipe, [SEED], 64, 64, "ddim", steps=4)
    patch = apply_loras(fragments, [(read_lora(files["kohya"], cfg), 0.8), (read_lora(files["peft"], cfg), 0.5)])
    assert len(patch) > 100
    with_lora = pipeline_images(pipe, [SEED], 64, 64, "ddim", steps=4)
    patch.undo()
    after = pipeline_images(pipe, [SEED], 64, 64, "ddim", steps=4)
    assert np.abs(with_lora - before).mean() > 3  # the Offloader copied the patched masters
    assert np.array_equal(after, before)
    for name in FRAGMENTS:
        for (k, a), b in zip(fragments[name].state_dict().items(), fresh[name].state_dict().values()):
            assert torch.equal(a, b), k


def test_fp16_patch_rounds_once(model, files):
    """In fp16 the patched weight is the exact sum rounded once: it equals the float64 sum cast to fp16
    but for rare ties (fp32 accumulation), where rounding W + delta in two fp16 steps misses often."""
    from optimizedSD.model.fragments import fragment_of

    cfg, path, _, _ = model
    lora = read_lora(files["peft"], cfg)
    fragments = load_fragments(path, cfg, dtype=torch.float16)
    weights = {layer.target: fragments[fragment_of(layer.target + ".weight")[0]].get_parameter(
        fragment_of(layer.target + ".weight")[1]) for layer in lora.layers}
    exact, twice = {}, {}
    for layer in lora.layers:
        w = weights[layer.target]
        delta = (layer.up.double().flatten(1) @ layer.down.double().flatten(1) * layer.scale * 0.5).reshape(w.shape)
        exact[layer.target] = (w.double() + delta).half()
        twice[layer.target] = w + delta.half()  # the fp16 sum of an fp16 delta: two roundings
    apply_loras(fragments, [(lora, 0.5)])
    n = sum(w.numel() for w in weights.values())
    missed = sum((w != exact[t]).sum().item() for t, w in weights.items())
    missed_twice = sum((twice[t] != exact[t]).sum().item() for t in weights)
    assert all(w.dtype == torch.float16 for w in weights.values())
    assert missed / n < 0.002 < 0.02 < missed_twice / n, (missed / n, missed_twice / n)


def test_table_covers_every_lora_layer_of_both_models():
    """Every Linear and Conv2d of diffusers' UNet and transformers' CLIP text model has one entry, onto a
    distinct Linear/Conv2d of ours of the same shape, and every one of ours is reached; for the tiny
    model (attention at every level) and full SD v1 (none at the lowest), built shape-only."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    from transformers import CLIPTextConfig, CLIPTextModel
    from dataclasses import asdict

    for cfg in (tiny_config(), SDConfig()):
        with torch.device("meta"):
            ours = build_fragments(cfg, ("unet_in", "unet_out", TEXT_ENCODER))
            theirs = {"unet": UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(ldm_config(cfg), {})),
                      "text_encoder": CLIPTextModel(CLIPTextConfig(**asdict(cfg.text)))}
        layers = (torch.nn.Linear, torch.nn.Conv2d)
        our_layers = {checkpoint_key(f, n): m for f, frag in ours.items() for n, m in frag.named_modules()
                      if isinstance(m, layers)}
        their_layers = {}
        for prefix, module in theirs.items():
            for n, m in module.named_modules():
                if isinstance(m, layers):
                    n = n if prefix == "unet" or n.startswith("text_model.") else "text_model." + n
                    their_layers[f"{prefix}.{n}"] = m
        table = lora_targets(cfg)
        assert set(table) == set(their_layers)
        assert sorted(table.values()) == sorted(our_layers)  # each of ours exactly once
        for d, o in table.items():
            assert their_layers[d].weight.shape == our_layers[o].weight.shape, (d, o)


def test_table_maps_names_onto_the_same_weights(model):
    """By value: diffusers' converter puts each checkpoint weight at the diffusers name our table maps onto it."""
    cfg, _, state, _ = model
    theirs = {f"unet.{k}": v for k, v in diffusers_unet(cfg, state).state_dict().items()}
    theirs.update({f"text_encoder.{'' if k.startswith('text_model.') else 'text_model.'}{k}": v
                   for k, v in transformers_clip(cfg, state).state_dict().items()})
    for d, o in lora_targets(cfg).items():
        assert torch.equal(theirs[d + ".weight"], state[o + ".weight"]), (d, o)


# ---- prompts, arguments, metadata -----------------------------------------------------------------
def test_lora_tags_are_taken_out_of_the_prompt():
    assert extract_lora_tags("a fox <lora:film_grain:0.6>, snow <lora:Detail>") == (
        "a fox , snow ", [("film_grain", 0.6), ("Detail", 1.0)])
    assert extract_lora_tags("a fox: 10:30") == ("a fox: 10:30", [])
    for bad in ("<lora::1>", "<lora:x:heavy>", "<lora:x:1:2>"):
        with pytest.raises(LoraError, match="lora:"):
            extract_lora_tags(f"a fox {bad}")


def test_lora_argument_weight():
    assert parse_lora_arg("a/b.safetensors:0.5") == (__import__("pathlib").Path("a/b.safetensors"), 0.5)
    assert parse_lora_arg("a/b.safetensors") == (__import__("pathlib").Path("a/b.safetensors"), 1.0)
    assert parse_lora_arg("C:/x/b.pt:-1e-1")[1] == -0.1


def test_find_lora_looks_in_order_and_says_where(tmp_path):
    first, second = tmp_path / "models/Lora", tmp_path / "weights/lora"
    (second / "styles").mkdir(parents=True)
    first.mkdir(parents=True)
    (second / "styles" / "grain.safetensors").write_bytes(b"x")
    (second / "grain.pt").write_bytes(b"x")
    assert find_lora("grain", [first, second]) == second / "grain.pt"
    (first / "grain.safetensors").write_bytes(b"x")
    assert find_lora("grain", [first, second]) == first / "grain.safetensors"
    with pytest.raises(LoraError, match=rf"'nope' not found.*{first}, {second}"):
        find_lora("nope", [first, second])


def test_lora_hashes_are_the_webui_short_hashes(files, model):
    """kohya's "addnet" hash of a .safetensors LoRA: SHA-256 of the bytes after its header, 12 digits."""
    lora = read_lora(files["kohya"], model[0])
    assert lora_metadata([(lora, 0.8)]) == {"Lora hashes": f"kohya_locon: {addnet_hash(files['kohya'])}"}
    assert lora_metadata([]) == {} and lora_tag(lora, 0.8) == "<lora:kohya_locon:0.8>"


# ---- bad files -------------------------------------------------------------------------------------
def _write(path, state, metadata=None):
    from safetensors.torch import save_file

    save_file(state, str(path), metadata=metadata)
    return path


def _pair(down_shape, up_shape):
    return torch.zeros(down_shape), torch.zeros(up_shape)


@pytest.mark.parametrize("state, message", [
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768)}, "SDXL LoRA"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 1024),
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(32, 4)},
     "SD 2.x LoRA: it reads 1024-wide"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 320),
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4)},
     r"changes a \(320, 320\) weight.*\(32, 32\); the LoRA was made for another model"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
      "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
     "1 key.*match no layer.*lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(4, 32)}, "LoHa layer without hada_w1_b"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32)},
     "lacks its lora_down or lora_up"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32, 1, 1),
      "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4, 1, 1),
      "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": torch.zeros(32)}, "DoRA"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4)}, "full model checkpoint.*--ckpt"),
    ({"emb_params": torch.zeros(2, 768)}, "not a LoRA in kohya/webui or diffusers/PEFT layout"),
])
def test_bad_lora_files_are_refused_naming_the_file(tmp_path, state, message):
    path = _write(tmp_path / "bad.safetensors", state)
    with pytest.raises(LoraError, match=message) as e:
        read_lora(path, tiny_config())
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_unreadable_lora_files(tmp_path, files):
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(files["kohya"].read_bytes()[:-100])
    with pytest.raises(LoraError, match="truncated or corrupt"):
        read_lora(truncated, tiny_config())

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))
    evil = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1), "x": Evil()}, evil)
    with pytest.raises(LoraError, match="refusing to unpickle"):
        read_lora(evil, tiny_config())
    with pytest.raises(LoraError, match="LoRA not found"):
        read_lora(tmp_path / "missing.safetensors", tiny_config())


def test_peft_scale_follows_diffusers_metadata(model, files):
    """alpha 8 / rank 4 from `lora_adapter_metadata`; without metadata the scale is 1 (diffusers' rule)."""
    from safetensors import safe_open

    with safe_open(str(files["peft"]), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 8 and meta["unet.r"] == 4
    assert {layer.scale for layer in read_lora(files["peft"], model[0]).layers} == {2.0}
    assert {layer.scale for layer in read_lora(files["kohya"], model[0]).layers} == {0.5}
