"""The adapters of arXiv 2303.18181 (Xiang-cd/unet-finetune): config, folders in that project's layout,
end to end against an independent reference (forward hooks on diffusers' UNet implementing the
paper's formulas), the planner, and every bad folder."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import assert_same_image, ddim_scheduler, diffusers_images, our_images

from optimizedSD.custom.adapters import AdapterError, adapter_modules, load_adapter_folder
from optimizedSD.model.checkpoint import load_fragments
from optimizedSD.model.config import AdapterConfig, AdapterSpec, ConfigError, SDConfig
from optimizedSD.engine.offload import fragment_bytes
from optimizedSD.engine.planner import MemoryPlan, predict

SEED = 17
UNET = "model.diffusion_model."
COMBOS = {  # config name -> (transformer spec, resblock spec); that project's attn2o-ffni, attn1i-attn2i, ...
    "attn2o-ffni": (AdapterSpec("attn2o", "ffni", 12), None),
    "attn1i-attn2i": (AdapterSpec("attn1i", "attn2i", 12, "silu", 0.7), None),
    "attn2c-attn2c": (AdapterSpec("attn2c", "attn2c", 12, "sig"), None),
    "resi-reso": (None, AdapterSpec("resi", "reso", 7)),
}


@pytest.fixture(scope="module")
def model(random_model):
    return random_model


# ---- that project's folder layout, written from the checkpoint's own key names ---------------------
def transformer_blocks(state) -> dict[str, tuple[int, int]]:
    """CompVis path of every BasicTransformerBlock -> (width, context width), from the checkpoint keys."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(re.escape(UNET) + r"(.*\.transformer_blocks\.\d+)\.attn2\.to_k\.weight", key)
        if m:
            out[m[1]] = (state[f"{UNET}{m[1]}.attn1.to_q.weight"].shape[1], value.shape[1])
    return out


def res_blocks(state) -> dict[str, tuple[int, int]]:
    """CompVis path of every ResBlock -> (in channels, out channels)."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(re.escape(UNET) + r"(.*)\.in_layers\.2\.weight", key)
        if m:
            out[m[1]] = (value.shape[1], value.shape[0])
    return out


def write_folder(folder, state, spec_t, spec_r, seed=0, duplicates=True):
    """What `save_adapter_to_dir` writes: `<block>.adapter_inout.pt` ({adp.0.weight, ...}) and its
    `adapter_inout.adp.pt` copy ({0.weight, ...}) per transformer block, `<resblock>.adapter.pt`
    ({0.weight ... 4.bias}: GroupNorm, conv, conv) per ResBlock. Random weights of visible effect."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def rand(*shape, gain=1.0):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return torch.randn(shape, generator=g) * gain * fan_in ** -0.5 if len(shape) > 1 else torch.randn(shape, generator=g) * 0.1

    if spec_t:
        for block, (dim, context) in transformer_blocks(state).items():
            d = context if spec_t.din == "attn2c" else dim
            sd = {"0.weight": rand(spec_t.mid_dim, d), "0.bias": rand(spec_t.mid_dim),
                  "2.weight": rand(d, spec_t.mid_dim, gain=0.5), "2.bias": rand(d)}
            torch.save({f"adp.{k}": v for k, v in sd.items()}, folder / f"{block}.adapter_inout.pt")
            if duplicates:
                torch.save(sd, folder / f"{block}.adapter_inout.adp.pt")
    if spec_r:
        for block, (c_in, c_out) in res_blocks(state).items():
            a = c_in if spec_r.din == "resi" else c_out
            b = c_in if spec_r.dout == "resi" else c_out
            torch.save({"0.weight": 1 + rand(a), "0.bias": rand(a), "2.weight": rand(spec_r.mid_dim, a, 3, 3),
                        "2.bias": rand(spec_r.mid_dim), "4.weight": rand(b, spec_r.mid_dim, 3, 3, gain=0.5),
                        "4.bias": rand(b)}, folder / f"{block}.adapter.pt")
    return folder


# ---- the reference: hooks on diffusers' UNet with the paper's formulas -------------------------------
ACT = {"relu": F.relu, "default": F.relu, "sig": torch.sigmoid, "silu": F.silu, "ident": lambda x: x}


def hook_reference(pipe, state, folder, spec_t, spec_r, scale):
    """Register the adapters of `folder` on diffusers' UNet. Blocks are found by value: the diffusers
    block whose attn1.to_q (ResnetBlock2D: conv1) weight is the checkpoint's for that CompVis path."""
    unet = pipe.unet
    if spec_t:
        blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
        for path in transformer_blocks(state):
            w = state[f"{UNET}{path}.attn1.to_q.weight"]
            block, = [b for b in blocks if torch.equal(b.attn1.to_q.weight, w)]
            p = torch.load(folder / f"{path}.adapter_inout.pt", weights_only=True)

            def adapter(h, p=p, act=ACT[spec_t.method]):  # Linear, activation, Linear
                return F.linear(act(F.linear(h, p["adp.0.weight"], p["adp.0.bias"])), p["adp.2.weight"], p["adp.2.bias"])
            _hook_transformer(block, spec_t, adapter, scale)
    if spec_r:
        resnets = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
        for path in res_blocks(state):
            w = state[f"{UNET}{path}.in_layers.2.weight"]
            block, = [b for b in resnets if torch.equal(b.conv1.weight, w)]
            p = torch.load(folder / f"{path}.adapter.pt", weights_only=True)

            def adapter(x, p=p, act=ACT[spec_r.method]):  # GroupNorm(32), SiLU, conv3x3, activation, conv3x3
                h = F.silu(F.group_norm(x.float(), 32, p["0.weight"], p["0.bias"], eps=1e-5).type(x.dtype))
                h = act(F.conv2d(h, p["2.weight"], p["2.bias"], padding=1))
                return F.conv2d(h, p["4.weight"], p["4.bias"], padding=1)
            assert spec_r.din == "resi" and spec_r.dout == "reso"  # the combination tested here
            # ResnetBlock2D returns shortcut(x) + h; reso adds scale * adapter(x) to it
            block.register_forward_hook(lambda mod, args, out, a=adapter: out + scale * a(args[0]))


def _hook_transformer(block, spec, adapter, scale):
    """BasicTransformerBlock: x -> x + attn1(norm1 x) -> + attn2(norm2 ., context) -> + ff(norm3 .)."""
    seen = {}
    if (spec.din, spec.dout) == ("attn2o", "ffni"):
        # ffni = attn2o + attn2i + s * A(attn2o): add s * A(o) to the cross-attention's output o
        block.attn2.register_forward_hook(lambda mod, args, out: out + scale * adapter(out))
    elif (spec.din, spec.dout) == ("attn1i", "attn2i"):
        # attn2i = attn1o + x + s * A(x), x the block's input
        block.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(x=args[0] if args else
                                        kwargs["hidden_states"]), with_kwargs=True)
        block.attn1.register_forward_hook(lambda mod, args, out: out + scale * adapter(seen["x"]))
    elif (spec.din, spec.dout) == ("attn2c", "attn2c"):
        # the cross-attention reads context + s * A(context)
        def context(mod, args, kwargs):
            c = kwargs["encoder_hidden_states"]
            return args, {**kwargs, "encoder_hidden_states": c + scale * adapter(c)}
        block.attn2.register_forward_pre_hook(context, with_kwargs=True)
    else:
        raise NotImplementedError(spec)



def _with_adapters(cfg, folder):
    def prepare(fragments):
        load_adapter_folder(fragments, cfg, folder, torch.float32)
    return prepare


@pytest.mark.parametrize("combo", list(COMBOS))
def test_adapters_equal_the_hooked_reference(model, tmp_path, combo):
    cfg, path, state, workdir = model
    spec_t, spec_r = COMBOS[combo]
    adapters = AdapterConfig(spec_t, spec_r)
    scale = (spec_t or spec_r).scale
    folder = write_folder(tmp_path / "999-adapters", state, spec_t, spec_r, duplicates=combo != "attn1i-attn2i")
    ours_model = (cfg.with_adapters(adapters), path, state, workdir)
    a = our_images(ours_model, [SEED], 64, 64, "ddim", mode="stream", prepare=_with_adapters(ours_model[0], folder))[0]
    b = diffusers_images(model, SEED, 64, 64, ddim_scheduler(),
                         prepare=lambda pipe: hook_reference(pipe, state, folder, spec_t, spec_r, scale))[0]
    plain = diffusers_images(model, SEED, 64, 64, ddim_scheduler())[0]
    assert np.abs(b - plain).mean() > 3  # the adapters change the image
    assert_same_image(a, b)


def test_adapter_scale_override_equals_the_reference_at_that_scale(model, tmp_path):
    cfg, path, state, workdir = model
    spec = COMBOS["attn2o-ffni"][0]
    folder = write_folder(tmp_path / "adapters", state, spec, None)
    adapters = AdapterConfig(spec).with_scale(0.4)
    ours_model = (cfg.with_adapters(adapters), path, state, workdir)
    a = our_images(ours_model, [SEED], 64, 64, "ddim", prepare=_with_adapters(ours_model[0], folder))[0]
    b = diffusers_images(model, SEED, 64, 64, ddim_scheduler(),
                         prepare=lambda pipe: hook_reference(pipe, state, folder, spec, None, 0.4))[0]
    assert_same_image(a, b)


def test_adapters_are_children_of_their_blocks_and_the_count_is_the_papers(model, tmp_path):
    """One adapter per transformer block (attn2o-ffni) and the folder's parameter count; each adapter sits
    in its block, so the offload unit of the block carries its bytes."""
    cfg, path, state, _ = model
    spec = COMBOS["attn2o-ffni"][0]
    folder = write_folder(tmp_path / "adapters", state, spec, None)
    fragments = load_fragments(path, cfg)
    before = fragment_bytes(fragments["unet_in"].input_blocks[1])
    count = load_adapter_folder(fragments, cfg.with_adapters(AdapterConfig(spec)), folder, torch.float32)
    files = [torch.load(p, weights_only=True) for p in folder.glob("*.adapter_inout.pt")]
    assert count == sum(v.numel() for f in files for v in f.values())
    assert len(adapter_modules(fragments)) == len(transformer_blocks(state)) == len(files)
    block = fragments["unet_in"].input_blocks[1]
    assert fragment_bytes(block) - before == 4 * sum(p.numel() for p in block[1].transformer_blocks[0].adapter_inout.parameters())


def test_planner_adds_the_adapter_bytes():
    """Full-size SD v1 in fp16, attn2o-ffni with the paper's mid_dim 60, 512x512: the planned sampling peak
    grows by the adapters of what is on the device (turbo: all of them; default: the larger half's)
    plus at most one hidden state of the widest level (the adapter's output, 64*64 tokens x 320, fp16);
    default mode moves exactly the adapter bytes more per step; text encoding and decoding are unchanged."""
    cfg = SDConfig()
    adapted = cfg.with_adapters(AdapterConfig(AdapterSpec("attn2o", "ffni", 60)))
    fp16 = torch.float16
    with torch.device("meta"):
        from optimizedSD.custom.adapters import with_adapters
        from optimizedSD.model.fragments import build_fragments

        halves = with_adapters(build_fragments(adapted, ("unet_in", "unet_out")), adapted)
    extra = {h: 2 * sum(p.numel() for a in adapter_modules({h: m}).values() for p in a.parameters())
             for h, m in halves.items()}
    # 16 transformer blocks (5 of width 320, 5 of 640, 6 of 1280), each Linear(d, 60) + Linear(60, d)
    assert sum(extra.values()) == 2 * sum(n * (2 * 60 * d + 60 + d) for n, d in ((5, 320), (5, 640), (6, 1280)))
    hidden = 64 * 64 * 320 * 2
    for mode, grows_by in (("turbo", extra["unet_in"] + extra["unet_out"]), ("default", extra["unet_out"])):
        base, base_moved = predict(cfg, fp16, MemoryPlan(mode), 512, 512, 1)
        more, more_moved = predict(adapted, fp16, MemoryPlan(mode), 512, 512, 1)
        assert more["text"] == base["text"] and more["decode"] == base["decode"]
        assert 0 <= more["sample"] - base["sample"] - grows_by <= hidden + 2 ** 16, (mode, more["sample"] - base["sample"])
        if mode == "default":
            assert more_moved - base_moved == extra["unet_in"] + extra["unet_out"]


# ---- config ---------------------------------------------------------------------------------------
PROJECT_YAML = """
model:
  target: ldm.models.diffusion.ddpm_dream.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    channels: 4
    scale_factor: 0.18215
    train_level: ["adapter"]
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel_inject.UNetModel_inject
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False
        adapter_config:
{adapters}
"""


def _yaml(tmp_path, adapters: str):
    path = tmp_path / "config.yaml"
    path.write_text(PROJECT_YAML.replace("{adapters}", adapters))
    return path


def test_that_projects_yaml_is_read(tmp_path):
    t = _yaml(tmp_path, """          transformer_adp_config:
            - type: inout
              din: attn2o
              dout: ffni
              mid_dim: 60
              method: "default"
              scale: 1.0""")
    assert SDConfig.from_yaml(t).unet.adapters == AdapterConfig(AdapterSpec("attn2o", "ffni", 60, "default", 1.0))
    r = _yaml(tmp_path, """          resblock_adp_config:
            type: inout
            din: resi
            dout: reso
            method: default
            mid_dim: 7
            scale: 1.0""")
    cfg = SDConfig.from_yaml(r)
    assert cfg.unet.adapters == AdapterConfig(None, AdapterSpec("resi", "reso", 7))
    assert SDConfig.from_yaml(t).unet.model_channels == 320
    # written back out and read again
    cfg.save_yaml(tmp_path / "again.yaml")
    assert SDConfig.from_yaml(tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize("entry, message", [
    ("{type: inout, din: attn3o, dout: ffni, mid_dim: 60}", "din 'attn3o' must be one of"),
    ("{type: inout, din: attn2o, dout: attn2o, mid_dim: 60}", "dout 'attn2o' must be one of"),
    ("{type: inout, din: ffno, dout: attn2i, mid_dim: 60}", "dout attn2i comes before din ffno"),
    ("{type: inout, din: attn2c, dout: ffni, mid_dim: 60}", "attn2c .* pairs only with itself"),
    ("{type: inout, din: attn2o, dout: ffni, mid_dim: 0}", "mid_dim must be a positive integer"),
    ("{type: inout, din: attn2o, dout: ffni, mid_dim: 60, method: tanh}", "method 'tanh' must be one of"),
    ("{type: lora, din: attn2o, dout: ffni, mid_dim: 60}", "inout is the only type"),
])
def test_bad_adapter_configs(tmp_path, entry, message):
    path = _yaml(tmp_path, f"          transformer_adp_config: [{entry}]")
    with pytest.raises(ConfigError, match=message):
        SDConfig.from_yaml(path)


def test_two_transformer_adapters_are_refused(tmp_path):
    path = _yaml(tmp_path, "          transformer_adp_config: [{din: attn2o, dout: ffni, mid_dim: 6}, "
                           "{din: ffni, dout: ffni, mid_dim: 6}]")
    with pytest.raises(ConfigError, match="lists 2 adapters.*one per block"):
        SDConfig.from_yaml(path)


# ---- bad folders ----------------------------------------------------------------------------------
@pytest.fixture()
def loaded(model):
    cfg, path, state, _ = model
    return load_fragments(path, cfg), cfg.with_adapters(AdapterConfig(AdapterSpec("attn2o", "ffni", 6))), state


def test_bad_adapter_folders(loaded, tmp_path):
    fragments, cfg, state = loaded
    spec = cfg.unet.adapters.transformer
    with pytest.raises(AdapterError, match="adapter folder not found"):
        load_adapter_folder(fragments, cfg, tmp_path / "nowhere", torch.float32)
    with pytest.raises(AdapterError, match="names no adapters.*--config"):
        load_adapter_folder(fragments, cfg.with_adapters(None), tmp_path, torch.float32)

    folder = write_folder(tmp_path / "missing", state, spec, None, duplicates=False)
    first = sorted(folder.glob("*.pt"))[0]
    first.unlink()
    with pytest.raises(AdapterError, match=f"lacks 1 adapter file.*{re.escape(first.name)}"):
        load_adapter_folder(fragments, cfg, folder, torch.float32)

    folder = write_folder(tmp_path / "resblock", state, None, AdapterSpec("resi", "reso", 6))
    with pytest.raises(AdapterError, match=r"no adapter of this config: input_blocks\.1\.0\.adapter\.pt"):
        load_adapter_folder(fragments, cfg, folder, torch.float32)

    folder = write_folder(tmp_path / "wide", state, AdapterSpec("attn2o", "ffni", 9), None)
    with pytest.raises(AdapterError, match=r"adp\.0\.weight has shape \(9, 32\), the config needs \(6, 32\)"):
        load_adapter_folder(fragments, cfg, folder, torch.float32)

    folder = write_folder(tmp_path / "keys", state, spec, None, duplicates=False)
    torch.save({"adp.0.weight": torch.zeros(6, 32)}, first_of(folder))
    with pytest.raises(AdapterError, match="missing keys: adp.0.bias"):
        load_adapter_folder(fragments, cfg, folder, torch.float32)

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))
    torch.save({"adp.0.weight": Evil()}, first_of(folder))
    with pytest.raises(AdapterError, match="refusing to unpickle"):
        load_adapter_folder(fragments, cfg, folder, torch.float32)
    assert adapter_modules(fragments) == {}  # nothing was attached by the failed loads


def first_of(folder):
    return sorted(folder.glob("*.pt"))[0]


def test_duplicate_copies_alone_are_enough(loaded, tmp_path):
    """A folder holding only the `adapter_inout.adp.pt` copies loads the same weights."""
    fragments, cfg, state = loaded
    folder = write_folder(tmp_path / "a", state, cfg.unet.adapters.transformer, None)
    for p in folder.glob("*.adapter_inout.pt"):
        p.unlink()
    load_adapter_folder(fragments, cfg, folder, torch.float32)
    name, module = next(iter(adapter_modules(fragments).items()))
    assert torch.equal(module.adp[0].weight, torch.load(folder / f"{name}.adp.pt", weights_only=True)["0.weight"])


def test_adapter_metadata_names_the_folder_and_the_adapters(tmp_path):
    from optimizedSD.custom.adapters import adapter_metadata

    adapters = AdapterConfig(AdapterSpec("attn2o", "ffni", 60), AdapterSpec("resi", "reso", 7, "silu", 0.5))
    assert adapter_metadata(tmp_path / "999-adapters", adapters) == {
        "Adapters": f"{tmp_path / '999-adapters'} (attn2o->ffni (mid 60, default, scale 1), "
                    "resi->reso (mid 7, silu, scale 0.5))"}
