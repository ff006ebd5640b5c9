"""Applying ControlNets to a render: which nets act at which step, with what weight, on which rows.

A request's `controls` are `ControlUnit`s (one per net: its file, its control image and settings).
`Control` runs them inside every UNet evaluation (`Pipeline._unet`): before each UNet input-half block
it runs the ControlNet blocks that mirror it (model/controlnet.py: the hint encoder before the first
input block), on every chunk of rows, each inside `Offloader.block` (so they stream block by block
with the UNet, `offload.unet_units`), and adds each zero-conv output, scaled, into the chunk's
`Carry.control` (the UNet's hook point: added to the skip connections as the output half takes
them, the last to the middle block's output). The residuals of several nets are summed
(diffusers' `MultiControlNetModel`).

Per net, as diffusers' `StableDiffusionControlNetPipeline` and the webui's extension:
- `weight` (diffusers' `controlnet_conditioning_scale`) scales every residual;
- `start`/`end` (diffusers' `control_guidance_start/end`): with N sampling steps, step i acts when
  i/N >= start and (i+1)/N <= end (N: the steps walked, after img2img's strength); an evaluation
  between two steps' sigmas (Heun, DPM2) belongs to the earlier step;
- `mode`: "balanced" runs the net on the unconditional and conditional rows (batched: once per
  evaluation for both); "prompt" (the webui's "My prompt is more important") scales residual k of
  n by 0.825 ** (n - 1 - k) (the webui's `0.825 ** (12 - i)` for SD 1.5's 13); "control" ("ControlNet
  is more important", diffusers' `guess_mode`) also runs the net on the conditional rows only, the
  unconditional ones getting nothing. diffusers' guess mode scales by `logspace(-1, 0, n)`, i.e.
  10 ** (-(n - 1 - k) / (n - 1)): 0.8254 ** (12 - k) for n = 13, within 0.6 % of the webui's.
A net that does not act at a step is not run (nor streamed: `Offloader.idle`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.controlnet import ControlCarry
from ..model.unet import Carry

CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "control": "ControlNet is more important"}  # ours -> the webui's label
SOFT_DECAY = 0.825  # the webui's per-depth factor of "My prompt / ControlNet is more important"
# How each front names a unit's fields in its one-line messages (`complete_controls`).
CLI_LABELS = {f"control_{k}": f"--control_{k}" for k in ("image", "weight", "start", "end", "mode", "preprocessor",
                                                          "low", "high", "resize")}
CLI_LABELS["control_model"] = "--controlnet"
UI_LABELS = {"control_model": "Model", "control_image": "an Image in the ControlNet panel",
             "control_weight": "Control Weight", "control_start": "Starting Control Step",
             "control_end": "Ending Control Step", "control_mode": "Control Mode",
             "control_preprocessor": "Preprocessor",
             "control_low": "Low Threshold", "control_high": "High Threshold", "control_resize": "Resize Mode"}


class ControlError(ValueError):
    """A ControlNet setting, file or image that cannot be used (one line); the callers raise it as the
    request's error (`RequestError`: this module sits below request.py, which plans with it)."""


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet of a request. `model`: a ControlNet file (or a name found in the ControlNet
    folders); `image`: the control image (a path or PIL image; `Request.complete` reads it);
    `preprocessor`, `low`, `high`: what makes the map from it (engine/control_images.py); `resize`:
    how it is brought to the render's size."""
    model: str | Path
    image: object = None
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    preprocessor: str = "none"
    low: int = 100
    high: int = 200
    resize: str = "crop and resize"
    image_name: str | None = None  # for the metadata; taken from a path


@dataclass
class ActiveNet:
    """A ControlNet loaded for a render: fragment name, module, hint (1, C, H, W) in [0, 1] on the host."""
    fragment: str
    net: torch.nn.Module
    hint: torch.Tensor
    unit: ControlUnit


class Control:
    """The ControlNets of one render, run inside each UNet evaluation (see the module docstring)."""

    def __init__(self, nets: list[ActiveNet], engine):
        self.nets = nets
        self.engine = engine  # the Offloader: block() for every ControlNet block, idle for the nets that rest
        self._timesteps = None  # (N,) the walked steps' DDPM timesteps, decreasing
        self._guided = True
        self._hints: dict[str, torch.Tensor] = {}  # fragment -> hint on the device, in the compute dtype
        self._run: list[tuple[ActiveNet, float]] = []  # this evaluation's acting nets and their weights
        self._carries: dict[str, list[tuple[Carry, ControlCarry | None, slice]]] = {}

    def begin(self, timesteps: torch.Tensor, guided: bool) -> None:
        """A sampling loop starts: its walked steps' timesteps (N,), and whether rows come as
        cat([uncond, cond]) (classifier-free guidance) or cond alone."""
        self._timesteps, self._guided = timesteps.float().cpu(), guided
        self._hints.clear()

    def step_of(self, t: float) -> int:
        """The index of the step an evaluation at DDPM timestep t belongs to."""
        return max(0, int((self._timesteps >= t - 1e-3).sum()) - 1)

    def weight(self, unit: ControlUnit, step: int) -> float:
        """The net's weight at `step` of N: 0 outside its window (diffusers' `controlnet_keep`)."""
        n = len(self._timesteps)
        keep = not (step / n < unit.start or (step + 1) / n > unit.end)
        return float(unit.weight) if keep else 0.0

    # ---- one evaluation -------------------------------------------------------------------------
    def evaluation(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, chunks: list[Carry],
                   unet_bs: int) -> None:
        """Set up the nets acting in this evaluation of rows x (N, C, h, w) at timesteps t (N,), cut
        into `chunks` of `unet_bs` rows: a `ControlCarry` per net and chunk on the rows it sees, and
        each chunk's `control` list to sum the residuals into."""
        step = 0 if t.is_meta else self.step_of(float(t[0]))  # planning: every net acts
        self._run = [(a, w) for a in self.nets for w in (self.weight(a.unit, step),) if w != 0.0]
        acting = {a.fragment for a, _ in self._run}
        self.engine.idle = {u for a in self.nets if a.fragment not in acting for u in self.engine.units[a.fragment]}
        self._carries.clear()
        if not self._run:
            return
        rows = x.shape[0]
        first_cond = rows // 2 if self._guided else 0
        for chunk in chunks:
            chunk.control = None
        for a, _ in self._run:
            hint = self._hint(a, x)
            carries = []
            for j, chunk in enumerate(chunks):
                lo, hi = j * unet_bs, min(rows, (j + 1) * unet_bs)
                if a.unit.mode == "control":  # the conditional rows only (diffusers' guess_mode)
                    lo = max(lo, first_cond)
                if lo >= hi:
                    carries.append((chunk, None, slice(0)))
                    continue
                inside = slice(lo - j * unet_bs, hi - j * unet_bs)  # those rows within the chunk
                carry = ControlCarry(x[lo:hi, :a.net.input_blocks[0][0].in_channels], context[lo:hi], t[lo:hi],
                                     hint=hint.expand(hi - lo, -1, -1, -1))
                carries.append((chunk, carry, inside))
            self._carries[a.fragment] = carries

    def _hint(self, a: ActiveNet, x: torch.Tensor) -> torch.Tensor:
        hint = self._hints.get(a.fragment)
        if hint is None or hint.dtype != x.dtype:
            hint = self._hints[a.fragment] = a.hint.to(x.device, x.dtype)
        return hint

    def steps_for(self, unet_step: str):
        """[(unit, run())] of the acting nets' blocks that go just before UNet input-half step
        `unet_step`, in run order (as `offload.unet_units` orders them)."""
        from ..model.controlnet import unet_step_of

        out = []
        for a, w in self._run:
            for name, step in a.net.steps():
                if unet_step_of(name) == unet_step:
                    out.append((f"{a.fragment}.{name}", self._runner(a, w, name, step)))
        return out

    def _runner(self, a: ActiveNet, weight: float, name: str, step):
        n = len(a.net.input_blocks) + 1  # residuals: one per skip connection, then the middle block's
        k = n - 1 if name == "middle_block" else int(name.split(".")[1]) if name.startswith("input_blocks.") else None
        scale = weight * (SOFT_DECAY ** (n - 1 - k) if k is not None and a.unit.mode != "balanced" else 1.0)

        def run():
            for chunk, carry, inside in self._carries[a.fragment]:
                if chunk.control is None:
                    chunk.control = [None] * n
                if carry is None:
                    continue
                step(carry)
                if k is not None:  # the block made residual k
                    self._add(chunk, k, carry.skips.pop() * scale, inside)
        return run

    @staticmethod
    def _add(chunk: Carry, k: int, residual: torch.Tensor, inside: slice) -> None:
        rows = chunk.h.shape[0]
        if inside.stop - inside.start == rows:
            full = residual
        else:  # some rows of the chunk get nothing from this net
            full = residual.new_zeros((rows, *residual.shape[1:]))
            full[inside] = residual
        chunk.control[k] = full if chunk.control[k] is None else chunk.control[k] + full

    def end_evaluation(self) -> None:
        self._carries.clear()
        self.engine.idle = set()


# ---- requests: checked once, for every front -----------------------------------------------------
def find_controlnet(model, dirs=()) -> Path:
    """A ControlNet file or diffusers folder: `model` as a path, else a file of that name (with or
    without its suffix) in `dirs` and the default ControlNet folder (models/ControlNet, the webui's)."""
    from ..custom.controlnet_file import SUFFIXES
    from ..model import paths

    path = Path(model)
    if path.exists():
        return path
    folders = [Path(d) for d in dirs] + [base / "models" / "ControlNet" for base in paths.bases()]
    for folder in folders:
        for candidate in [folder / path.name] + [folder / (path.name + s) for s in SUFFIXES]:
            if candidate.exists():
                return candidate
    where = ", ".join(str(f) for f in folders)
    raise ControlError(f"ControlNet not found: {model} (looked in {where}); give a path with --controlnet")


def controlnet_files(dirs=()) -> list[Path]:
    """The ControlNet files and diffusers folders in `dirs` and the default folder (the UI's picker)."""
    from ..custom.controlnet_file import SUFFIXES
    from ..model import paths

    found = []
    for folder in [Path(d) for d in dirs] + [base / "models" / "ControlNet" for base in paths.bases()]:
        if folder.is_dir():
            found += [p for p in sorted(folder.iterdir())
                      if (p.is_file() and p.suffix.lower() in SUFFIXES) or (p / "config.json").is_file()]
    return list(dict.fromkeys(found))


def complete_controls(r, cfg, labels: dict, read: bool = True):
    """`r` with each ControlUnit checked, its model found and (`read`) checked to be a ControlNet for
    this model, its image opened (RGB); a ControlError with one line for the first thing wrong, the
    fields named by `labels` (`CLI_LABELS` for the ones it lacks; the browser UI passes `UI_LABELS`)."""
    from dataclasses import replace as _replace

    from PIL import Image

    from ..custom.controlnet_file import ControlNetError, check_controlnet
    from .control_images import PREPROCESSORS, RESIZE_MODES
    from .inputs import InputError, open_image, to_rgb

    def L(name):
        return labels.get(f"control_{name}", CLI_LABELS[f"control_{name}"])

    if r.controls and (getattr(r, "hr_scale", None) or getattr(r, "hr_resize_x", 0) or getattr(r, "hr_resize_y", 0)):
        raise ControlError("the hires fix does not work with ControlNet yet; turn it off "
                           f"({labels.get('hires', 'its settings')}) or leave out the ControlNet")
    units = []
    for i, u in enumerate(r.controls):
        which = f"ControlNet {i}" if len(r.controls) > 1 else "ControlNet"
        if not str(u.model or "").strip():
            raise ControlError(f"{which} has no model; give {L('model')}")
        for name in ("weight", "start", "end"):
            v = getattr(u, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
                raise ControlError(f"{which}: {L(name)} must be a finite number, got {v!r}")
        if not 0 <= u.start < u.end <= 1:
            raise ControlError(f"{which}: {L('start')} {u.start} and {L('end')} {u.end} must satisfy "
                               "0 <= start < end <= 1 (fractions of the steps where the net acts)")
        if u.mode not in CONTROL_MODES:
            raise ControlError(f"{which}: unknown {L('mode')} {u.mode!r}; choose one of {', '.join(CONTROL_MODES)}")
        if u.preprocessor not in PREPROCESSORS:
            raise ControlError(f"{which}: unknown {L('preprocessor')} {u.preprocessor!r}; choose one of "
                               f"{', '.join(PREPROCESSORS)}")
        if u.resize not in RESIZE_MODES:
            raise ControlError(f"{which}: unknown {L('resize')} {u.resize!r}; choose one of "
                               f"{', '.join(RESIZE_MODES)}")
        for name in ("low", "high"):
            v = getattr(u, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 255:
                raise ControlError(f"{which}: {L(name)} must be a number from 0 to 255, got {v!r}")
        if u.image is None:
            raise ControlError(f"{which} needs a control image; give {L('image')}")
        name = u.image_name or (Path(u.image).name if isinstance(u.image, (str, Path)) else None)
        try:
            image = u.image if isinstance(u.image, Image.Image) else open_image(u.image, "control image")
            image = to_rgb(image)
        except InputError as e:
            raise ControlError(f"{which}: {e}") from None
        model = u.model if not read else find_controlnet(u.model)
        if read:
            try:
                check_controlnet(model, cfg.unet)
            except ControlNetError as e:
                raise ControlError(f"{which}: {e}") from None
        units.append(_replace(u, model=str(model), image=image, image_name=name, weight=float(u.weight),
                              start=float(u.start), end=float(u.end)))
    return _replace(r, controls=tuple(units))


def unit_map(u: ControlUnit, width: int, height: int):
    """The map (RGB image of the render's size) the net of `u` reads."""
    from .control_images import control_map

    return control_map(u.image, width, height, u.resize, u.preprocessor, u.low, u.high)


def control_metadata(r) -> dict:
    """`ControlNet 0: "Module: canny, Model: name [hash], Weight: 1.0, ..."` as the webui's extension
    writes its units (`ControlNetUnit.serialize`), one key per net."""
    from ..custom.controlnet_file import model_hash, weights_path
    from .control_images import RESIZE_MODES

    meta = {}
    for i, u in enumerate(r.controls):
        path = Path(u.model)
        try:
            digest = model_hash(weights_path(path)[0])
        except (OSError, ValueError):
            digest = "NOFILE"
        fields = {"Module": u.preprocessor, "Model": f"{path.stem} [{digest}]", "Weight": float(u.weight),
                  "Resize Mode": RESIZE_MODES[u.resize], "Processor Res": min(r.width, r.height),
                  "Threshold A": float(u.low), "Threshold B": float(u.high), "Guidance Start": float(u.start),
                  "Guidance End": float(u.end), "Pixel Perfect": False, "Control Mode": CONTROL_MODES[u.mode]}
        meta[f"ControlNet {i}"] = ", ".join(f"{k}: {v}" for k, v in fields.items())
    return meta


def place_nets(fragments: dict, nets: list[ActiveNet]) -> bool:
    """Put `nets` among the fragments as controlnet0, controlnet1, ... (the last request's taken out);
    whether the set changed (the offload engine must then be made anew)."""
    from .offload import control_fragments

    old = {n: fragments[n] for n in control_fragments(fragments)}
    new = {a.fragment: a.net for a in nets}
    if {n: id(m) for n, m in old.items()} == {n: id(m) for n, m in new.items()}:
        return False
    for n in old:
        del fragments[n]
    fragments.update(new)
    return True


class NetCache:
    """The engine's loaded ControlNets, kept while the next request names the same files."""

    def __init__(self):
        self._nets: dict[tuple, torch.nn.Module] = {}

    def nets(self, r, cfg, dtype, channels_last: bool) -> list[ActiveNet]:
        from ..custom.controlnet_file import ControlNetError, load_controlnet
        from .control_images import hint_tensor
    
        kept, out = {}, []
        for i, u in enumerate(r.controls):
            key = (str(u.model), i)
            net = self._nets.get(key)
            if net is None:
                try:
                    net = load_controlnet(u.model, cfg.unet, dtype)
                except ControlNetError as e:
                    raise ControlError(str(e)) from None
                if channels_last:
                    net.to(memory_format=torch.channels_last)
            kept[key] = net
            out.append(ActiveNet(f"controlnet{i}", net, hint_tensor(unit_map(u, r.width, r.height)), u))
        self._nets = kept
        return out


def controls_from_flags(models, images, weights=(), starts=(), ends=(), modes=(), preprocessors=(), lows=(),
                        highs=(), resizes=(), dirs=()) -> tuple[ControlUnit, ...]:
    """ControlUnits from repeatable flags: the i-th value of each belongs to the i-th net (missing:
    the default). More values of a flag than nets, or a net without an image, is a ControlError."""

    models, images = list(models or []), list(images or [])
    given = dict(weight=weights, start=starts, end=ends, mode=modes, preprocessor=preprocessors, low=lows,
                 high=highs, resize=resizes)
    if not models:
        extra = [f"--control_{k}" for k, v in given.items() if v] + (["--control_image"] if images else [])
        if extra:
            raise ControlError(f"{', '.join(extra)} given without --controlnet; add --controlnet PATH")
        return ()
    if len(images) != len(models):
        raise ControlError(f"{len(models)} --controlnet but {len(images)} --control_image: give one control image "
                           "per ControlNet, in the same order")
    for k, v in given.items():
        if v and len(v) > len(models):
            raise ControlError(f"{len(v)} --control_{k} for {len(models)} --controlnet; the i-th value belongs to "
                               "the i-th net")
    units = []
    for i, (model, image) in enumerate(zip(models, images)):
        settings = {k: v[i] for k, v in given.items() if v and i < len(v)}
        units.append(ControlUnit(str(find_controlnet(model, dirs)), image, **settings))
    return tuple(units)


def save_maps(r, folder: Path, stem: str) -> list[Path]:
    """Each net's map beside the images, `<stem>-control<i>.png` (never over an existing file)."""
    out = []
    for i, u in enumerate(r.controls):
        path, n = folder / f"{stem}-control{i}.png", 1
        while path.exists():
            path, n = folder / f"{stem}-control{i}-{n}.png", n + 1
        unit_map(u, r.width, r.height).save(path)
        out.append(path)
    return out
