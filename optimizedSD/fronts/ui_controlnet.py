"""The browser UI's ControlNet panel: its widgets, and the `ControlUnit`s they ask for.

Labelled as the webui's ControlNet extension (sd-webui-controlnet) labels its units: an accordion
"ControlNet" with "ControlNet Unit 0" and "ControlNet Unit 1", each with "Enable", an image upload,
"Preprocessor", "Model" (the ControlNet files in the server's ControlNet folders,
`control.controlnet_files`), "Control Weight", "Starting Control Step", "Ending Control Step",
canny's "Low Threshold" / "High Threshold", "Control Mode" and "Resize Mode". "Preview" shows the map
the net will read, made by the engine's own `control_images.control_map` at the tab's size.

A ticked unit becomes one `ControlUnit` of `Request.controls`, as the CLI's `--controlnet` flags do
(`control.controls_from_flags`); the engine checks it (`control.complete_controls`, with the page's
labels: `LABELS`), so the page holds no rule of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..engine.control import CONTROL_MODES, ControlUnit, UI_LABELS as CONTROL_LABELS, controlnet_files
from ..engine.control_images import PREPROCESSOR_LABELS, PREPROCESSORS, RESIZE_MODES, control_map
from ..engine.inputs import InputError, open_image, to_rgb
from ..engine.request import UI_LABELS

UNITS = 2  # ControlNet Unit 0 and Unit 1
LABELS = {**UI_LABELS, **CONTROL_LABELS}  # the page's field names in the engine's messages
DEFAULTS = ControlUnit(model="")


@dataclass
class Unit:
    """One ControlNet unit's widgets."""
    enable: gr.Checkbox
    image: gr.Image
    preprocessor: gr.Dropdown
    model: gr.Dropdown
    weight: gr.Slider
    start: gr.Slider
    end: gr.Slider
    low: gr.Slider
    high: gr.Slider
    mode: gr.Radio
    resize: gr.Radio
    run_preview: gr.Button
    preview: gr.Image

    def inputs(self) -> list:
        """The widgets a render reads."""
        return [self.enable, self.image, self.preprocessor, self.model, self.weight, self.start, self.end,
                self.low, self.high, self.mode, self.resize]


def panel(kind: str, dirs=()) -> list[Unit]:
    """The "ControlNet" accordion of a tab: `UNITS` units, the model picker listing `dirs` and the
    default ControlNet folder."""
    models = [(p.name, str(p)) for p in controlnet_files(dirs)]
    where = " or ".join(str(d) for d in [*dirs, "models/ControlNet"][:2])
    units = []
    with gr.Accordion("ControlNet", open=False, elem_id=f"{kind}-controlnet"):
        for i in range(UNITS):
            with gr.Accordion(f"ControlNet Unit {i}", open=i == 0, elem_id=f"{kind}-controlnet-{i}"):
                units.append(unit(models, where))
    return units


def unit(models: list, where: str) -> Unit:
    d = DEFAULTS
    enable = gr.Checkbox(label="Enable", value=False)
    with gr.Row():
        image = gr.Image(label="Image", type="filepath", image_mode=None, format="png", height=200,
                         sources=["upload", "clipboard"])  # the uploaded file itself, read by the engine
        preview = gr.Image(label="Preprocessor Preview", type="pil", format="png", height=200, interactive=False)
    with gr.Row():
        preprocessor = gr.Dropdown([(PREPROCESSOR_LABELS[p], p) for p in PREPROCESSORS], value=d.preprocessor,
                                   label="Preprocessor")
        model = gr.Dropdown(models, value=None, label="Model",
                            info=None if models else f"none found: put ControlNet files in {where}")
        run_preview = gr.Button("Preview", size="sm")
    with gr.Row():
        weight = gr.Slider(0, 2, value=d.weight, step=0.05, label="Control Weight")
        start = gr.Slider(0, 1, value=d.start, step=0.01, label="Starting Control Step")
        end = gr.Slider(0, 1, value=d.end, step=0.01, label="Ending Control Step")
    with gr.Row():
        low = gr.Slider(1, 255, value=d.low, step=1, label="Low Threshold", info="canny")
        high = gr.Slider(1, 255, value=d.high, step=1, label="High Threshold", info="canny")
    mode = gr.Radio([(label, name) for name, label in CONTROL_MODES.items()], value=d.mode, label="Control Mode")
    resize = gr.Radio([(label, name) for name, label in RESIZE_MODES.items()], value=d.resize, label="Resize Mode")
    return Unit(enable, image, preprocessor, model, weight, start, end, low, high, mode, resize, run_preview, preview)


def controls(units: list[Unit], v: dict) -> tuple[ControlUnit, ...]:
    """`Request.controls` of the ticked units, one `ControlUnit` each (checked by the engine)."""
    return tuple(ControlUnit(v[u.model] or "", v[u.image], weight=v[u.weight], start=v[u.start], end=v[u.end],
                             mode=v[u.mode], preprocessor=v[u.preprocessor], low=whole(v[u.low]),
                             high=whole(v[u.high]), resize=v[u.resize])
                 for u in units if v[u.enable])


FILLED = ("enable", "preprocessor", "model", "weight", "start", "end", "low", "high", "mode", "resize")


def filled(units: list[Unit]) -> list:
    """The widgets `fill` sets, in its order: `FILLED` of each unit (not its image, which no PNG holds)."""
    return [getattr(u, name) for u in units for name in FILLED]


def fill(units: list[Unit], given: tuple[ControlUnit, ...], notes: list[str]) -> list:
    """Updates for `filled(units)` from the `ControlUnit`s a PNG's parameters give (`infotext.request_fields`):
    unit i shows the i-th, ticked, its model picked by name from the Model list; the units past them are
    unticked. A model that is not in the list, and units past the page's, are added to `notes`."""
    updates = []
    for i, u in enumerate(units):
        if i >= len(given):
            updates += [gr.update(value=False), *(gr.update() for _ in FILLED[1:])]
            continue
        g = given[i]
        paths = [value for _, value in u.model.choices if Path(value).stem == g.model or Path(value).name == g.model]
        if not paths:
            notes.append(f"ControlNet {i}: model {g.model!r} is not in the Model list; pick one (the server's "
                         "ControlNet folders)")
        values = {name: getattr(g, name) for name in FILLED[1:]} | {"enable": True, "model": paths[0] if paths else None}
        updates += [gr.update(value=values[name]) for name in FILLED]
    notes += [f"ControlNet {i}: the page has {len(units)} units; left out" for i in range(len(units), len(given))]
    return updates


def whole(x):
    """A slider's 100.0 as the CLI's 100 (the metadata writes thresholds as floats either way)."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def preview(path, preprocessor: str, low, high, resize: str, width, height):
    """The map of a unit's image at the tab's size (0: the image's own), as the engine makes it."""
    if path is None:
        raise gr.Error("upload an Image to this ControlNet unit first", print_exception=False)
    try:
        image = to_rgb(open_image(path, "control image"))
        w, h = int(width or 0) or image.width, int(height or 0) or image.height
        return control_map(image, w, h, resize, preprocessor, whole(low), whole(high))
    except (InputError, ValueError) as e:
        raise gr.Error(str(e), print_exception=False) from None


def wire(units: list[Unit], width: gr.Number, height: gr.Number) -> None:
    """Each unit's "Preview" button: the map at the tab's Width and Height."""
    for u in units:
        inputs = [u.image, u.preprocessor, u.low, u.high, u.resize, width, height]
        u.run_preview.click(preview, inputs, u.preview, queue=False, api_visibility="private")
