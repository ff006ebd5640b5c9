"""Reading ControlNet files: the original layout and diffusers', checked against the model's UNet.

- Original (lllyasviel's `control_v11p_sd15_canny.pth`, the webui's pruned fp16 `.safetensors`):
  `control_model.input_hint_block.*`, `.time_embed.*`, `.input_blocks.*`, `.zero_convs.*`,
  `.middle_block.*`, `.middle_block_out.*`; our module's keys are these minus `control_model.`.
- diffusers (`ControlNetModel.save_pretrained`): a folder, or its `diffusion_pytorch_model[.fp16]
  .safetensors` / `.bin`, with `config.json` beside it; its keys are converted to ours by one table
  (`diffusers_keys`).

Pickles are read with `torch.load(weights_only=True)` (model/weights_file.py): no code in a file runs.
A file that is no SD 1.5 ControlNet is one line that says what it is: a LoRA, a checkpoint, an SD 2.x
or SDXL ControlNet (cross-attention width 1024 / 2048, not 768), a T2I adapter or anything else.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch

from ..model.config import UNetConfig
from ..model.controlnet import HINT_CHANNELS, ControlNet
from ..model.weights_file import SAFETENSORS, read_tensors

PREFIX = "control_model."
OURS = ("input_hint_block.", "zero_convs.", "middle_block_out.")  # keys only a ControlNet has
DIFFUSERS = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
SUFFIXES = (SAFETENSORS, ".pth", ".pt", ".ckpt", ".bin")
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


class ControlNetError(ValueError):
    """A file that cannot be used as a ControlNet for this model (one line)."""


def model_hash(path: str | Path) -> str:
    """The webui's short hash of a model file, as its ControlNet extension lists a model
    (`control_v11p_sd15_canny [d14c016b]`, `sd_models.model_hash`): the first 8 hex digits of the
    SHA-256 of the 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def weights_path(path: str | Path) -> tuple[Path, Path | None]:
    """(the weights file, diffusers' config.json or None) of `path`: a file, or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        found = next((path / n for n in DIFFUSERS_WEIGHTS if (path / n).is_file()), None)
        if found is None:
            raise ControlNetError(f"{path} is a folder without diffusion_pytorch_model.safetensors; give a ControlNet "
                                  "file (.pth, .safetensors) or a diffusers ControlNet folder")
        path = found
    config = path.with_name("config.json")
    return path, config if config.is_file() else None


@functools.lru_cache(maxsize=4)
def _read(path: Path, mtime: float, cfg: UNetConfig) -> tuple[dict[str, torch.Tensor], int]:
    try:
        tensors, _ = read_tensors(path, ControlNetError, "ControlNet")
    except ControlNetError:
        _refuse_checkpoint(path)  # a webui .ckpt holds more than tensors: its own safe reader names it
        raise
    keys = list(tensors)
    if any(k.startswith(DIFFUSERS) for k in keys):
        config = path.with_name("config.json")
        state = from_diffusers(tensors, json.loads(config.read_text()) if config.is_file() else None, cfg, path)
    else:
        state = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        if not any(k.startswith(OURS) for k in state):  # some files drop the prefix
            state = {k: v for k, v in tensors.items() if k.startswith(OURS + ("time_embed.", "input_blocks.", "middle_block."))}
        if not any(k.startswith(OURS) for k in state):
            raise ControlNetError(f"{path} is {_what(keys)}, not a ControlNet (no control_model.input_hint_block / "
                                  "zero_convs keys)")
    _check_family(path, state, cfg)
    hint = state["input_hint_block.0.weight"].shape[1] if "input_hint_block.0.weight" in state else 3
    return state, hint


def _refuse_checkpoint(path: Path) -> None:
    """Say so when `path` is a Stable Diffusion checkpoint (read with model/checkpoint.py's safe reader)."""
    from ..model.checkpoint import checkpoint_shapes

    try:
        keys = list(checkpoint_shapes(path))
    except Exception:
        return
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys) \
            and not any(k.startswith(PREFIX) for k in keys):
        raise ControlNetError(f"{path} is {_what(keys)}, not a ControlNet") from None


def _what(keys: list[str]) -> str:
    if any("lora_" in k or ".lora_A" in k or ".lora_down" in k or k.startswith(("lora_unet", "lora_te")) for k in keys):
        return "a LoRA (give it with --lora or <lora:NAME>)"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return "a Stable Diffusion checkpoint (give it with --ckpt)"
    if any(k.startswith("body.") or k.startswith("adapter.") for k in keys):
        return "a T2I-Adapter"
    return f"no ControlNet file (keys like {', '.join(keys[:3]) or 'none'})"


def _check_family(path: Path, state: dict, cfg: UNetConfig) -> None:
    widths = {v.shape[1] for k, v in state.items() if k.endswith("attn2.to_k.weight")}
    for width in widths:
        if width != cfg.context_dim:
            family = FAMILIES.get(width, f"a model with {width}-wide text conditioning")
            ours = FAMILIES.get(cfg.context_dim, f"{cfg.context_dim}-wide")
            raise ControlNetError(f"{path} is a ControlNet for {family} (cross-attention width {width}); this model "
                                  f"is {ours} ({cfg.context_dim}): use an SD 1.5 ControlNet (control_v11p_sd15_*)")


def load_controlnet(path: str | Path, cfg: UNetConfig, dtype: torch.dtype = torch.float32) -> ControlNet:
    """The ControlNet at `path` (a file or a diffusers folder) for the UNet of `cfg`, its weights in
    `dtype`, in eval mode; every key checked (`strict`), one line for what does not fit."""
    weights, _ = weights_path(path)
    if not weights.is_file():
        raise ControlNetError(f"ControlNet not found: {weights}")
    state, hint = _read(weights, weights.stat().st_mtime, cfg)
    with torch.device("meta"):
        net = ControlNet(cfg, hint)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ControlNetError(f"{weights} does not fit this model's UNet: {len(missing)} missing key(s) "
                              f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    wrong = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise ControlNetError(f"{weights} does not fit this model's UNet: {k} is {tuple(state[k].shape)}, the model "
                              f"needs {tuple(expected[k].shape)} ({len(wrong)} such)")
    net.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def check_controlnet(path: str | Path, cfg: UNetConfig) -> None:
    """Raise ControlNetError unless `path` is a ControlNet for the UNet of `cfg` (read once, cached)."""
    load_controlnet(path, cfg)


# ---- diffusers' layout ---------------------------------------------------------------------------
def from_diffusers(tensors: dict, config: dict | None, cfg: UNetConfig, path: Path) -> dict[str, torch.Tensor]:
    """diffusers' ControlNetModel state dict -> ours (`diffusers_keys`), checked against its config.json."""
    if config is not None:
        width = config.get("cross_attention_dim")
        if width is not None and width != cfg.context_dim:
            family = FAMILIES.get(width, f"a model with {width}-wide text conditioning")
            raise ControlNetError(f"{path} is a ControlNet for {family} (cross_attention_dim {width} in its "
                                  f"config.json); this model needs {cfg.context_dim}: use an SD 1.5 ControlNet")
        if config.get("use_linear_projection"):
            raise ControlNetError(f"{path} is a ControlNet for SD 2.x (use_linear_projection in its config.json); "
                                  "use an SD 1.5 ControlNet")
    table = diffusers_keys(cfg)
    unknown = [k for k in tensors if k not in table]
    if unknown:
        raise ControlNetError(f"{path}: {len(unknown)} key(s) of no SD 1.5 ControlNet ({', '.join(unknown[:3])}); "
                              "is it a ControlNet for another model?")
    return {table[k]: v for k, v in tensors.items()}


@functools.cache
def diffusers_keys(cfg: UNetConfig) -> dict[str, str]:
    """diffusers ControlNetModel key -> ours (the original layout minus `control_model.`)."""
    out = {}
    for d, o in _module_pairs(cfg):
        for leaf in ("weight", "bias"):
            out[f"{d}.{leaf}"] = f"{o}.{leaf}"
    return out


def _module_pairs(cfg: UNetConfig):
    levels, n = len(cfg.channel_mult), cfg.num_res_blocks
    yield from (("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
                ("time_embedding.linear_2", "time_embed.2"))
    yield "controlnet_cond_embedding.conv_in", "input_hint_block.0"
    for j in range(len(HINT_CHANNELS) - 1):
        yield f"controlnet_cond_embedding.blocks.{j}", f"input_hint_block.{2 * (j + 1)}"
    yield "controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * len(HINT_CHANNELS)}"
    k = 0
    yield f"controlnet_down_blocks.{k}", f"zero_convs.{k}.0"
    for i in range(levels):
        attention = 2 ** i in cfg.attention_resolutions
        for j in range(n):
            block = 1 + i * (n + 1) + j
            yield from _resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{block}.0")
            if attention:
                yield from _transformer(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{block}.1",
                                        cfg.transformer_depth)
            k += 1
            yield f"controlnet_down_blocks.{k}", f"zero_convs.{k}.0"
        if i < levels - 1:
            yield f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (n + 1)}.0.op"
            k += 1
            yield f"controlnet_down_blocks.{k}", f"zero_convs.{k}.0"
    yield from _resnet("mid_block.resnets.0", "middle_block.0")
    yield from _transformer("mid_block.attentions.0", "middle_block.1", cfg.transformer_depth)
    yield from _resnet("mid_block.resnets.1", "middle_block.2")
    yield "controlnet_mid_block", "middle_block_out.0"


def _resnet(d: str, o: str):
    for a, b in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")):
        yield f"{d}.{a}", f"{o}.{b}"


def _transformer(d: str, o: str, depth: int):
    for part in ("norm", "proj_in", "proj_out"):
        yield f"{d}.{part}", f"{o}.{part}"
    for k in range(depth):
        for part in ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"):
            yield f"{d}.transformer_blocks.{k}.{part}", f"{o}.transformer_blocks.{k}.{part}"
        for attn in ("attn1", "attn2"):
            for part in ("to_q", "to_k", "to_v", "to_out.0"):
                yield f"{d}.transformer_blocks.{k}.{attn}.{part}", f"{o}.transformer_blocks.{k}.{attn}.{part}"
