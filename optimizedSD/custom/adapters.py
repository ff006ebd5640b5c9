"""The adapters of Xiang et al. 2023, "A Closer Look at Parameter-Efficient Tuning in Diffusion Models"
(arXiv 2303.18181; code: Xiang-cd/unet-finetune), built inside our UNet and loaded from the folder that
project's `save_adapter_to_dir` writes.

An adapter reads the hidden state at one position of a block's data path (`din`) and adds `scale` times
its output at another (`dout`); the positions are named in `config.py`, the data paths in `unet.py`.
- In every BasicTransformerBlock, the child `adapter_inout` (that project's `AdapterForward`):
  `adp` = Linear(dim, mid_dim), activation, Linear(mid_dim, dim); dim is the context's width for attn2c.
- In every ResBlock, the child `adapter`: GroupNorm32(32), SiLU, 3x3 conv to mid_dim, activation, 3x3
  conv back (in channels at resi, out channels at reso).
Both are children of the block they belong to, so the offload engine moves them with that block and
plans count their bytes.

The folder holds one `<UNet module path>.pt` per adapter with that module's state dict, e.g.
`input_blocks.1.1.transformer_blocks.0.adapter_inout.pt` (`adp.0.weight`, `adp.0.bias`, `adp.2.weight`,
`adp.2.bias`) and `input_blocks.1.0.adapter.pt` (`0.weight` ... `4.bias`). That project also writes every
`adapter_inout.adp` Sequential on its own (`...adapter_inout.adp.pt`: the same tensors without the
`adp.` prefix); those copies are read only where the main file is missing.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..model.checkpoint import parameters_on_meta
from ..model.config import AdapterConfig, AdapterSpec, SDConfig
from ..model.fragments import UNET_IN, UNET_OUT
from ..model.unet import BasicTransformerBlock, GroupNorm32, ResBlock
from ..model.weights_file import load_pickle

_ACTIVATIONS = {"relu": nn.ReLU, "default": nn.ReLU, "sig": nn.Sigmoid, "silu": nn.SiLU, "ident": nn.Identity}
TRANSFORMER_ADAPTER, RESBLOCK_ADAPTER = "adapter_inout", "adapter"  # attribute names in the blocks
DUPLICATE_SUFFIX = ".adp"  # that project's second copy of each transformer adapter
UNET_HALVES = (UNET_IN, UNET_OUT)


class AdapterError(Exception):
    """An adapter folder that does not fit the config; the message names the file and the fix."""


class _Tap:
    """One pass of a block through its adapter: `at(position, h)` runs the adapter on `h` at `din`
    and adds its scaled output to `h` at `dout`; everywhere else `h` passes unchanged."""

    def __init__(self, adapter: nn.Module, spec: AdapterSpec):
        self.adapter, self.spec, self.out = adapter, spec, None

    def __call__(self, position: str, h: torch.Tensor) -> torch.Tensor:
        if position == self.spec.din:
            self.out = self.adapter(h)
        if position == self.spec.dout:
            h, self.out = torch.add(h, self.out, alpha=self.spec.scale), None  # no scaled copy; freed once added
        return h


class TransformerAdapter(nn.Module):
    """`AdapterForward`: Linear(dim, mid), activation, Linear(mid, dim), under the child name `adp`."""

    def __init__(self, dim: int, spec: AdapterSpec):
        super().__init__()
        self.spec = spec
        self.adp = nn.Sequential(nn.Linear(dim, spec.mid_dim), _ACTIVATIONS[spec.method](),
                                 nn.Linear(spec.mid_dim, dim))

    def forward(self, h):
        return self.adp(h)

    def tap(self) -> _Tap:
        return _Tap(self, self.spec)


class ResBlockAdapter(nn.Sequential):
    """GroupNorm32(32, c_in), SiLU, Conv3x3(c_in, mid), activation, Conv3x3(mid, c_out)."""

    def __init__(self, channels: int, out_channels: int, spec: AdapterSpec):
        c_in = channels if spec.din == "resi" else out_channels
        c_out = channels if spec.dout == "resi" else out_channels
        super().__init__(GroupNorm32(32, c_in), nn.SiLU(), nn.Conv2d(c_in, spec.mid_dim, 3, padding=1),
                         _ACTIVATIONS[spec.method](), nn.Conv2d(spec.mid_dim, c_out, 3, padding=1))
        self.spec = spec

    def tap(self) -> _Tap:
        return _Tap(self, self.spec)


def attach_adapters(half: nn.Module, adapters: AdapterConfig, context_dim: int) -> None:
    """Give every BasicTransformerBlock and ResBlock of a UNet half its adapter (random init; the
    weights come from `load_adapter_folder`)."""
    for module in list(half.modules()):
        if isinstance(module, BasicTransformerBlock) and adapters.transformer is not None:
            spec = adapters.transformer
            dim = context_dim if spec.din == "attn2c" else module.norm1.normalized_shape[0]
            module.adapter_inout = TransformerAdapter(dim, spec)
        elif isinstance(module, ResBlock) and adapters.resblock is not None:
            channels, out_channels = module.in_layers[0].num_channels, module.out_layers[-1].out_channels
            module.adapter = ResBlockAdapter(channels, out_channels, adapters.resblock)


def with_adapters(fragments: dict[str, nn.Module], cfg: SDConfig) -> dict[str, nn.Module]:
    """`fragments` with `cfg`'s adapters attached to their UNet halves (random init), in place; the
    UNet itself never builds them: its blocks' `adapter`/`adapter_inout` are hook points for this."""
    if cfg.unet.adapters is not None:
        for half in UNET_HALVES:
            if half in fragments:
                attach_adapters(fragments[half], cfg.unet.adapters, cfg.unet.context_dim)
    return fragments


def adapter_modules(fragments: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """UNet module path (that project's file name without `.pt`) -> adapter, in UNet order."""
    out = {}
    for half in UNET_HALVES:
        if half in fragments:
            for name, module in fragments[half].named_modules():
                if isinstance(module, (TransformerAdapter, ResBlockAdapter)):
                    out[name] = module
    return out


def load_adapter_folder(fragments: dict[str, nn.Module], cfg: SDConfig, folder: str | Path,
                        dtype: torch.dtype) -> int:
    """Add `cfg`'s adapters to the UNet halves of `fragments` (loaded from a checkpoint, which holds
    none) with their weights from `folder`, in `dtype`; returns the number of adapter parameters.
    Every adapter needs its file, and every `.pt` in the folder must be an adapter of this config;
    keys and shapes must match exactly. Raises AdapterError before any module is changed."""
    folder = Path(folder)
    if cfg.unet.adapters is None:
        raise AdapterError(f"--adapter_path {folder} given, but the model config names no adapters; pass that "
                           f"project's YAML (with unet_config.params.adapter_config) with --config")
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}; pass the folder that save_adapter_to_dir "
                           f"wrote (e.g. <logdir>/checkpoints/999-adapters) with --adapter_path")
    if adapter_modules(fragments):
        raise AdapterError("the model already has adapters; load a folder into fragments loaded from a checkpoint")
    with parameters_on_meta():  # the halves with adapters, shape only: names and shapes to read
        shadow = with_adapters({h: type(fragments[h])(cfg.unet) for h in UNET_HALVES if h in fragments}, cfg)
    states = _read_folder(folder, adapter_modules(shadow))
    for half, built in shadow.items():
        for name, module in adapter_modules({half: built}).items():
            module.load_state_dict({k: v.to(dtype) for k, v in states[name].items()}, strict=True, assign=True)
            module.requires_grad_(False).eval()
            owner, attr = name.rsplit(".", 1)
            setattr(fragments[half].get_submodule(owner), attr, module)  # the same block of the loaded half
    return sum(v.numel() for state in states.values() for v in state.values())


def adapter_metadata(folder: str | Path, adapters: AdapterConfig) -> dict[str, str]:
    """`Adapters`: the folder the adapters came from and what they are (positions, mid_dim, activation, scale)."""
    return {"Adapters": f"{Path(folder)} ({adapters.describe()})"}


def _read_folder(folder: Path, modules: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """module path -> its state dict read from `folder`, checked against `modules`."""
    files = {p.name for p in folder.iterdir() if p.suffix == ".pt" and p.is_file()}
    expected = {f"{name}.pt" for name in modules} | {f"{name}{DUPLICATE_SUFFIX}.pt" for name in modules
                                                     if isinstance(modules[name], TransformerAdapter)}
    unknown = sorted(files - expected)
    if unknown:
        raise AdapterError(f"{folder} holds {len(unknown)} file(s) that are no adapter of this config: "
                           f"{_some(unknown)}; the config (--config) must be the one the adapters were trained with")
    missing = [f"{name}.pt" for name in modules
               if f"{name}.pt" not in files and f"{name}{DUPLICATE_SUFFIX}.pt" not in files]
    if missing:
        raise AdapterError(f"{folder} lacks {len(missing)} adapter file(s) this config needs: {_some(missing)}; "
                           f"the config (--config) must be the one the adapters were trained with")
    states = {}
    for name, module in modules.items():
        main = folder / f"{name}.pt"
        path, prefix = (main, "") if main.name in files else (folder / f"{name}{DUPLICATE_SUFFIX}.pt", "adp.")
        state = {prefix + k: v for k, v in _read(path).items()}
        wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if set(state) != set(wanted):
            extra, lacking = sorted(set(state) - set(wanted)), sorted(set(wanted) - set(state))
            raise AdapterError(f"{path} does not hold this adapter's weights"
                               f"{'; unknown keys: ' + _some(extra) if extra else ''}"
                               f"{'; missing keys: ' + _some(lacking) if lacking else ''}")
        for key, shape in wanted.items():
            if tuple(state[key].shape) != shape:
                raise AdapterError(f"{path}: {key} has shape {tuple(state[key].shape)}, the config needs {shape}; "
                                   f"mid_dim or the model config (--config) differs from training")
        states[name] = state
    return states


def _read(path: Path) -> dict[str, torch.Tensor]:
    state = load_pickle(path, AdapterError, "adapter file")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise AdapterError(f"{path} is not a state dict of tensors; it is not an adapter file")
    return state


def _some(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")
