"""LoRA files, read in the layouts they are shared in and applied by patching the host master weights
of the layers they touch: no extra device memory, no extra time per step, offloading unchanged.

Layouts:
- kohya-ss / AUTOMATIC1111 webui: `lora_unet_<diffusers module path, dots as _>.lora_down.weight`,
  `.lora_up.weight` and `.alpha`; the text encoder's as `lora_te_text_model_encoder_layers_<i>_...`.
  Linear and Conv2d layers (LoCon: the ResBlocks' 3x3 convolutions, down- and upsamplers). Scale
  alpha / rank (no alpha: 1). `lora_unet_<CompVis module path>` names are read too. The LyCORIS kinds
  in the same naming (LoHa, LoKr, CP-decomposed LoCon, DoRA, (IA)^3, full and norm diffs, on norm
  layers too) are `LycorisLayer`s, their changes built by `lycoris.py`; OFT/BOFT, GLoRA are refused.
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.[text_model.]<module>...`.
  Scale lora_alpha / r from the `lora_adapter_metadata` diffusers writes into a .safetensors header
  (with its rank_pattern / alpha_pattern, and alpha / sqrt(r) for rsLoRA); without it, 1 (diffusers'
  convention).
`lora_targets` is the one table from diffusers' module names onto ours, which carry the original
checkpoint's (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`).

A patch sets each touched weight W to cast(W_fp32 + sum_i weight_i * scale_i * up_i @ down_i): the sum
in fp32, one rounding to the weight's dtype. `LoraPatch` keeps the originals of just those layers and
`undo` puts them back bit for bit. Patch only between phases, while every weight is its host master.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..model.config import SDConfig
from ..model.fragments import fragment_of
from ..model.hashes import hash_list, lora_hash
from ..model.paths import is_inside, name_problem
from ..model.weights_file import PICKLES, SAFETENSORS, read_tensors
from . import lycoris

UNET_NAME, TEXT_NAME = "model.diffusion_model.", "cond_stage_model.transformer.text_model."  # checkpoint prefixes
LORA_SUFFIXES = (SAFETENSORS, *PICKLES)
_TAG = re.compile(r"<(?:lora|lyco):([^>]*)>")  # the webui's extra-network syntax; `lyco:` its older alias


class LoraError(Exception):
    """A LoRA that cannot be used with this model; the message names the file and why."""


@dataclass(frozen=True)
class LoraLayer:
    target: str  # checkpoint module name: model.diffusion_model.input_blocks.1.1.proj_in
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    scale: float  # alpha / rank: the layer's weight changes by scale * up @ down (convs: per kernel tap)


@dataclass(frozen=True, eq=False)
class LycorisLayer:
    target: str  # checkpoint module name (a Linear, Conv2d, LayerNorm or GroupNorm)
    parts: dict  # the module's tensors by name in the file (`hada_w1_a`, `alpha`, ...): see lycoris.py
    params: tuple[str, ...]  # what it changes: ("weight",), ("bias",) or both


@dataclass(frozen=True)
class Lora:
    name: str  # the file's stem, as the webui names it
    path: Path
    layers: tuple[LoraLayer | LycorisLayer, ...]


# ---- the table: diffusers module names -> ours ---------------------------------------------------
def lora_targets(cfg: SDConfig) -> dict[str, str]:
    """diffusers module name (`unet.down_blocks.0.attentions.0.proj_in`,
    `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`) -> checkpoint module name
    (`model.diffusion_model.input_blocks.1.1.proj_in`, `cond_stage_model.transformer.text_model...`)
    of every Linear and Conv2d layer of the UNet and the text encoder."""
    return dict(_targets(cfg.with_adapters(None)))


@functools.cache
def _targets(cfg: SDConfig) -> dict[str, str]:
    shapes = _weight_shapes(cfg)
    return {d: o for d, o in _pairs(cfg) if o in shapes}  # a ResBlock's conv_shortcut exists only where channels change


@functools.cache
def _norm_targets(cfg: SDConfig) -> dict[str, str]:
    """As `_targets`, for the LayerNorm and GroupNorm layers (LyCORIS' w_norm / b_norm)."""
    shapes = _param_shapes(cfg)
    return {d: o for d, o in _pairs(cfg) if o + ".weight" in shapes and o not in _weight_shapes(cfg)}


def _pairs(cfg: SDConfig):
    yield from (("unet." + d, UNET_NAME + o) for d, o in _unet_pairs(cfg))
    for i in range(cfg.text.num_hidden_layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "mlp.fc1", "mlp.fc2", "layer_norm1", "layer_norm2"):
            name = f"encoder.layers.{i}.{part}"
            yield f"text_encoder.text_model.{name}", TEXT_NAME + name
    yield "text_encoder.text_model.final_layer_norm", TEXT_NAME + "final_layer_norm"


def _unet_pairs(cfg: SDConfig):
    """(diffusers UNet2DConditionModel module, CompVis UNet module) for SD v1's layout of `cfg.unet`."""
    u = cfg.unet
    levels, n = len(u.channel_mult), u.num_res_blocks
    yield from (("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
                ("time_embedding.linear_2", "time_embed.2"), ("conv_out", "out.2"), ("conv_norm_out", "out.0"))
    for i in range(levels):  # down_blocks.i: level i, its ResBlocks and transformers in input_blocks
        attention = 2 ** i in u.attention_resolutions
        for j in range(n):
            block = f"input_blocks.{1 + i * (n + 1) + j}"
            yield from _resnet(f"down_blocks.{i}.resnets.{j}", f"{block}.0")
            if attention:
                yield from _transformer(f"down_blocks.{i}.attentions.{j}", f"{block}.1", u.transformer_depth)
        if i < levels - 1:
            yield f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (n + 1)}.0.op"
    yield from _resnet("mid_block.resnets.0", "middle_block.0")
    yield from _transformer("mid_block.attentions.0", "middle_block.1", u.transformer_depth)
    yield from _resnet("mid_block.resnets.1", "middle_block.2")
    for i in range(levels):  # up_blocks.i: level levels-1-i, n+1 blocks each in output_blocks
        level = levels - 1 - i
        attention = 2 ** level in u.attention_resolutions
        for j in range(n + 1):
            block = f"output_blocks.{i * (n + 1) + j}"
            yield from _resnet(f"up_blocks.{i}.resnets.{j}", f"{block}.0")
            if attention:
                yield from _transformer(f"up_blocks.{i}.attentions.{j}", f"{block}.1", u.transformer_depth)
        if level:
            yield f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * (n + 1) + n}.{2 if attention else 1}.conv"


def _resnet(d: str, o: str):
    for a, b in (("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"), ("conv2", "out_layers.3"),
                 ("conv_shortcut", "skip_connection"), ("norm1", "in_layers.0"), ("norm2", "out_layers.0")):
        yield f"{d}.{a}", f"{o}.{b}"


def _transformer(d: str, o: str, depth: int):
    yield from ((f"{d}.proj_in", f"{o}.proj_in"), (f"{d}.proj_out", f"{o}.proj_out"), (f"{d}.norm", f"{o}.norm"))
    for k in range(depth):
        for attn in ("attn1", "attn2"):
            for part in ("to_q", "to_k", "to_v", "to_out.0"):
                yield f"{d}.transformer_blocks.{k}.{attn}.{part}", f"{o}.transformer_blocks.{k}.{attn}.{part}"
        for part in ("ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3"):
            yield f"{d}.transformer_blocks.{k}.{part}", f"{o}.transformer_blocks.{k}.{part}"


@functools.cache
def _weight_shapes(cfg: SDConfig) -> dict[str, tuple[int, ...]]:
    """checkpoint module name -> weight shape of every Linear and Conv2d of UNet and text encoder."""
    from ..model.checkpoint import parameters_on_meta
    from ..model.fragments import TEXT_ENCODER, UNET_IN, UNET_OUT, build_fragment, checkpoint_key

    out = {}
    with parameters_on_meta():  # shapes only, no init
        for fragment in (UNET_IN, UNET_OUT, TEXT_ENCODER):
            for name, module in build_fragment(fragment, cfg).named_modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    out[checkpoint_key(fragment, name)] = tuple(module.weight.shape)
    return out


@functools.cache
def _param_shapes(cfg: SDConfig) -> dict[str, tuple[int, ...]]:
    """checkpoint parameter key (`<module>.weight`, `<module>.bias`) -> shape, of every Linear, Conv2d,
    LayerNorm and GroupNorm of UNet and text encoder (the layers a LyCORIS file may change)."""
    from ..model.checkpoint import parameters_on_meta
    from ..model.fragments import TEXT_ENCODER, UNET_IN, UNET_OUT, build_fragment, checkpoint_key

    out = {}
    with parameters_on_meta():
        for fragment in (UNET_IN, UNET_OUT, TEXT_ENCODER):
            for name, module in build_fragment(fragment, cfg).named_modules():
                if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)):
                    for p, t in module.named_parameters(recurse=False):
                        out[checkpoint_key(fragment, f"{name}.{p}")] = tuple(t.shape)
    return out


@functools.cache
def _kohya_names(cfg: SDConfig) -> dict[str, str]:
    """kohya name (`lora_unet_down_blocks_0_attentions_0_proj_in`, `lora_te_text_model_encoder_...`,
    or CompVis-style `lora_unet_input_blocks_1_1_proj_in`) -> checkpoint module name."""
    out = {}
    for d, o in {**_targets(cfg), **_norm_targets(cfg)}.items():
        kind, _, module = d.partition(".")
        out[("lora_unet." if kind == "unet" else "lora_te.") + module] = o
        if o.startswith(UNET_NAME):
            out["lora_unet." + o[len(UNET_NAME):]] = o
    return {k.replace(".", "_"): o for k, o in out.items()}


# ---- reading files -----------------------------------------------------------------------------
def read_lora(path: str | Path, cfg: SDConfig) -> Lora:
    """The LoRA at `path` (kohya/webui or diffusers/PEFT layout), checked against `cfg`'s shapes."""
    path = Path(path)
    tensors, metadata = read_tensors(path, LoraError, "LoRA")
    cfg = cfg.with_adapters(None)
    _refuse_other_families(path, tensors, cfg)
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in tensors):
        pieces = _kohya_pieces(path, tensors, cfg)
    elif any(".lora_A." in k or ".lora_B." in k for k in tensors):
        pieces = _peft_pieces(path, tensors, metadata, cfg)
    elif any(k.startswith("model.diffusion_model.") for k in tensors):
        raise LoraError(f"{path} is a full model checkpoint, not a LoRA; pass it with --ckpt")
    else:
        raise LoraError(f"{path} is not a LoRA in kohya/webui or diffusers/PEFT layout (keys like "
                        f"{_some(sorted(tensors), 3)}); only lora_down/lora_up or lora_A/lora_B files can be used")
    shapes = _weight_shapes(cfg)
    layers = []
    for target, piece in sorted(pieces.items()):
        if isinstance(piece, LycorisLayer):  # checked as it was made
            layers.append(piece)
            continue
        down, up, scale, key = piece
        if down.ndim != up.ndim or down.shape[0] != up.shape[1] or up.shape[2:] not in ((), (1, 1)):
            raise LoraError(f"{path}: {key} has down {tuple(down.shape)} and up {tuple(up.shape)}, which do not make "
                            f"a low-rank product; the file is damaged or of an unsupported kind")
        shape = (up.shape[0], *down.shape[1:])
        if shape != shapes[target]:
            raise LoraError(f"{path}: {key} changes a {shape} weight, but this model's {target} is "
                            f"{shapes[target]}; the LoRA was made for another model")
        layers.append(LoraLayer(target, down, up, scale))
    if not layers:
        raise LoraError(f"{path} holds no LoRA layers")
    return Lora(path.stem, path, tuple(layers))


def _kohya_pieces(path: Path, tensors: dict, cfg: SDConfig) -> dict[str, tuple]:
    names = _kohya_names(cfg)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        module, _, part = key.partition(".")
        if lycoris.refused_kind(part):
            raise LoraError(f"{path}: {key} is a {lycoris.refused_kind(part)} layer (LyCORIS), which is not supported; "
                            f"LoRA/LoCon, LoHa, LoKr, DoRA, (IA)^3 and full/norm diffs are")
        if module not in names or part not in lycoris.PARTS:
            unknown.append(key)
            continue
        groups.setdefault(module, {})[part] = tensor
    _no_unknown(path, unknown)
    pieces = {}
    for module, parts in groups.items():
        if not set(parts) <= set(lycoris.PLAIN) or names[module] not in _weight_shapes(cfg):
            pieces[names[module]] = _lycoris_layer(path, module, parts, names[module], cfg)
            continue
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise LoraError(f"{path}: {module} lacks its lora_down or lora_up weight; the file is incomplete")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])  # none: alpha = rank
        pieces[names[module]] = (down, up, alpha / down.shape[0], module)
    return pieces


def _lycoris_layer(path: Path, module: str, parts: dict, target: str, cfg: SDConfig) -> LycorisLayer:
    """One module of another kind than a plain LoRA, its shapes checked (on `meta`) against `target`'s."""
    shapes = _param_shapes(cfg)
    kind = "?"
    try:
        kind = lycoris.kind_of(parts)
        params = lycoris.params(parts)
        light = {k: v if v.numel() == 1 else v.to("meta") for k, v in parts.items()}  # shapes only
        for param in params:
            if f"{target}.{param}" not in shapes:
                raise lycoris.LycorisError(f"changes the {param} of {target}, which has none")
            meta = torch.empty(shapes[f"{target}.{param}"], device="meta")
            (lycoris.weight_delta if param == "weight" else lycoris.bias_delta)(light, meta)
    except lycoris.LycorisError as e:
        label = module if kind == "?" else f"{module} ({kind})"
        raise LoraError(f"{path}: {label} {e}; the file is damaged or of an unsupported kind") from None
    except RuntimeError:  # torch's own shape errors: say which tensors do not fit
        sizes = ", ".join(f"{p} {tuple(t.shape)}" for p, t in sorted(parts.items()) if t.numel() > 1)
        raise LoraError(f"{path}: {module} ({kind}: {sizes}) does not fit this model's {target} "
                        f"{shapes.get(target + '.weight')}; the file is damaged or was made for another model") from None
    return LycorisLayer(target, dict(parts), params)


def _peft_pieces(path: Path, tensors: dict, metadata: dict, cfg: SDConfig) -> dict[str, tuple]:
    targets = _targets(cfg)
    configs = json.loads(metadata["lora_adapter_metadata"]) if "lora_adapter_metadata" in metadata else {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        module, sep, part = key.rpartition(".lora_")
        if "magnitude" in part or part.endswith("bias") or "embedding" in part:
            raise LoraError(f"{path}: {key} is a DoRA magnitude, a LoRA bias or an embedding LoRA, which is not "
                            f"supported; only lora_A/lora_B weights")
        name = _diffusers_name(module)
        if not sep or name not in targets or part not in ("A.weight", "B.weight"):
            unknown.append(key)
            continue
        groups.setdefault(name, {})[part] = tensor
    _no_unknown(path, unknown)
    pieces = {}
    for name, parts in groups.items():
        if set(parts) != {"A.weight", "B.weight"}:
            raise LoraError(f"{path}: {name} lacks its lora_A or lora_B weight; the file is incomplete")
        down, up = parts["A.weight"], parts["B.weight"]
        kind, _, local = name.partition(".")
        pieces[targets[name]] = (down, up, _peft_scale(configs, kind, local, down.shape[0]), name)
    return pieces


def _diffusers_name(module: str) -> str:
    """A PEFT key's module as a `lora_targets` key: prefix `unet.` or `text_encoder.text_model.` (keys
    without a prefix are the UNet's; text keys saved from transformers >= 5 lack `text_model.`)."""
    if module.startswith("text_encoder."):
        rest = module[len("text_encoder."):]
        return "text_encoder.text_model." + rest.removeprefix("text_model.")
    return module if module.startswith("unet.") else "unet." + module


def _peft_scale(configs: dict, kind: str, module: str, rank: int) -> float:
    """PEFT's scaling of one layer from diffusers' metadata (`unet.lora_alpha`, `unet.alpha_pattern`, ...):
    lora_alpha / r, or / sqrt(r) with rsLoRA; 1 without metadata."""
    config = {k[len(kind) + 1:]: v for k, v in configs.items() if k.startswith(kind + ".")}
    if not config:
        return 1.0
    local = module.removeprefix("text_model.") if kind == "text_encoder" else module
    alpha = _pattern(config.get("alpha_pattern") or {}, local, module, config.get("lora_alpha", rank))
    return float(alpha) / (rank ** 0.5 if config.get("use_rslora") else rank)


def _pattern(patterns: dict, local: str, module: str, default):
    """PEFT's `get_pattern_key`: the first pattern the module name ends with (as a dotted suffix)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", local) or re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _refuse_other_families(path: Path, tensors: dict, cfg: SDConfig) -> None:
    """SDXL and SD 2.x LoRAs, told from their key names and the widths their shapes show."""
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or "add_embedding" in k or "label_emb" in k
           for k in tensors):
        raise LoraError(f"{path} is an SDXL LoRA (two text encoders); this model is SD v1")
    context = {t.shape[1] for k, t in tensors.items() if t.ndim == 2 and re.search(r"attn2[._]to_[kv]", k)
               and re.search(r"lora_(down|A)", k)}
    text = {t.shape[1] for k, t in tensors.items() if t.ndim == 2 and re.search(r"(lora_te|text_encoder)", k)
            and re.search(r"q_proj", k) and re.search(r"lora_(down|A)", k)}
    for width in context | text:
        if width != cfg.unet.context_dim:
            family = {1024: "an SD 2.x", 1280: "an SDXL", 2048: "an SDXL"}.get(width, "another model's")
            raise LoraError(f"{path} is {family} LoRA: it reads {width}-wide text features where this model's "
                            f"are {cfg.unet.context_dim}-wide (SD v1: 768)")


def _no_unknown(path: Path, unknown: list[str]) -> None:
    if unknown:
        raise LoraError(f"{path} has {len(unknown)} key(s) that match no layer of this model: "
                        f"{_some(sorted(unknown))}; the LoRA was made for another model or layout")


def _some(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# ---- patching ----------------------------------------------------------------------------------
class LoraPatch:
    """The weights a set of LoRAs changed, with their originals; `undo` restores them bit for bit."""

    def __init__(self, loras: list[tuple[Lora, float]]):
        self.loras = list(loras)
        self._originals: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight, its original values)

    def __len__(self) -> int:
        return len(self._originals)

    def undo(self) -> None:
        with torch.no_grad():
            for weight, original in self._originals:
                weight.copy_(original)
        self._originals.clear()
        self.loras = []


def apply_loras(fragments: dict[str, nn.Module], loras: list[tuple[Lora, float]]) -> LoraPatch:
    """Patch the host masters of `fragments` with `loras` [(lora, weight)]: each touched weight becomes
    cast(W_fp32 + sum of weight * scale * up @ down), one layer at a time (a single fp32 copy of one
    weight at once: `addmm_` accumulates the products into it; a `LycorisLayer` adds its fp32 change from
    the original weight, to the weight or the bias it names). Only between phases (every weight on
    the host); undo one patch (`LoraPatch.undo`) before applying the next."""
    by_target: dict[str, list[tuple[LoraLayer | LycorisLayer, float]]] = {}  # parameter key -> its changes
    for lora, weight in loras:
        if weight != 0:
            for layer in lora.layers:
                for param in getattr(layer, "params", ("weight",)):
                    by_target.setdefault(f"{layer.target}.{param}", []).append((layer, weight))
    patch = LoraPatch(loras)
    weights = {t: fragments[f].get_parameter(k) for t in by_target for f, k in [fragment_of(t)]}
    for target, weight in weights.items():
        if weight.device.type not in ("cpu", "meta"):
            raise RuntimeError(f"{target} is on {weight.device}: patch LoRAs only between phases")
    scratch = {}  # device -> one fp32 buffer for the largest weight, reused (no page faults per layer)
    with torch.no_grad():
        for target, layers in by_target.items():
            weight = weights[target]
            patch._originals.append((weight, weight.detach().clone()))
            in_place = weight.dtype == torch.float32 and weight.is_contiguous()  # fp32 already: summed in place
            if in_place:
                total = weight.detach()
            else:
                if weight.device not in scratch:
                    size = max(w.numel() for w in weights.values() if w.device == weight.device)
                    scratch[weight.device] = torch.empty(size, dtype=torch.float32, device=weight.device)
                total = scratch[weight.device][:weight.numel()].view(weight.shape).copy_(weight)  # (out, in[, kh, kw])
            flat = total.view(total.shape[0], -1)  # (out, in * kh * kw): conv kernels as rows
            original = patch._originals[-1][1]
            for layer, w in layers:
                if isinstance(layer, LoraLayer):
                    flat.addmm_(layer.up.flatten(1).float(), layer.down.flatten(1).float(), alpha=layer.scale * w)
                else:  # a LyCORIS kind: its change from the original weight (DoRA, (IA)^3 need it), in fp32
                    delta = (lycoris.weight_delta if target.endswith(".weight") else lycoris.bias_delta)(
                        layer.parts, original)
                    total.add_(delta.reshape(total.shape), alpha=w)
            if not in_place:
                weight.copy_(total)  # the one rounding to the weight's dtype
    return patch


# ---- prompts and files -------------------------------------------------------------------------
def parse_lora_arg(text: str) -> tuple[Path, float]:
    """`--lora PATH[:WEIGHT]` -> (path, weight); a path that itself holds ':' keeps it."""
    path, sep, weight = text.rpartition(":")
    if sep and re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", weight):
        return Path(path), float(weight)
    return Path(text), 1.0


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """`<lora:NAME:WEIGHT>` tags (webui syntax; WEIGHT defaults to 1) taken out of `prompt`: (the prompt
    without them, [(NAME, WEIGHT)])."""
    found = []
    for match in _TAG.finditer(prompt):
        parts = match.group(1).split(":")
        if len(parts) > 2 or not parts[0].strip():
            raise LoraError(f"cannot read {match.group(0)}: write <lora:NAME> or <lora:NAME:WEIGHT>")
        try:
            weight = float(parts[1]) if len(parts) == 2 else 1.0
        except ValueError:
            raise LoraError(f"cannot read the weight of {match.group(0)}: write a number, e.g. <lora:{parts[0]}:0.8>") \
                from None
        found.append((parts[0].strip(), weight))
    return _TAG.sub("", prompt), found


def find_lora(name: str, dirs) -> Path:
    """The file for `<lora:NAME:...>`: NAME plus a LoRA suffix, in the first of `dirs` that has it
    (directly, else in a subfolder). NAME comes from a prompt or a request, so it resolves only inside
    `dirs`: no absolute path, no `..`, no symlink leading out (`--lora PATH` may name any file)."""
    where = ", ".join(str(d) for d in dirs)
    problem = name_problem(name)
    if problem:
        raise LoraError(f"LoRA name {name!r} {problem}: <lora:NAME> names a file inside the LoRA folders "
                        f"({where}); pass --lora PATH for a file elsewhere")
    for folder in map(Path, dirs):
        for pattern in ("{}{}", "**/{}{}"):
            for suffix in LORA_SUFFIXES:
                hits = sorted(folder.glob(pattern.format(_glob_escape(name), suffix))) if folder.is_dir() else []
                for hit in hits:
                    if not is_inside(hit, folder):
                        raise LoraError(f"LoRA {name!r} in {folder} is a link to {hit.resolve()}, outside the "
                                        f"LoRA folders; move the file there or pass --lora PATH")
                    return hit
    raise LoraError(f"LoRA {name!r} not found: looked for {name}{{{','.join(LORA_SUFFIXES)}}} in {where}; "
                    f"put the file there or pass --lora_dir")


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def lora_metadata(loras: list[tuple[Lora, float]]) -> dict[str, str]:
    """`Lora hashes` (webui infotext) of `loras`, or {} without any."""
    return {"Lora hashes": hash_list([(lora.name, lora_hash(lora.path)) for lora, _ in loras])} if loras else {}


def lora_tag(lora: Lora, weight: float) -> str:
    """The webui tag that names `lora` at `weight` in a prompt (what infotext readers look for)."""
    return f"<lora:{lora.name}:{weight:g}>"
