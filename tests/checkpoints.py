"""Test helper: write tiny SD v1 checkpoints in the original (CompVis/Lightning) layout.

Keys come from the fragments' own state dicts through `fragments.checkpoint_key`, plus the extra
keys real checkpoints carry, so a loader that handles these handles the real layout.
"""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from optimizedSD.model.config import SDConfig, tiny_config
from optimizedSD.model.fragments import FRAGMENTS, SKIPPED_KEYS, UNET_IN, UNET_OUT, build_fragments, checkpoint_key

SCHEDULE_KEYS = sorted(k for k in SKIPPED_KEYS if "." not in k)  # betas, alphas_cumprod, ..., logvar
TEXT_SEGMENT = "cond_stage_model.transformer.text_model."


def ema_key(unet_key: str) -> str:
    """LitEma's name for a UNet weight: `model.` dropped, every dot removed, under `model_ema.`."""
    return "model_ema." + unet_key[len("model."):].replace(".", "")


def write_tiny_checkpoint(path, cfg: SDConfig | None = None, *, seed: int = 0, dtype=torch.float32,
                          wrap: bool = True, ema: str = "none", text_model_segment: bool = True,
                          extra_keys: bool = True) -> dict[str, torch.Tensor]:
    """Write randomly initialised fragments of `cfg` (default `tiny_config()`) to `path`.

    `.safetensors` goes through `safetensors.torch.save_file`, anything else through `torch.save`
    (wrapped as Lightning does, under "state_dict", when `wrap`). `ema="full"` adds a `model_ema.*`
    copy of the UNet with different values. `text_model_segment=False` writes CLIP keys as older
    transformers did (`cond_stage_model.transformer.embeddings...`). `extra_keys` adds the schedule
    buffers, EMA scalars and CLIP position ids, and for a wrapped .ckpt the Lightning extras
    (`global_step`, a ModelCheckpoint callback holding numpy scalars). Returns the tensors written.
    """
    assert ema in ("none", "full"), ema
    path = Path(path)
    cfg = cfg or tiny_config()
    torch.manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in build_fragments(cfg).items():
        for key, tensor in module.state_dict().items():
            state[checkpoint_key(name, key)] = tensor.detach().to(dtype).clone()
    if not text_model_segment:
        state = {k.replace(TEXT_SEGMENT, "cond_stage_model.transformer.", 1): v for k, v in state.items()}
    if ema == "full":
        for key in [k for k in state if k.startswith("model.diffusion_model.")]:
            state[ema_key(key)] = (state[key].float() * 0.5 + 1.0).to(dtype)  # differs from the weights
    if extra_keys:
        for key in SCHEDULE_KEYS:
            state[key] = torch.linspace(0.001, 0.999, cfg.timesteps, dtype=torch.float32)
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
        segment = TEXT_SEGMENT if text_model_segment else "cond_stage_model.transformer."
        state[segment + "embeddings.position_ids"] = torch.arange(cfg.text.max_position_embeddings)[None]

    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
        return state
    obj: dict = dict(state)
    if wrap:
        obj = {"state_dict": state}
        if extra_keys:
            with lightning_callback_class() as callback:
                saved = callback()
                saved.__dict__.update(monitor=None, best_model_score=np.float64(0.25), dirpath="logs/ckpt")
                obj.update(epoch=6, global_step=470000, callbacks={callback: {"best_k_models": {},
                           "kth_value": np.float32(1.5), "instance": saved}})
                torch.save(obj, path)
            return state
    elif extra_keys:
        obj["global_step"] = 470000  # a non-tensor among the tensors, as some exporters leave it
    torch.save(obj, path)
    return state


@contextmanager
def lightning_callback_class():
    """A class pickled as `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`, without Lightning."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    saved = {n: sys.modules.get(n) for n in names}
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    sys.modules[names[-1]].ModelCheckpoint = cls
    try:
        yield cls
    finally:
        for n, module in saved.items():
            if module is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = module


def expected_weights(written: dict[str, torch.Tensor], cfg: SDConfig | None = None, *, ema: bool = False,
                     names=FRAGMENTS) -> dict[str, dict[str, torch.Tensor]]:
    """fragment -> {local key: tensor} that loading `written` should give (EMA UNet when `ema`)."""
    cfg = cfg or tiny_config()
    with torch.device("meta"):
        modules = build_fragments(cfg, names)
    out = {}
    for name, module in modules.items():
        out[name] = {}
        for local in module.state_dict():
            key = checkpoint_key(name, local)
            if key not in written:
                key = key.replace(TEXT_SEGMENT, "cond_stage_model.transformer.", 1)
            if ema and name in (UNET_IN, UNET_OUT):
                key = ema_key(key)
            out[name][local] = written[key]
    return out
