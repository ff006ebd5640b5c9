"""Which model a run uses, resolved and checked before a single weight is read.

`resolve_model` turns what a front was told (a checkpoint path or none, a config, `--demo`, a device,
a precision) into a `ModelSpec`: the checkpoint file found, the config (9-channel when the checkpoint
is an inpainting one), the device checked, the weights' dtype. Everything wrong here is a
`RequestError` with one line. The engine (`engine.py`) then loads the spec once.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..model import paths
from ..model.config import ConfigError, SDConfig
from ..model.paths import CKPT_SUFFIXES, COMPVIS_CKPT, DEMO_CKPT, DEMO_CONFIG
from .customize import Customizations, request_loras, resolve_customizations
from .request import CLI_LABELS, Request, RequestError, complete



@dataclass(frozen=True)
class ModelSpec:
    ckpt: Path | None  # None: planning on `meta`, nothing is read
    cfg: SDConfig
    device: torch.device
    precision: str
    dtype: torch.dtype
    ema: bool = False
    demo: bool = False
    custom: Customizations = Customizations()  # VAE, adapters, embeddings, LoRA folders (customize.py)
    fp8: str | None = None  # "unet" or "all": those fragments' Linear/Conv2d weights stored in fp8 (model/fp8.py)

    @property
    def planning(self) -> bool:
        """Shape-only on `meta`: a CUDA run planned, no checkpoint read, no image made."""
        return self.device.type == "meta"

    @property
    def inpainting_unet(self) -> bool:
        """A 9-channel UNet (sd-v1-5-inpainting): it takes the mask and the masked image as input."""
        return self.cfg.unet.in_channels == 2 * self.cfg.channels + 1

    def complete(self, request: Request, labels: dict = CLI_LABELS,
                 notify: Callable[[str], None] = lambda message: None) -> Request:
        """`request` with this model's defaults filled in and checked (`request.complete`)."""
        if self.inpainting_unet and request.kind != "inpaint":
            name = self.ckpt.name if self.ckpt else "the model"
            raise RequestError(f"{name} is an SD v1 inpainting checkpoint (9-channel UNet): it can only inpaint; "
                               "use optimized_inpaint.py or the inpainting tab")
        if request.unet_bs is None:
            from .pipeline import default_unet_bs

            request = replace(request, unet_bs=default_unet_bs(self.device))
        request = complete(request, self.cfg, demo=self.demo, labels=labels, notify=notify)
        request_loras(request, self.cfg, self.custom.lora_dirs)  # every LoRA found, read and checked
        if request.controls:  # every ControlNet found and checked (read unless planning), its image opened
            from .control import ControlError, complete_controls

            try:
                request = complete_controls(request, self.cfg, labels, read=not self.planning)
            except ControlError as e:
                raise RequestError(str(e)) from None
        return request


def resolve_model(ckpt: str | Path | None = None, config: str | Path | None = None, *, demo: bool = False,
                  device: str | None = None, precision: str | None = None, ema: bool = False,
                  notify: Callable[[str], None] = lambda message: None, vae=None, adapter_path=None,
                  adapter_scale=None, embeddings=None, lora_dirs=None, fp8: str | None = None,
                  safety_checker=None, safety_blur=False) -> ModelSpec:
    """The model to load, found and checked (see the module docstring); nothing is loaded. Without a
    `precision`, the device's (`pipeline.default_precision`: upcast on GTX 16xx cards, said to `notify`).
    `vae`, `adapter_path`, `adapter_scale`, `embeddings`, `lora_dirs`: `customize.resolve_customizations`.
    `fp8`: "unet" or "all" (`check_fp8`)."""
    from .pipeline import PRECISIONS, default_precision, native_bf16, weight_dtype

    if demo:
        ckpt = ckpt or _demo_file(DEMO_CKPT)
        config = config or _demo_file(DEMO_CONFIG)
    try:
        cfg = SDConfig.from_yaml(config) if config else SDConfig()
    except ConfigError as e:
        raise RequestError(str(e)) from None
    device = resolve_device(device)
    check_fp8(fp8)
    if precision is None:
        precision, note = default_precision(device)
        if note:
            notify(note)
    if precision not in PRECISIONS:
        raise RequestError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if PRECISIONS[precision].cpu_only:
        if device.type != "cpu":
            raise RequestError(f"--precision {precision} runs on the CPU only, not on --device {device}; "
                               "use --precision autocast (fp16) or full there")
        if not native_bf16():
            notify("note: this CPU has neither AVX512-BF16 nor AMX: bf16 is emulated and may be slower than "
                   "--precision full")
    path = None if device.type == "meta" else find_checkpoint(ckpt)
    if path is not None:
        cfg = _with_checkpoint_unet(cfg, path)
    from ..model.tokenizer import VocabNotFoundError, get_tokenizer

    try:
        get_tokenizer()  # a missing CLIP vocabulary is an install problem, found before any output
    except VocabNotFoundError as e:
        raise RequestError(str(e)) from None
    cfg, custom = resolve_customizations(cfg, vae=vae, adapter_path=adapter_path, adapter_scale=adapter_scale,
                                         embeddings=embeddings, lora_dirs=lora_dirs, safety_checker=safety_checker,
                                         safety_blur=safety_blur)
    return ModelSpec(path, cfg, device, precision, weight_dtype(device, precision), ema, demo, custom, fp8)


def check_fp8(fp8: str | None) -> None:
    """--fp8's value: None (off), "unet" or "all" (`model.fp8.FP8_PARTS`), on a torch with float8 dtypes."""
    from ..model import fp8 as fp8_weights

    if fp8 is None:
        return
    if fp8 not in fp8_weights.FP8_PARTS:
        raise RequestError(f"--fp8 {fp8}: choose unet (the UNet's weights in fp8) or all (the text encoder's too); "
                           "the VAE always keeps the precision's dtype")
    if not fp8_weights.available():
        raise RequestError(f"--fp8 needs torch >= 2.1 with float8_e4m3fn; this torch {torch.__version__} has none: "
                           "upgrade torch or drop --fp8")


def _demo_file(path: Path) -> str:
    if not (paths.ROOT / path).is_file():
        raise RequestError(f"the demo model's {path} is missing from {paths.ROOT}; run python -m optimizedSD.tools.train_demo "
                           "to make it")
    return str(paths.ROOT / path)


def find_checkpoint(arg: str | Path | None) -> Path:
    """The checkpoint to load: `arg`, else the CompVis location, else the one file in weights/
    (the demo model aside), looked for under the working directory, then this checkout."""
    if arg:
        path = Path(arg)
        if not path.is_file():
            raise RequestError(f"checkpoint not found: {arg}; check the --ckpt path")
        return path
    for base in paths.bases():
        if (base / COMPVIS_CKPT).is_file():
            return base / COMPVIS_CKPT
    for base in paths.bases():
        found = sorted(p for p in (base / "weights").glob("*")
                       if p.suffix in CKPT_SUFFIXES and p.is_file() and p.name != DEMO_CKPT.name)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise RequestError(f"several checkpoints in {base / 'weights'} ({names}); pick one with --ckpt")
    raise RequestError(f"no checkpoint found: put sd-v1-4.ckpt (or a .safetensors file) in weights/ "
                       f"or at {COMPVIS_CKPT}, or pass --ckpt PATH (or --demo for the bundled demo model)")


def resolve_device(name: str | None) -> torch.device:
    """--device, checked to exist here; the best available one when None (cuda, mps, cpu)."""
    from .pipeline import pick_device

    try:
        device = pick_device(name)
    except RuntimeError as e:
        raise RequestError(f"unknown --device {name!r} ({e}); use cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RequestError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RequestError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RequestError(f"--device {name}: MPS is not available here; use --device cpu")
    if device.type not in ("cuda", "mps", "cpu", "meta"):
        raise RequestError(f"unsupported --device {name}; use cuda, cuda:N, mps, cpu or meta")
    return device


def _with_checkpoint_unet(cfg: SDConfig, ckpt: Path) -> SDConfig:
    """`cfg` with a 9-channel UNet when `ckpt` is an inpainting checkpoint (sd-v1-5-inpainting)."""
    from ..model.checkpoint import CheckpointError, checkpoint_shapes, detect_family

    try:
        family = detect_family(checkpoint_shapes(ckpt))
    except CheckpointError as e:
        raise RequestError(str(e)) from None
    if family == "sd-v1-inpainting":
        return replace(cfg, unet=replace(cfg.unet, in_channels=2 * cfg.channels + 1))
    return cfg
