"""The browser UI's page (gradio): widgets in, one `Engine.render`, files out.

A thin front like the CLI: each tab's controls become a `Request` (named with `UI_LABELS`, so a bad
value is refused with the same words as the CLI's, the field named as the page names it), the
server's one engine renders it, `outputs.RequestWriter` saves it exactly as the CLI does. Renders
take turns on the device: every Generate button shares one queue slot (`RENDER`), and gradio shows
the pages that wait their place in the queue. Interrupt stops this page's render between two steps
(`Engine.render`'s `cancel`); the images of the batches finished before are kept, the unfinished
batch writes nothing, and no grid is made.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import gradio as gr
import torch
from PIL import Image

from ..engine.customize import lora_names, with_tag
from ..engine.engine import Cancelled, Engine, RunStats, memory_line
from ..outputs.images import OutputError, ensure_writable
from ..outputs.infotext import WEBUI_SAMPLERS, parse, read_parameters, request_fields
from ..outputs.writer import RequestWriter, metadata
from . import ui_controlnet
from .jobs import Jobs
from ..engine.request import (MEMORY_MODES, UI_LABELS as L, WATERMARK, Request, RequestError, given_watermark,
                              with_defaults)
from ..sampling.samplers import SAMPLERS

RENDER = "render"  # the concurrency id every render shares: one at a time on the device
TABS = {"txt2img": "txt2img", "img2img": "img2img", "inpaint": "Inpainting", "info": "PNG info"}
# The request fields a `parameters` text fills in a tab (`infotext.request_fields`), in this order.
FILLED = ("prompt", "negative_prompt", "sampler", "karras", "steps", "scale", "width", "height", "seed", "strength",
          "clip_skip", "pad_conds", "prompt_syntax")


@dataclass
class Controls:
    """One tab's widgets (`image`, `mask`, `strength` only where the kind takes them)."""
    kind: str
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    sampler: gr.Dropdown
    karras: gr.Checkbox
    steps: gr.Number
    scale: gr.Number
    width: gr.Number
    height: gr.Number
    seed: gr.Number
    n_iter: gr.Number
    n_samples: gr.Number
    memory: gr.Dropdown
    lora: gr.Dropdown = None  # picks a LoRA: its <lora:NAME:1> tag is added to the prompt
    embedding: gr.Dropdown = None  # picks an embedding: its name is added to the prompt
    strength: gr.Slider | None = None
    image: gr.Image | gr.ImageMask | None = None
    mask: gr.Image | None = None
    generate: gr.Button = None
    interrupt: gr.Button = None
    gallery: gr.Gallery = None
    parameters: gr.Textbox = None
    status: gr.Textbox = None
    saved: gr.State = None  # the run's file paths
    selected: gr.State = None  # the gallery index picked, or None
    send: dict = field(default_factory=dict)  # kind -> "Send to" button
    clip_skip: gr.Slider = None  # how the prompts are read (docs/prompts.md)
    pad_conds: gr.Checkbox = None
    prompt_syntax: gr.Dropdown = None
    watermark: gr.Textbox = None  # the invisible watermark's text; empty: none (outputs/watermark.py)
    hires: dict = field(default_factory=dict)  # txt2img's Hires. fix: Request field -> widget ("enable": on/off)
    preview_every: gr.Number = None  # live previews every N sampling steps (0: none)
    preview: gr.Image = None  # the image forming
    controlnet: list = field(default_factory=list)  # ui_controlnet.Unit per ControlNet unit

    def inputs(self) -> set:
        """The widgets whose values make a request (`Studio.request` reads them by widget)."""
        return {x for x in (self.prompt, self.negative_prompt, self.sampler, self.karras, self.steps, self.scale,
                            self.width, self.height, self.seed, self.n_iter, self.n_samples, self.memory, self.strength,
                            self.image, self.mask, self.clip_skip, self.pad_conds, self.prompt_syntax, self.watermark,
                            self.preview_every, *self.hires.values(), *(w for u in self.controlnet for w in u.inputs()))
                if x is not None}

    def fillable(self) -> list[tuple[str, gr.components.Component]]:
        """(field, widget) of each `FILLED` field this tab has."""
        return [(name, getattr(self, name)) for name in FILLED if getattr(self, name) is not None]


class Studio:
    """The server's engine and what its pages ask of it: requests from widgets, renders, files."""

    def __init__(self, engine: Engine, outdirs: dict[str, str], memory: str = "default", controlnet_dirs=(),
                 watermark: str | None = None):
        self.engine, self.outdirs, self.memory = engine, outdirs, memory
        self.controlnet_dirs = tuple(controlnet_dirs)  # webui.py --controlnet_dir
        self.watermark = watermark  # webui.py --watermark: the Watermark boxes' and API requests' default payload
        self.jobs = Jobs()  # one render at a time on the engine: UI clicks and API requests (fronts/api.py) alike
        self._cancel: dict[str, threading.Event] = {}  # page (gradio session) -> its Interrupt
        self._previews: dict[str, Image.Image] = {}  # page -> the latest live preview not shown yet

    # ---- widgets -> request ----------------------------------------------------------------------
    def request(self, c: Controls, v: dict) -> Request:
        """The request a tab's widget values `v` ask for (seed -1 or empty: a random one)."""
        seed = v[c.seed]
        image = mask = None
        if c.kind == "img2img":
            image = v[c.image]
        elif c.kind == "inpaint":
            image, mask = editor_image_and_mask(v[c.image], v[c.mask])
        return Request(v[c.prompt], kind=c.kind, negative_prompt=v[c.negative_prompt] or "",
                       seed=None if seed is None or seed == -1 else seed, n_samples=v[c.n_samples],
                       n_iter=v[c.n_iter], sampler=v[c.sampler], karras=bool(v[c.karras]), steps=v[c.steps],
                       scale=v[c.scale], width=image_size(c, v[c.width]), height=image_size(c, v[c.height]),
                       strength=v[c.strength] if c.strength is not None else None, init_image=image, mask=mask,
                       memory=(v[c.memory] or "").strip(), **text_options(c, v), **hires_options(c, v),
                       controls=ui_controlnet.controls(c.controlnet, v),
                       watermark=given_watermark(v[c.watermark]) if c.watermark is not None else None)

    # ---- the render --------------------------------------------------------------------------
    def generate(self, c: Controls, v: dict, session: str, progress) -> tuple[list, list[str], str]:
        """Render a tab's request: (gallery items, saved paths, status text); a bad request is a
        one-line `gr.Error` on the page, and the server goes on serving. Waits for its turn (`jobs`)."""
        with self.jobs.turn(c.kind):
            return self._generate(c, v, session, progress)

    def _generate(self, c: Controls, v: dict, session: str, progress) -> tuple[list, list[str], str]:
        notes: list[str] = []
        cancel = self._cancel.setdefault(session, threading.Event())
        try:
            r = self.engine.complete(self.request(c, v), labels=ui_controlnet.LABELS, notify=notes.append)
            self.engine.plan(r)  # a budget too small for the size is refused before anything is made
            outdir = ensure_writable(self.outdirs[c.kind])
        except (RequestError, OutputError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        writer = RequestWriter(outdir, r, metadata(r, self.engine.spec, self.engine.checkpoint_hash))
        stats, saved, interrupted = RunStats(), [], False  # saved: (path, seed) of each image written
        try:
            def on_step(done, total):
                self.jobs.step(done, total)
                progress((done, total), desc="sampling")
            for batch in self.engine.render(r, on_step=on_step, cancel=lambda: cancel.is_set() or self.jobs.interrupted(),
                                            stats=stats, **self._preview_args(c, v, session)):
                saved += [(str(writer.add(item.image, item.seed, meta=item.meta)), item.seed) for item in batch]
                notes += [item.flagged_note for item in batch if item.flagged_note]
            writer.finish()
        except Cancelled:
            interrupted = True
        except (RequestError, OutputError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        except torch.cuda.OutOfMemoryError:
            raise gr.Error(f"out of GPU memory at {r.width}x{r.height}, even at {L['unet_bs']} 1 and one image at "
                           f"once; try {L['memory']} lowvram, a smaller budget or a smaller size",
                           print_exception=False) from None
        finally:
            cancel.clear()
        where, seeds = (writer.dir if saved else self.outdirs[c.kind]), f"seeds {r.seeds[0]}-{r.seeds[-1]}"
        if interrupted:
            done = f"interrupted: kept the {len(saved)} image(s) of the batches finished before, in {where}; no grid ({seeds})"
        else:
            done = f"wrote {len(saved)} image(s) and a grid to {where} in {stats.seconds:.1f} s ({seeds})"
        lines = notes + stats.notes() + [done, memory_line(stats.figures(self.engine.device, r.width, r.height)),
                         f"checkpoint reads since the server started: {self.engine.loads}"]
        return [(opened(p), f"seed {seed}") for p, seed in saved], [p for p, _ in saved], "\n".join(lines)

    def _preview_args(self, c: Controls, v: dict, session: str) -> dict:
        """`Engine.render`'s live-preview arguments for a tab's widgets: the batch's first image kept
        for the page's timer (`latest_preview`)."""
        every = v.get(c.preview_every) if c.preview_every is not None else 0
        self._previews.pop(session, None)
        if not every or every < 1:
            return {}
        return dict(on_preview=lambda p: self._previews.__setitem__(session, p.images[0]), preview_every=int(every))

    def latest_preview(self, session: str):
        """The page's newest live preview since it last asked, or no change."""
        image = self._previews.pop(session, None)
        return gr.update() if image is None else image

    def interrupt(self, session: str) -> None:
        if session in self._cancel:
            self._cancel[session].set()

    def closed(self, session: str) -> None:
        """A page closed: its render, if any, stops at the next step, and the page is forgotten."""
        event = self._cancel.pop(session, None)
        if event is not None:
            event.set()

    def pending(self, session: str) -> None:
        """A Generate click: a fresh Interrupt for this page (an old click stops nothing new)."""
        self._cancel.setdefault(session, threading.Event()).clear()


def image_size(c: Controls, value):
    """Width or height as the request takes it: 0 in an image tab means the image's (None)."""
    return None if c.kind != "txt2img" and value == 0 else value


def editor_image_and_mask(editor: dict | None, upload: Image.Image | None) -> tuple[Image.Image | None, Image.Image | None]:
    """The inpainting editor's image, and the mask: an uploaded mask if given, else the painted strokes
    (white where any brush layer is opaque at all, on black)."""
    if not editor or editor.get("background") is None:
        return None, upload
    image = editor["background"]
    if upload is not None:
        return image, upload
    mask = Image.new("L", image.size, 0)
    for layer in editor.get("layers") or []:
        if layer is not None:
            alpha = layer.convert("RGBA").getchannel("A").resize(image.size, Image.NEAREST)
            mask.paste(255, mask=alpha.point(lambda a: 255 if a else 0))
    return image, (mask if mask.getbbox() else None)


def fill(c: Controls, text: str | None) -> tuple[list, list[str]]:
    """Updates for `widgets(c)` from a `parameters` text (a field it lacks stays as it is; Hires. fix and
    the ControlNet units are set as the text says, on or off), and notes on what it holds that is not ours."""
    if not text:
        return [gr.update() for _ in widgets(c)], ["no parameters in this image"]
    fields, notes = request_fields(parse(text))
    updates = [gr.update(value=fields[name]) if name in fields else gr.update() for name, _ in c.fillable()]
    if c.hires:
        on = any(name.startswith("hr_") for name in fields)
        given = {"enable": on, **({"hr_resize_x": 0, "hr_resize_y": 0} if on else {}), **fields}
        updates += [gr.update(value=given[name]) if name in given else gr.update() for name in c.hires]
    updates += ui_controlnet.fill(c.controlnet, fields.get("controls", ()), notes)
    return updates, notes


def widgets(c: Controls) -> list:
    """The widgets `fill` sets, in its order."""
    return [*(widget for _, widget in c.fillable()), *c.hires.values(), *ui_controlnet.filled(c.controlnet)]


def controls(kind: str, defaults: Request, memory: str, loras: list[str] = (), embeddings: list[str] = (),
             lora_where: str = "", controlnet_dirs=()) -> Controls:
    """A tab's labelled widgets, at the model's defaults (`request.with_defaults`)."""
    size_info = None if kind == "txt2img" else "0: the image's, rounded down to a multiple of 8"
    prompt = gr.Textbox(label=L["prompt"], lines=2, placeholder="what to draw")
    negative = gr.Textbox(label=L["negative_prompt"], lines=1, placeholder="what to steer away from")
    with gr.Row():
        lora = gr.Dropdown(loras, value=None, label="Add LoRA", info="adds <lora:NAME:1> to the prompt (edit the weight "
                           "there)" if loras else "none found: put LoRA files in " + lora_where)
        embedding = gr.Dropdown(embeddings, value=None, label="Add embedding", info="adds its name to the prompt"
                                if embeddings else "none found: start the server with --embeddings DIR")
    image = mask = strength = None
    if kind == "img2img":
        image = gr.Image(label=L["init_image"], type="filepath", image_mode=None, format="png",
                         sources=["upload", "clipboard"], height=320)
    elif kind == "inpaint":
        image = gr.ImageMask(label=L["init_image"], type="pil", image_mode="RGBA", format="png",
                             sources=["upload", "clipboard"], layers=False, transforms=(), height=420,
                             brush=gr.Brush(default_size=4, colors=["#ffffff"], color_mode="fixed"))
        mask = gr.Image(label=L["mask"], type="pil", image_mode="L", format="png", height=160,
                        sources=["upload", "clipboard"])
    choices = [(label, name) for name, label in WEBUI_SAMPLERS.items() if name in SAMPLERS]
    with gr.Row():
        sampler = gr.Dropdown(choices, value=defaults.sampler, label=L["sampler"])
        karras = gr.Checkbox(label=L["karras"], value=False, info="Karras sigmas (k-samplers)")
    with gr.Row():
        steps = gr.Number(value=defaults.steps, label=L["steps"], precision=0)
        scale = gr.Number(value=defaults.scale, label=L["scale"])
    with gr.Row():
        width = gr.Number(value=defaults.width or 0, label=L["width"], precision=0, info=size_info)
        height = gr.Number(value=defaults.height or 0, label=L["height"], precision=0, info=size_info)
    with gr.Row():
        seed = gr.Number(value=-1, label=L["seed"], precision=0, info="-1: random; image i gets seed + i")
        if kind != "txt2img":
            strength = gr.Slider(0, 1, value=defaults.strength, step=0.01, label=L["strength"])
    with gr.Row():
        n_iter = gr.Number(value=defaults.n_iter, label=L["n_iter"], precision=0, info="batches, one after another")
        n_samples = gr.Number(value=defaults.n_samples, label=L["n_samples"], precision=0, info="images at once")
    memory_box = gr.Dropdown(list(MEMORY_MODES), value=memory, label=L["memory"], allow_custom_value=True,
                             info="or a device-memory budget such as 2G or 1536M")
    with gr.Row():
        clip_skip = gr.Slider(1, 12, value=defaults.clip_skip, step=1, label=L["clip_skip"],
                              info="the text encoder's N-th layer from the end (2 for most anime-style models)")
        pad_conds = gr.Checkbox(label=L["pad_conds"], value=defaults.pad_conds,
                                info="pad prompt and negative to the same chunk count")
        prompt_syntax = gr.Dropdown(["webui", "plain"], value=defaults.prompt_syntax, label=L["prompt_syntax"],
                                    info="webui: (word:1.4), [a:b:0.5], BREAK...; plain: brackets are text")
    c = Controls(kind, prompt, negative, sampler, karras, steps, scale, width, height, seed, n_iter, n_samples,
                 memory_box, lora, embedding, strength, image, mask)
    c.clip_skip, c.pad_conds, c.prompt_syntax = clip_skip, pad_conds, prompt_syntax
    c.preview_every = gr.Number(value=1, label="Live preview every N steps", precision=0, minimum=0,
                                info="0: none; a latent approximation, or TAESD when the server has --taesd")
    if kind == "txt2img":
        c.hires = hires_section()
    c.controlnet = ui_controlnet.panel(kind, controlnet_dirs)
    c.watermark = gr.Textbox(label=L["watermark"], value=defaults.watermark or "", placeholder=WATERMARK, max_lines=1,
                             info=f"invisible watermark (the reference script's: {WATERMARK}); empty: none")
    return c


def hires_section() -> dict:
    """txt2img's "Hires. fix" (engine/hires.py): its widgets by Request field, "enable" the checkbox."""
    from ..engine.hires import DEFAULT_DENOISE, UPSCALERS

    with gr.Accordion("Hires. fix", open=False):
        enable = gr.Checkbox(label="Hires. fix", value=False,
                             info="render at the size above, upscale, then an img2img pass at the larger size")
        with gr.Row():
            upscaler = gr.Dropdown([(label, name) for name, (_, label) in UPSCALERS.items()], value="latent",
                                   label=L["hr_upscaler"])
            scale = gr.Slider(1, 4, value=2, step=0.05, label=L["hr_scale"])
        with gr.Row():
            steps = gr.Number(value=0, label=L["hr_steps"], precision=0, info="0: the base steps")
            denoise = gr.Slider(0, 1, value=DEFAULT_DENOISE, step=0.01, label=L["hr_denoise"])
        with gr.Row():
            resize_x = gr.Number(value=0, label=L["hr_resize_x"], precision=0, info="0: by the scale")
            resize_y = gr.Number(value=0, label=L["hr_resize_y"], precision=0, info="0: by the scale")
    return dict(enable=enable, hr_upscaler=upscaler, hr_scale=scale, hr_steps=steps, hr_denoise=denoise,
                hr_resize_x=resize_x, hr_resize_y=resize_y)


def hires_options(c: Controls, v: dict) -> dict:
    """The Request's hires fields of a tab's widgets (none unless "Hires. fix" is ticked)."""
    if not c.hires or not v[c.hires["enable"]]:
        return {}
    whole = lambda x: int(x) if isinstance(x, float) and x.is_integer() else x  # noqa: E731 - a form's 2.0
    return {name: whole(v[w]) if name in ("hr_steps", "hr_resize_x", "hr_resize_y") else v[w]
            for name, w in c.hires.items() if name != "enable"}


def text_options(c: Controls, v: dict) -> dict:
    """The Request fields of the tab's prompt-reading widgets (clip skip, pad conds, syntax)."""
    if c.clip_skip is None:
        return {}
    skip = v[c.clip_skip]
    return dict(clip_skip=int(skip) if isinstance(skip, float) and skip.is_integer() else skip,
                pad_conds=bool(v[c.pad_conds]), prompt_syntax=v[c.prompt_syntax])


def results(c: Controls) -> None:
    """The tab's buttons, gallery, parameters and status."""
    with gr.Row():
        c.generate = gr.Button("Generate", variant="primary", scale=3)
        c.interrupt = gr.Button("Interrupt", variant="stop", scale=1)
    c.gallery = gr.Gallery(label="Results", format="png", columns=4, height=360, object_fit="contain",
                           interactive=False)
    with gr.Row():
        c.send = {kind: gr.Button(f"Send to {TABS[kind]}", size="sm") for kind in ("img2img", "inpaint")}
    c.parameters = gr.Textbox(label="Parameters of the selected image", lines=3, interactive=False)
    c.status = gr.Textbox(label="Status", lines=4, interactive=False)
    c.preview = gr.Image(label="Live preview", type="pil", interactive=False, height=200, format="png")
    c.saved, c.selected = gr.State([]), gr.State(None)


def build(studio: Studio) -> gr.Blocks:
    """The page: txt2img, img2img, inpainting and PNG info tabs over `studio`."""
    spec = studio.engine.spec
    with gr.Blocks(title="optimizedSD", analytics_enabled=False) as page:
        model = spec.ckpt.name if spec.ckpt else "none"
        gr.Markdown(f"### optimizedSD · {model} on {spec.device}")
        tabs: dict[str, Controls] = {}
        with gr.Tabs() as tab_set:
            for kind in ("txt2img", "img2img", "inpaint"):
                with gr.Tab(TABS[kind], id=kind), gr.Row():
                    with gr.Column():
                        c = controls(kind, with_defaults(Request("", kind=kind, watermark=studio.watermark), spec.demo),
                                     studio.memory,
                                     lora_names(spec.custom.lora_dirs), [e.name for e in spec.custom.embeddings],
                                     " or ".join(str(d) for d in spec.custom.lora_dirs[:2]), studio.controlnet_dirs)
                    with gr.Column():
                        results(c)
                    tabs[kind] = c
            with gr.Tab(TABS["info"], id="info"):
                with gr.Row():
                    info_image = gr.Image(label="Image with parameters", type="filepath", image_mode=None,
                                          sources=["upload", "clipboard"], height=320)
                    with gr.Column():
                        info_text = gr.Textbox(label="Parameters", lines=8, interactive=False)
                        info_send = gr.Button("Send to txt2img")
                        info_notes = gr.Textbox(label="Notes", lines=2, interactive=False)
        for c in tabs.values():
            wire(studio, c, tabs, tab_set)

        def closed(request: gr.Request):
            studio.closed(request.session_hash)
        page.unload(closed)
        info_image.change(lambda path: image_parameters(path) if path else "", info_image, info_text,
                          queue=False, api_name="png_info")
        t = tabs["txt2img"]

        def send_text(text):
            updates, notes = fill(t, text)
            return [*updates, "\n".join(notes), gr.Tabs(selected="txt2img")]
        info_send.click(send_text, info_text, [*widgets(t), info_notes, tab_set], queue=False, api_visibility="private")
    return page


def image_parameters(path: str) -> str:
    with Image.open(path) as im:
        return read_parameters(im) or ""


def opened(path: str) -> Image.Image:
    """The image at `path`, read whole (its PNG text too, which gradio copies into the gallery's file)."""
    im = Image.open(path)
    im.load()
    return im


def wire(studio: Studio, c: Controls, tabs: dict[str, Controls], tab_set: gr.Tabs) -> None:
    """Generate, Interrupt, picking a result, and sending it to the image tabs."""
    inputs = c.inputs()

    def run(values: dict, request: gr.Request, progress=gr.Progress()):
        gallery, saved, status = studio.generate(c, values, request.session_hash, progress)
        return gallery, saved, status, None, ""

    def pending(request: gr.Request):
        studio.pending(request.session_hash)

    def interrupt(request: gr.Request):
        studio.interrupt(request.session_hash)

    # gradio_client sees /txt2img, /img2img, /inpaint, /png_info and /interrupt; the helpers are private
    c.generate.click(pending, None, None, queue=False, api_visibility="private").then(
        run, inputs, [c.gallery, c.saved, c.status, c.selected, c.parameters], concurrency_limit=1,
        concurrency_id=RENDER, show_progress_on=[c.gallery], api_name=c.kind)
    def preview(request: gr.Request):
        return studio.latest_preview(request.session_hash)

    timer = gr.Timer(1.0)  # the live preview: the newest image of this page's render, once a second
    timer.tick(preview, None, c.preview, queue=False, api_visibility="private", show_progress="hidden")
    ui_controlnet.wire(c.controlnet, c.width, c.height)
    c.interrupt.click(interrupt, None, None, queue=False,
                      **(dict(api_name="interrupt") if c.kind == "txt2img" else dict(api_visibility="private")))
    c.lora.input(lambda prompt, name: (with_tag(prompt, f"<lora:{name}:1>") if name else prompt, None),
                 [c.prompt, c.lora], [c.prompt, c.lora], queue=False, api_visibility="private")
    c.embedding.input(lambda prompt, name: (with_tag(prompt, name) if name else prompt, None),
                      [c.prompt, c.embedding], [c.prompt, c.embedding], queue=False, api_visibility="private")

    def select(saved, evt: gr.SelectData):
        return evt.index, image_parameters(saved[evt.index]) if evt.index < len(saved) else ""
    c.gallery.select(select, c.saved, [c.selected, c.parameters], queue=False, api_visibility="private")

    for kind, button in c.send.items():
        target = tabs[kind]

        def send(saved, selected, target=target, kind=kind):
            if not saved:
                raise gr.Error("no result to send yet; click Generate first", print_exception=False)
            path = saved[selected if selected is not None and selected < len(saved) else 0]
            updates, _ = fill(target, image_parameters(path))
            return [opened(path), *updates, gr.Tabs(selected=kind)]
        button.click(send, [c.saved, c.selected], [target.image, *widgets(target), tab_set], queue=False, api_visibility="private")
