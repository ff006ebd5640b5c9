"""A separate VAE file (`--vae`, e.g. vae-ft-mse-840000-ema-pruned) loaded into the VAE fragment,
replacing the checkpoint's.

Layouts, told from the key names:
- a full SD checkpoint: its `first_stage_model.*` keys (everything else is not read);
- a CompVis VAE file: the same names without the prefix (`encoder.down.0.block.0.conv1.weight`), with
  the `loss.*` discriminator/perceptual weights of training checkpoints and EMA counters skipped;
- diffusers' `AutoencoderKL` (`encoder.down_blocks.0.resnets.0.conv1.weight`, mid-block attention as
  `to_q` ... `to_out.0` or the older `query` ... `proj_attn`), renamed onto ours by `_compvis_name`.
Keys and shapes are checked as for a checkpoint: every missing or unknown key is an error that names it.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..model.checkpoint import CheckpointError, _finish, parameters_on_meta, _some
from ..model.config import SDConfig
from ..model.fragments import VAE, build_fragment
from ..model.hashes import vae_hash
from ..model.weights_file import read_tensors

PREFIX = "first_stage_model."
_SKIPPED = ("loss.", "model_ema.decay", "model_ema.num_updates")  # training-only parts of VAE checkpoints


def load_vae(path: str | Path, cfg: SDConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The VAE fragment with the weights of the VAE file at `path`, in `dtype`. Raises CheckpointError,
    naming the file, for a file that is no VAE of `cfg`'s shapes."""
    path = Path(path)
    tensors, _ = read_tensors(path, CheckpointError, "VAE")
    if any(k.startswith(PREFIX) for k in tensors):
        state = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    else:
        state = {k: v for k, v in tensors.items() if not k.startswith(_SKIPPED)}
        if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
            state = {_compvis_name(k, len(cfg.vae.ch_mult)): v for k, v in state.items()}
    if not any(k.startswith(("encoder.", "decoder.")) for k in state):
        raise CheckpointError(f"{path} holds no VAE weights (no encoder.*/decoder.* or first_stage_model.* keys); "
                              f"pass a VAE file with --vae")
    with parameters_on_meta():
        module = build_fragment(VAE, cfg)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    unknown, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if unknown or missing:
        raise CheckpointError(f"{path} is not an SD v1 VAE of this config: "
                              + "; ".join(f"{what} {_some(keys)}" for what, keys in
                                          (("unknown keys", unknown), ("missing keys", missing)) if keys))
    for key, shape in expected.items():
        value = state[key]
        if value.ndim == 2 and len(shape) == 4 and shape[2:] == (1, 1):
            state[key] = value = value[:, :, None, None]  # diffusers' attention projections are Linear
        if tuple(value.shape) != shape:
            z = tuple(state["decoder.conv_in.weight"].shape)[1]
            hint = f"; it has {z} latent channels (SD v1: 4)" if z != cfg.vae.z_channels else ""
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)} but this model's VAE needs {shape}"
                                  f"{hint}; it is a VAE for another model")
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    _finish(VAE, module, dtype)
    return module


def vae_metadata(path: str | Path) -> dict[str, str]:
    """`VAE` (the file's name) and `VAE hash` (webui infotext) of a separate VAE."""
    return {"VAE": Path(path).name, "VAE hash": vae_hash(path)}


# diffusers AutoencoderKL key -> CompVis, given the number of levels (decoder up_blocks run in reverse)
_RULES = (
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m, n: f"encoder.down.{m[1]}.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample."),
    (r"\.mid_block\.resnets\.(\d+)\.", lambda m, n: f".mid.block_{int(m[1]) + 1}."),
    (r"\.mid_block\.attentions\.0\.", lambda m, n: ".mid.attn_1."),
    (r"\.attn_1\.(group_norm)\.", lambda m, n: ".attn_1.norm."),
    (r"\.attn_1\.(to_q|query)\.", lambda m, n: ".attn_1.q."),
    (r"\.attn_1\.(to_k|key)\.", lambda m, n: ".attn_1.k."),
    (r"\.attn_1\.(to_v|value)\.", lambda m, n: ".attn_1.v."),
    (r"\.attn_1\.(to_out\.0|proj_attn)\.", lambda m, n: ".attn_1.proj_out."),
    (r"\.conv_shortcut\.", lambda m, n: ".nin_shortcut."),
    (r"\.conv_norm_out\.", lambda m, n: ".norm_out."),
)


def _compvis_name(key: str, levels: int) -> str:
    for pattern, repl in _RULES:
        key = re.sub(pattern, lambda m: repl(m, levels), key)
    return key
