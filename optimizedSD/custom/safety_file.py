"""A local copy of the Stable Diffusion safety checker (`--safety_checker PATH`), checked and loaded.

Layouts (never downloaded; `CompVis/stable-diffusion-safety-checker` as published, or any
`StableDiffusionSafetyChecker.save_pretrained` folder):
- a folder with `config.json` (a `CLIPConfig`: its `vision_config` and `projection_dim`) and
  `model.safetensors` or `pytorch_model.bin`;
- a single `.safetensors` or `.bin` file (with a `config.json` beside it, that is read; else the tower's
  shapes are read from the weights, with CLIP's 64-wide attention heads).
Keys: `vision_model.*`, transformers' `CLIPVisionModel` (`vision_model.vision_model.embeddings...` as
published with transformers 4, `vision_model.embeddings...` as transformers 5 saves it: both are read
onto the installed transformers' names), `visual_projection.weight`, `concept_embeds`,
`special_care_embeds`, `concept_embeds_weights`, `special_care_embeds_weights`; the `position_ids`
buffer older files hold is dropped. A pickle is read with `torch.load(weights_only=True)`.
`safety_config` reads the shapes only (a .safetensors header, a memory-mapped .bin), so a run is
refused or planned before any weight is read; every problem is a `SafetyError` of one line.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from ..model.checkpoint import _some, parameters_on_meta
from ..model.safety import HEAD_DIM, SafetyChecker, SafetyConfig
from ..model.weights_file import read_tensors

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SUFFIXES = (".safetensors", ".bin")
TOWER = "vision_model."
EMBEDS = ("concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights")
LAYOUT = ("diffusers' StableDiffusionSafetyChecker layout: vision_model.*, visual_projection.weight, "
          + ", ".join(EMBEDS))
_DROPPED = re.compile(r"(^|\.)position_ids$")


class SafetyError(Exception):
    """A safety checker that cannot be used; the message is one line naming the path."""


def weights_path(path: str | Path) -> Path:
    """The weights file of a checker folder or file."""
    path = Path(path)
    if path.is_dir():
        found = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
        if found is None:
            raise SafetyError(f"safety checker folder {path} has neither {' nor '.join(WEIGHT_FILES)}; pass the "
                              "folder of CompVis/stable-diffusion-safety-checker (config.json and its weights)")
        return found
    if not path.exists():
        raise SafetyError(f"safety checker not found: {path}; check the --safety_checker path")
    if path.suffix.lower() not in SUFFIXES:
        raise SafetyError(f"unsupported safety checker file {path}: expected a folder, .safetensors or .bin")
    return path


def _ours(key: str) -> str:
    """A file's key as the installed transformers names it in `SafetyChecker`: its tower's keys are
    `vision_model.vision_model.*` in transformers 4, `vision_model.*` in 5, whichever the file has."""
    if not key.startswith(TOWER):
        return key
    rest = key[len(TOWER):]
    rest = rest[len(TOWER):] if rest.startswith(TOWER) else rest
    return TOWER + _tower_prefix() + rest


@functools.cache
def _tower_prefix() -> str:
    """"vision_model." where transformers' CLIPVisionModel nests its transformer (4.x), else ""."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        tiny = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                num_attention_heads=1, image_size=4, patch_size=2))
    return TOWER if any(k.startswith(TOWER) for k in tiny.state_dict()) else ""


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor key of `file` with its shape, without reading the tensors' data."""
    try:
        if file.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)[:160]
        raise SafetyError(f"cannot read safety checker {file}: {first}; the file is truncated, corrupt or "
                          "not plain tensors") from None
    if not isinstance(state, dict):
        raise SafetyError(f"{file} holds a {type(state).__name__}, not a dict of tensors; it is not a safety checker")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def safety_config(path: str | Path) -> SafetyConfig:
    """The shapes of the checker at `path` (a folder or a file), its layout checked."""
    file = weights_path(path)
    shapes = {_ours(k): v for k, v in _shapes(file).items() if not _DROPPED.search(k)}
    missing = [k for k in ("visual_projection.weight", *EMBEDS) if k not in shapes]
    if not any(k.startswith(TOWER) for k in shapes):
        missing.insert(0, TOWER + "*")
    if missing:
        raise SafetyError(f"{file} is not a Stable Diffusion safety checker: no {_some(missing)} (expected "
                          f"{LAYOUT})")
    projection_dim, hidden = shapes["visual_projection.weight"]
    config_file = (Path(path) if Path(path).is_dir() else file.parent) / "config.json"
    vision = _vision_from_json(config_file) if config_file.is_file() else _vision_from_shapes(file, shapes, hidden)
    config = SafetyConfig.of(vision, projection_dim, shapes["concept_embeds"][0], shapes["special_care_embeds"][0])
    with parameters_on_meta():
        module = SafetyChecker(config)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if not _DROPPED.search(k)}
    unknown, absent = sorted(set(shapes) - set(expected)), sorted(set(expected) - set(shapes))
    wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
    if unknown or absent or wrong:
        raise SafetyError(f"{file} does not match its config ({config_file.name if config_file.is_file() else 'from its shapes'}): "
                          + "; ".join(f"{what} {_some(keys)}" for what, keys in
                                      (("unknown keys", unknown), ("missing keys", absent), ("wrong shapes", wrong))
                                      if keys) + f" (expected {LAYOUT})")
    return config


def _vision_from_json(file: Path):
    from transformers import CLIPConfig

    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        config = CLIPConfig.from_dict(data)
    except Exception as e:
        raise SafetyError(f"cannot read {file} as a CLIPConfig (a vision_config and projection_dim): "
                          f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__}") from None
    if "vision_config" not in data:
        raise SafetyError(f"{file} has no vision_config; it is not the config.json of a safety checker")
    return config.vision_config


def _vision_from_shapes(file: Path, shapes: dict, hidden: int):
    """The tower's `CLIPVisionConfig` read off its weights (heads: hidden / 64, as every CLIP's)."""
    from transformers import CLIPVisionConfig

    try:
        tower = _ours(TOWER)
        patch = shapes[tower + "embeddings.patch_embedding.weight"]
        positions = shapes[tower + "embeddings.position_embedding.weight"][0]
        layers = 1 + max(int(m[1]) for k in shapes if (m := re.match(re.escape(tower) + r"encoder\.layers\.(\d+)\.", k)))
        intermediate = shapes[tower + "encoder.layers.0.mlp.fc1.weight"][0]
    except (KeyError, ValueError):
        raise SafetyError(f"{file} is not a Stable Diffusion safety checker: its vision_model.* is no CLIP vision "
                          f"tower (no embeddings.patch_embedding or encoder.layers); expected {LAYOUT}") from None
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1 or patch[0] != hidden or hidden % HEAD_DIM:
        raise SafetyError(f"{file}: the vision tower's shapes are no CLIP ViT's; put its config.json beside it")
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=hidden // HEAD_DIM, num_channels=patch[1], patch_size=patch[2],
                            image_size=grid * patch[2], projection_dim=shapes["visual_projection.weight"][0])


def load_safety_checker(path: str | Path, dtype: torch.dtype = torch.float32) -> SafetyChecker:
    """The checker at `path` with its weights, in `dtype`, on the host, ready to be a fragment."""
    config = safety_config(path)
    file = weights_path(path)
    tensors, _ = read_tensors(file, SafetyError, "safety checker")
    state = {_ours(k): v.to(dtype) for k, v in tensors.items() if not _DROPPED.search(k)}
    with parameters_on_meta():
        module = SafetyChecker(config)
    module.load_state_dict(state, strict=True, assign=True)  # keys and shapes checked by safety_config
    on_meta = [k for k, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if on_meta:
        raise SafetyError(f"{file}: {_some(on_meta)} not in the file (expected {LAYOUT})")
    for name, buf in module.named_buffers():
        if buf.is_floating_point() and buf.dtype != dtype:
            module.get_buffer(name).data = buf.to(dtype)
    return module.eval().requires_grad_(False)


def safety_metadata(path: str | Path, blur: bool) -> dict[str, str]:
    """The request-level infotext of a checked run: `Safety checker: <name> (black|blur)`."""
    return {"Safety checker": f"{Path(path).name} ({'blur' if blur else 'black'})"}
