"""Test helper: LoRA files in the layouts they are shared in, made from diffusers/PEFT models of a tiny
checkpoint with random LoRA weights, and the reference that loads them (diffusers' `load_lora_weights`).

PEFT layout: peft's own `get_peft_model_state_dict` of a diffusers UNet and a transformers CLIP text
model with LoRA layers injected, saved by diffusers' `save_lora_weights` (with its adapter metadata,
so lora_alpha != r is exercised). kohya layout: the same tensors renamed here by kohya-ss' naming rule
(`lora_unet_` / `lora_te_` + the module path with `.` as `_`, `lora_down`/`lora_up`, an `alpha` per
module), written independently of the code under test.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from reference import diffusers_unet, transformers_clip

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
# LoCon: every Conv2d and the ResBlocks' time projection as well
LOCON_TARGETS = UNET_TARGETS + ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv",
                                "upsamplers.0.conv", "conv_in", "conv_out"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def allow_installed_peft(monkeypatch) -> None:
    """transformers 5.24 asks for peft >= 0.22 before it loads a text-encoder LoRA; the registry this
    project installs from has 0.21.2, whose LoRA layers are all these tests use. Lower the bar."""
    import peft
    import transformers.integrations.peft as integration

    monkeypatch.setattr(integration, "MIN_PEFT_VERSION", peft.__version__)


def lora_tensors(model, seed: int, unet_targets, text_targets, rank: int, alpha: float):
    """({peft key: tensor} of the UNet, of the text encoder, their LoraConfigs) with random A and B."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    cfg, _, state, _ = model
    out, configs = [], []
    for module, targets in ((diffusers_unet(cfg, state), unet_targets), (transformers_clip(cfg, state), text_targets)):
        if not targets:
            out.append({})
            configs.append(None)
            continue
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        module = inject_adapter_in_model(config, module)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_A" in name:  # (rank, in[, k, k]): unit rows over the fan-in
                    p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
                elif "lora_B" in name:  # (out, rank[, 1, 1]): the product changes W by ~40 %
                    p.copy_(torch.randn(p.shape, generator=g) * 0.4 * rank ** -0.5)
        out.append(get_peft_model_state_dict(module))
        configs.append(config)
    return out[0], out[1], configs[0], configs[1]


def write_peft(path: Path, unet: dict, text: dict, unet_config, text_config) -> Path:
    """diffusers' own writer: `<path>/pytorch_lora_weights.safetensors` with `lora_adapter_metadata`."""
    from diffusers import StableDiffusionPipeline

    meta = {}
    if unet_config is not None:
        meta["unet_lora_adapter_metadata"] = unet_config.to_dict()
    if text_config is not None:
        meta["text_encoder_lora_adapter_metadata"] = text_config.to_dict()
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=unet or None,
                                              text_encoder_lora_layers=text or None, **meta)
    return path / "pytorch_lora_weights.safetensors"


def kohya_state(unet: dict, text: dict, alpha: float) -> dict[str, torch.Tensor]:
    """kohya-ss / webui names for PEFT tensors: `lora_unet_<module with _>.lora_down.weight`, ... `.alpha`."""
    out = {}
    for prefix, tensors in (("lora_unet", unet), ("lora_te", text)):
        for key, tensor in tensors.items():
            module, part = key.split(".lora_")
            if prefix == "lora_te" and not module.startswith("text_model."):
                module = "text_model." + module  # transformers >= 5 dropped it; kohya files always have it
            name = f"{prefix}_{module.replace('.', '_')}"
            out[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = tensor
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def write_kohya(path: Path, state: dict) -> Path:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def write_random_kohya(path: Path, cfg, rank: int = 16, convs: bool = False, seed: int = 0) -> Path:
    """A random kohya-layout LoRA for `cfg` on every attention/feed-forward Linear and the text encoder
    (plus every Conv2d, LoCon, with `convs`): for timing patches of full-size models, where no reference
    is run. Shapes from the name table (`lora_targets`) and the model's own modules."""
    from optimizedSD.model.fragments import TEXT_ENCODER, UNET_IN, UNET_OUT, build_fragments, fragment_of
    from optimizedSD.custom.lora import lora_targets

    with torch.device("meta"):
        fragments = build_fragments(cfg, (UNET_IN, UNET_OUT, TEXT_ENCODER))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for d, o in lora_targets(cfg).items():
        fragment, local = fragment_of(o + ".weight")
        shape = tuple(fragments[fragment].get_parameter(local).shape)
        if len(shape) == 4 and not convs:
            continue
        kind, _, module = d.partition(".")
        name = f"lora_{'unet' if kind == 'unet' else 'te'}_{module.replace('.', '_')}"
        state[f"{name}.lora_down.weight"] = torch.randn((rank, *shape[1:]), generator=g).half()
        state[f"{name}.lora_up.weight"] = torch.randn((shape[0], rank, *((1, 1) if len(shape) == 4 else ())), generator=g).half()
        state[f"{name}.alpha"] = torch.tensor(rank / 2)
    return write_kohya(path, state)


def addnet_hash(path: Path) -> str:
    """kohya's "addnet" hash of a .safetensors file, as the webui's `Lora hashes` shows it: the first 12 hex
    digits of the SHA-256 of the bytes after the header (computed here from the file format, not by our code)."""
    data = Path(path).read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
