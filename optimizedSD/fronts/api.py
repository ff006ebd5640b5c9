"""AUTOMATIC1111's `/sdapi/v1` HTTP API on the server's one engine (`webui.py --api`, `--nowebui`).

A thin front like the CLI and the browser UI: a JSON body (`api_models`: the webui's field names and
defaults) becomes the same `Request` the other fronts build, the `ui.Studio`'s engine renders it in its
turn (`jobs.Jobs`: one queue for UI clicks and API requests), `outputs.RequestWriter` encodes the PNGs
(and saves them with `save_images`) exactly as the CLI writes them. Errors come as the webui gives them:
a field of the wrong type 422 (pydantic's `detail` names it), a value the engine refuses 422 naming the
field (`API_LABELS`), an unknown sampler or model 404, a body past `--api-max-body` 413 before it is read
whole, an image past the pixel limit 422. Names in requests resolve only inside their folders: a model
is one of the files listed in `--ckpt_dir` (no `..`, absolute path or link out), a ControlNet one of the
server's ControlNet folders' (`--controlnet_dir`, models/ControlNet), LoRA tags as `custom.lora.find_lora`
resolves them. Images are written only under the server's output folders.

The hires fix comes as the webui's `enable_hr` fields (`hires_fields`), ControlNet as the sd-webui-controlnet
extension's `alwayson_scripts: {"controlnet": {"args": [unit, ...]}}` (`Api.control_units`), with its
`/controlnet/model_list` and `/controlnet/module_list`.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image, ImageOps
from pydantic import ValidationError

from ..engine.control import CONTROL_MODES, ControlUnit, control_metadata, controlnet_files
from ..engine.control_images import PREPROCESSOR_LABELS, PREPROCESSORS, RESIZE_MODES
from ..engine.customize import lora_names
from ..engine.hires import UPSCALERS, hires_metadata, wanted
from ..engine.engine import Cancelled, Engine
from ..engine.inputs import MAX_INPUT_PIXELS, InputError, open_image
from ..engine.request import Request, RequestError, given_watermark
from ..engine.spec import resolve_model
from ..model.paths import CKPT_SUFFIXES, DEMO_CONFIG, ROOT, bases, is_inside, name_problem
from ..outputs.images import OutputError, ensure_writable
from ..outputs.infotext import WEBUI_SAMPLERS, our_sampler, parse, read_parameters, webui_sampler
from ..outputs.writer import RequestWriter, metadata
from ..sampling.samplers import SAMPLERS, takes_noise
from . import api_models as m
from .api_models import API_LABELS, CONTROL_LABELS

PREFIX = "/sdapi/v1"
DEFAULT_CKPT_DIR = Path("models/Stable-diffusion")  # the webui's
DEFAULT_MAX_BODY = 50 * 2 ** 20
SCHEDULERS = [m.SchedulerItem(name="automatic", label="Automatic", default_rho=-1, need_inner_model=False),
              m.SchedulerItem(name="karras", label="Karras", default_rho=7.0, need_inner_model=False)]
# The webui's other schedules: accepted, and the sampler's own schedule used with a warning.
OTHER_SCHEDULERS = {"uniform", "exponential", "polyexponential", "sgm_uniform", "kl_optimal", "align_your_steps",
                    "simple", "normal", "ddim", "beta"}
HIRES_DENOISE = 0.75  # the webui's txt2img `denoising_strength` default (StableDiffusionProcessingTxt2Img)
# The ControlNet extension's labels besides ours (engine/control.py, control_images.py): its resize modes by
# number (`resize_mode_from_value`: 3, the old "Just Resize (Latent upscale)", is Just Resize) and its old
# names, its control modes by number.
CONTROL_RESIZE_ALIASES = {"inner fit (scale to fit)": "crop and resize", "scale to fit (inner fit)": "crop and resize",
                          "outer fit (shrink to fit)": "resize and fill", "envelope (outer fit)": "resize and fill"}
CONTROL_RESIZE_NUMBERS = {0: "just resize", 1: "crop and resize", 2: "resize and fill", 3: "just resize"}
CONTROL_MODE_NUMBERS = {0: "balanced", 1: "prompt", 2: "control"}
CANNY_SLIDERS = ((1, 255, 100, "Low Threshold"), (1, 255, 200, "High Threshold"))  # the extension's canny


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit:,} bytes (--api-max-body); send smaller images")


class BodyLimit:
    """ASGI middleware: a body past `limit` bytes is a 413. A declared Content-Length past it is refused
    before a byte of the body is read; a chunked body is counted as it streams and refused on the chunk
    that passes the limit. Either way the body is never held whole (the rest is read and dropped, up to
    `drain` bytes, so the client, still sending, reads the answer; past that the connection is closed)."""

    def __init__(self, app, limit: int, drain: int = 256 * 2 ** 20):
        self.app, self.limit, self.drain = app, limit, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            declared = int(declared) if declared is not None else None
        except ValueError:
            declared = None
        if declared is not None and declared > self.limit:
            if declared <= self.drain:
                await self._discard(receive)
            return await self._refuse(send)
        received, started = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    @staticmethod
    async def _discard(receive):
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    async def _refuse(self, send):
        body = json.dumps(error_body(BodyTooLarge(self.limit))).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def error_body(e: Exception, field: str | None = None) -> dict:
    """The webui's error JSON (`api_middleware.handle_exception`), and the field when one is to blame."""
    detail = getattr(e, "detail", str(e))
    body = {"error": type(e).__name__, "detail": detail, "body": "", "errors": str(detail)}
    if field:
        body["field"] = field
    return body


_CONTROL_MESSAGE = re.compile(r"ControlNet(?: (\d+))?\b")  # how engine/control.py starts a unit's message


def field_of(message: str, control_args: list[str] = ()) -> str | None:
    """The API field an engine message names (`API_LABELS`): the one it mentions first. A ControlNet unit's
    message (`ControlNet 1: ...`) names `alwayson_scripts.controlnet.args[i]` and the field it mentions
    (`CONTROL_LABELS`); `control_args[n]` is where the n-th enabled unit sits in the request."""
    unit = _CONTROL_MESSAGE.match(message)
    if unit and control_args:
        n = int(unit.group(1) or 0)
        where = control_args[n] if n < len(control_args) else "alwayson_scripts.controlnet.args"
        found = [(m.start(), label) for label in set(CONTROL_LABELS.values())
                 for m in [re.search(rf"(?<![\w.]){re.escape(label)}(?!\w)", message)] if m]
        return f"{where}.{min(found)[1]}" if found else where
    found = [(message.find(label), -len(label), label) for label in set(API_LABELS.values()) if label in message]
    return min(found)[2] if found else None


def refused(e: Exception, status: int = 422, control_args: list[str] = ()) -> HTTPException:
    """A request error as an HTTPException the handler answers with `error_body`."""
    err = HTTPException(status, str(e))
    err.field = field_of(str(e), control_args)
    return err


def bad_field(field: str, message: str) -> HTTPException:
    """A 422 for `field`, its message the one line to show."""
    err = HTTPException(422, message)
    err.field = field
    return err


def parse_credentials(text: str | None, flag: str) -> list[tuple[str, str]]:
    """`user:pass[,user2:pass2]` (the webui's --api-auth / --gradio-auth) -> [(user, pass)]."""
    if not text:
        return []
    out = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not (sep and user and password):
            raise RequestError(f"{flag} takes USER:PASS[,USER2:PASS2], each name and password non-empty")
        out.append((user, password))
    return out


@dataclass(frozen=True)
class Checkpoint:
    name: str  # path relative to the checkpoint folder, with `/`
    path: Path

    @property
    def model_name(self) -> str:  # the webui's: the name without suffix, folders joined with _
        return Path(self.name.replace("/", "_")).stem

    @property
    def config(self) -> Path | None:
        """A YAML beside the checkpoint with its name (as the webui finds one), or None."""
        yaml = self.path.with_suffix(".yaml")
        return yaml if yaml.is_file() else None


class Api:
    """The routes of `/sdapi/v1` over a `ui.Studio` (its engine, output folders, memory mode and jobs).

    `model_args`: `resolve_model`'s arguments besides the checkpoint (config, device, customizations), for
    switching `sd_model_checkpoint`; `flags`: what `/cmd-flags` shows (secrets are masked)."""

    def __init__(self, studio, *, ckpt_dir: str | Path = DEFAULT_CKPT_DIR, model_args: dict | None = None,
                 flags: dict | None = None, credentials: list[tuple[str, str]] = (), max_body: int = DEFAULT_MAX_BODY):
        self.studio = studio
        self.ckpt_dir = Path(ckpt_dir)
        self.model_args = dict(model_args or {})
        self.flags = {k: ("***" if "auth" in k and v else v) for k, v in (flags or {}).items()}
        self.credentials = [(u.encode(), p.encode()) for u, p in credentials]
        self.max_body = max_body
        self.clip_skip = 1
        self.stored: dict[str, Any] = {}  # options we keep for the round trip but do not use
        self._switch = threading.Lock()

    # ---- the app ------------------------------------------------------------------------------
    def app(self) -> FastAPI:
        app = FastAPI(title="optimizedSD: the webui's /sdapi/v1", docs_url="/docs", redoc_url=None)
        app.add_middleware(BodyLimit, limit=self.max_body)
        app.include_router(self.router())
        app.include_router(self.controlnet_router())

        @app.exception_handler(HTTPException)
        async def http_error(request: HttpRequest, e: HTTPException):
            return JSONResponse(error_body(e, getattr(e, "field", None)), status_code=e.status_code,
                                headers=getattr(e, "headers", None))

        @app.exception_handler(Exception)
        async def other_error(request: HttpRequest, e: Exception):  # the server goes on serving
            print(f"API error: {request.method} {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr)
            return JSONResponse(error_body(e), status_code=500)
        return app

    def router(self) -> APIRouter:
        r = APIRouter(prefix=PREFIX, dependencies=[Depends(self.auth)] if self.credentials else [])
        r.add_api_route("/txt2img", self.txt2img, methods=["POST"], response_model=m.ImagesResponse)
        r.add_api_route("/img2img", self.img2img, methods=["POST"], response_model=m.ImagesResponse)
        r.add_api_route("/progress", self.progress, methods=["GET"], response_model=m.ProgressResponse)
        r.add_api_route("/interrupt", self.interrupt, methods=["POST"])
        r.add_api_route("/skip", self.skip, methods=["POST"])
        r.add_api_route("/options", self.get_options, methods=["GET"])
        r.add_api_route("/options", self.set_options, methods=["POST"])
        r.add_api_route("/sd-models", self.sd_models, methods=["GET"], response_model=list[m.SDModelItem])
        r.add_api_route("/samplers", self.samplers, methods=["GET"], response_model=list[m.SamplerItem])
        r.add_api_route("/schedulers", self.schedulers, methods=["GET"], response_model=list[m.SchedulerItem])
        r.add_api_route("/loras", self.loras, methods=["GET"], response_model=list[m.LoraItem])
        r.add_api_route("/embeddings", self.embeddings, methods=["GET"], response_model=m.EmbeddingsResponse)
        r.add_api_route("/sd-vae", self.sd_vae, methods=["GET"], response_model=list[m.SDVaeItem])
        r.add_api_route("/cmd-flags", self.cmd_flags, methods=["GET"])
        r.add_api_route("/memory", self.memory, methods=["GET"], response_model=m.MemoryResponse)
        r.add_api_route("/png-info", self.png_info, methods=["POST"], response_model=m.PNGInfoResponse)
        r.add_api_route("/refresh-checkpoints", self.refresh, methods=["POST"])
        r.add_api_route("/refresh-loras", self.refresh, methods=["POST"])
        r.add_api_route("/scripts", self.scripts, methods=["GET"])
        return r

    def controlnet_router(self) -> APIRouter:
        """The ControlNet extension's own routes (its scripts/api.py), beside /sdapi/v1."""
        r = APIRouter(prefix="/controlnet", dependencies=[Depends(self.auth)] if self.credentials else [])
        r.add_api_route("/version", self.controlnet_version, methods=["GET"])
        r.add_api_route("/model_list", self.controlnet_model_list, methods=["GET"], response_model=m.ControlNetModelList)
        r.add_api_route("/module_list", self.controlnet_module_list, methods=["GET"],
                        response_model=m.ControlNetModuleList)
        return r

    def auth(self, credentials: HTTPBasicCredentials | None = Depends(HTTPBasic(auto_error=False))) -> None:
        """HTTP basic auth against --api-auth; every pair compared, in constant time."""
        ok = False
        if credentials is not None:
            user, password = credentials.username.encode(), credentials.password.encode()
            for u, p in self.credentials:
                ok |= hmac.compare_digest(u, user) & hmac.compare_digest(p, password)
        if not ok:
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    # ---- models -------------------------------------------------------------------------------
    def checkpoints(self) -> list[Checkpoint]:
        """The checkpoint files of --ckpt_dir (a link leading out of it is left out), then the loaded one
        if it lies elsewhere."""
        out = []
        folder = self.ckpt_dir
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in CKPT_SUFFIXES and path.is_file() and is_inside(path, folder):
                    out.append(Checkpoint(path.relative_to(folder).as_posix(), path))
        loaded = self.studio.engine.spec.ckpt
        if loaded is not None and not any(c.path.resolve() == loaded.resolve() for c in out):
            out.append(Checkpoint(loaded.name, loaded))
        return out

    def title(self, c: Checkpoint) -> str:
        engine = self.studio.engine
        loaded = engine.spec.ckpt is not None and engine.spec.ckpt.resolve() == c.path.resolve()
        return f"{c.name} [{engine.checkpoint_hash}]" if loaded and engine.checkpoint_hash else c.name

    def find_checkpoint(self, name: str, field: str = "sd_model_checkpoint") -> Checkpoint:
        """The listed checkpoint `name` means (its title, name, name without suffix or model name)."""
        if not isinstance(name, str):
            raise refused(f"{field} must be text, got {name!r}")
        problem = name_problem(name.split(" [")[0])
        for c in ([] if problem else self.checkpoints()):
            if name in (self.title(c), c.name, c.name.rsplit(".", 1)[0], c.model_name, c.name.split(" [")[0]) or \
                    name.split(" [")[0] in (c.name, c.name.rsplit(".", 1)[0], c.model_name):
                return c
        why = f" ({field} {problem})" if problem else ""
        raise HTTPException(404, f"Model not found: {name!r}{why}; {field} names a file in {self.ckpt_dir} "
                                 "(GET /sdapi/v1/sd-models lists them)")

    def load(self, c: Checkpoint) -> None:
        """Make `c` the engine's model (call during a turn): a fresh engine, loaded; the old one is kept
        if this one fails."""
        engine = self.studio.engine
        if engine.spec.ckpt is not None and engine.spec.ckpt.resolve() == c.path.resolve():
            return
        args = dict(self.model_args)
        config = c.config or args.pop("config", None)
        args.pop("config", None)
        demo = c.path.resolve() == (ROOT / "weights" / "demo.safetensors").resolve() or (
            config is not None and Path(config).resolve() == (ROOT / DEMO_CONFIG).resolve())
        try:
            spec = resolve_model(c.path, config, demo=demo, **args)
            fresh = Engine(spec, notify=engine.notify)
            fresh.load()
        except RequestError as e:
            raise refused(f"sd_model_checkpoint {c.name}: {e}") from None
        self.studio.engine = fresh

    # ---- rendering ----------------------------------------------------------------------------
    def txt2img(self, body: m.Txt2ImgRequest) -> dict:
        return self._render("txt2img", body)

    def img2img(self, body: m.Img2ImgRequest) -> dict:
        if not body.init_images:
            raise HTTPException(404, "Init image not found; give init_images, a list of base64 images")
        return self._render("img2img", body)

    def _render(self, kind: str, body) -> dict:
        warnings = unsupported(kind, body)
        overrides = dict(body.override_settings or {})
        init = mask = None
        if kind == "img2img":  # decoded before waiting for the engine
            init = decode_image(body.init_images[0], "init_images")
            if len(body.init_images) > 1:
                warnings.append(f"init_images: only the first of {len(body.init_images)} is used")
            if body.mask:
                mask = decode_image(body.mask, "mask")
                if body.inpainting_mask_invert:
                    mask = ImageOps.invert(mask.convert("L"))
                kind = "inpaint"
        sampler, karras = self.sampler_of(body, warnings)
        hires = hires_fields(body, warnings) if kind == "txt2img" else {}
        controls, control_args = self.control_units(body, init, warnings)
        if body.width * body.height > MAX_INPUT_PIXELS:  # refused before it waits, let alone allocates
            raise refused(f"width {body.width} x height {body.height} is more than {MAX_INPUT_PIXELS:,} pixels; "
                          "ask for a smaller size")
        with self.studio.jobs.turn(kind, body.n_iter if isinstance(body.n_iter, int) else 1) as jobs:
            before = self.studio.engine.spec.ckpt
            try:
                clip_skip = self.apply_overrides(overrides, warnings)
                return self._render_turn(kind, body, jobs, init, mask, sampler, karras, clip_skip, warnings,
                                         dict(hires, controls=controls), control_args)
            finally:
                if body.override_settings_restore_afterwards and before is not None and \
                        self.studio.engine.spec.ckpt != before:
                    self.load(Checkpoint(before.name, before))

    def apply_overrides(self, overrides: dict, warnings: list[str]) -> int:
        """Apply a request's `override_settings` (its model loaded now); returns its clip skip."""
        clip_skip = self.clip_skip
        for key, value in overrides.items():
            if key == "sd_model_checkpoint":
                self.load(self.find_checkpoint(value, "override_settings.sd_model_checkpoint"))
            elif key == "CLIP_stop_at_last_layers":
                clip_skip = check_clip_skip(value, "override_settings.CLIP_stop_at_last_layers")
            else:
                warnings.append(f"override_settings.{key} ignored: not a setting of this server")
        return clip_skip

    def _render_turn(self, kind, body, jobs, init, mask, sampler, karras, clip_skip, warnings, extra: dict,
                     control_args: list[str]) -> dict:
        """Render in this turn: `extra` holds the Request's hires and ControlNet fields."""
        engine = self.studio.engine
        notes: list[str] = []
        seed = body.seed
        eta = 0.0
        if sampler == "ddim" and body.eta is not None:
            eta = body.eta
        elif body.eta not in (None, 1.0) and takes_noise(sampler):
            warnings.append(f"eta {body.eta} ignored: {body.sampler_name or body.sampler_index} adds its full noise (1)")
        request = Request(
            body.prompt, kind=kind, negative_prompt=body.negative_prompt or "", seed=None if seed == -1 else seed,
            n_samples=body.batch_size, n_iter=body.n_iter, sampler=sampler, karras=karras, steps=body.steps,
            scale=body.cfg_scale, eta=eta, width=body.width, height=body.height,
            strength=body.denoising_strength if kind != "txt2img" else None, init_image=init, mask=mask,
            memory=body.memory or self.studio.memory, unet_bs=body.unet_bs, clip_skip=clip_skip,
            watermark=self.studio.watermark if body.watermark is None else given_watermark(body.watermark), **extra)
        try:
            r = engine.complete(request, labels={**API_LABELS, **CONTROL_LABELS}, notify=notes.append)
            engine.plan(r)
            outdir = self.studio.outdirs["txt2img" if kind == "txt2img" else "img2img" if kind == "img2img" else "inpaint"]
            if body.save_images:
                ensure_writable(outdir)
        except (RequestError, OutputError) as e:
            raise refused(e, control_args=control_args) from None
        writer = RequestWriter(outdir, r, metadata(r, engine.spec, engine.checkpoint_hash))
        encoded: list[bytes] = []
        seeds: list[int] = []
        interrupted = False
        for it in range(r.n_iter):
            if jobs.interrupted():
                interrupted = True
                break
            jobs.batch(it)
            try:
                for batch in engine.render(r, on_step=jobs.step, cancel=jobs.cancelled, iterations=[it]):
                    for item in batch:
                        data = writer.writer.encode(item.image, item.seed, item.meta)
                        if body.save_images:
                            writer.add(item.image, item.seed, data=data)
                        if item.flagged_note:
                            notes.append(item.flagged_note)
                        encoded.append(data)
                        seeds.append(item.seed)
                        jobs.current_image = item.image
            except Cancelled:
                if jobs.skipped() and not jobs.interrupted():
                    jobs.clear_skip()
                    warnings.append(f"batch {it + 1} of {r.n_iter} skipped")
                    continue
                interrupted = True
                break
            except (RequestError, OutputError) as e:
                raise refused(e) from None
        if interrupted:
            warnings.append(f"interrupted: {len(encoded)} of {len(r.seeds)} image(s) finished")
        first = 0
        if body.save_images and not body.do_not_save_grid and not interrupted and len(encoded) > 1:
            grid = writer.finish()  # the webui returns the grid first when it saves one
            encoded.insert(0, grid.read_bytes())
            first = 1
        infotexts = [read_parameters(Image.open(io.BytesIO(data))) or "" for data in encoded]
        parameters = body.model_dump()
        if kind != "txt2img" and not body.include_init_images:
            parameters.update(init_images=None, mask=None)
        return dict(images=[base64.b64encode(d).decode() for d in encoded] if body.send_images else [],
                    parameters=parameters, info=json.dumps(self.info(r, body, seeds, infotexts, first, warnings + notes,
                                                                      clip_skip, jobs)))

    def info(self, r: Request, body, seeds, infotexts, first, warnings, clip_skip, jobs) -> dict:
        """The webui's `Processed.js()` of a run, and our `warnings`."""
        spec = self.studio.engine.spec
        n = len(seeds)
        vae = spec.custom.vae
        return dict(prompt=r.prompt, all_prompts=[r.prompt] * n, negative_prompt=r.negative_prompt,
                    all_negative_prompts=[r.negative_prompt] * n, seed=r.seed, all_seeds=seeds, subseed=-1,
                    all_subseeds=[-1] * n, subseed_strength=0, width=r.width, height=r.height,
                    sampler_name=webui_sampler(r.sampler), scheduler="Karras" if r.karras else "Automatic",
                    cfg_scale=r.scale, steps=r.steps, batch_size=r.n_samples, restore_faces=False,
                    face_restoration_model=None, sd_model_name=spec.ckpt.stem if spec.ckpt else None,
                    sd_model_hash=self.studio.engine.checkpoint_hash, sd_vae_name=vae.stem if vae else None,
                    sd_vae_hash=None, seed_resize_from_w=-1, seed_resize_from_h=-1,
                    denoising_strength=r.hr_denoise if wanted(r) else r.strength, extra_generation_params=extra_generation_params(r),
                    index_of_first_image=first,
                    infotexts=infotexts, styles=list(body.styles or []),
                    job_timestamp=jobs.snapshot()[2]["job_timestamp"], clip_skip=clip_skip,
                    is_using_inpainting_conditioning=r.kind == "inpaint" and spec.inpainting_unet,
                    version="optimizedSD", warnings=warnings)

    # ---- ControlNet (the sd-webui-controlnet extension's API) ------------------------------------
    def controlnet_dirs(self) -> list[Path]:
        """The ControlNet folders: webui.py's --controlnet_dir, then models/ControlNet (the webui's)."""
        dirs = [Path(d) for d in getattr(self.studio, "controlnet_dirs", ())]
        return list(dict.fromkeys(dirs + [b / "models" / "ControlNet" for b in bases()]))

    def controlnets(self) -> dict[str, Path]:
        """`name [hash]` (the extension's title: the webui's short hash) -> file or diffusers folder, of
        the ControlNet folders; an entry whose link leads out of its folder is left out."""
        from ..custom.controlnet_file import ControlNetError, model_hash, weights_path

        out = {}
        for path in controlnet_files(self.controlnet_dirs()):
            if not is_inside(path, path.parent):
                continue
            try:
                title = f"{path.stem if path.is_file() else path.name} [{model_hash(weights_path(path)[0])}]"
            except (OSError, ControlNetError):
                continue
            out.setdefault(title, path)
        return out

    def find_controlnet(self, name, field: str) -> Path:
        """The ControlNet `name` means: a title of `controlnets`, or its name alone (any case, as the
        extension's `cn_models_names`); a 422 naming `field` otherwise."""
        if not isinstance(name, str) or name.strip() in ("", "None"):
            raise bad_field(field, f"{field}: no ControlNet model given; name one of GET /controlnet/model_list")
        base = name.split(" [")[0].strip()
        problem = name_problem(base)
        found = {} if problem else self.controlnets()
        hit = found.get(name.strip()) or next((p for t, p in found.items() if t.split(" [")[0].lower() == base.lower()),
                                              None)
        if hit is None:
            why = f" (a name that {problem})" if problem else ""
            raise bad_field(field, f"{field}: ControlNet model not found: {name!r}{why}; name one of the server's "
                                   f"ControlNet folders ({', '.join(map(str, self.controlnet_dirs()))}), listed by GET "
                                   "/controlnet/model_list")
        return hit

    def control_units(self, body, init, warnings: list[str]) -> tuple[tuple[ControlUnit, ...], list[str]]:
        """(ControlUnits, where each sits in the request) of `alwayson_scripts`' controlnet units (the
        extension's shape; a unit not `enabled` is skipped, as there); other scripts are ignored with a
        warning. Every field is checked here or by the engine (`refused` names the unit's field)."""
        units, where = [], []
        for name, script in (body.alwayson_scripts or {}).items():
            if str(name).lower() != "controlnet":
                warnings.append(f"alwayson_scripts.{name} ignored: no such script here (only controlnet)")
                continue
            args = script.get("args") if isinstance(script, dict) else None
            if not isinstance(args, list):
                raise bad_field(f"alwayson_scripts.{name}.args", f"alwayson_scripts.{name} must be "
                                '{"args": [unit, ...]}, each unit an object of the ControlNet extension\'s fields')
            for i, arg in enumerate(args):
                field = f"alwayson_scripts.{name}.args[{i}]"
                if not isinstance(arg, dict):
                    raise bad_field(field, f"{field} must be an object of the ControlNet extension's unit fields "
                                           f"(enabled, image, module, model, weight, ...), got {type(arg).__name__}")
                try:
                    unit = m.ControlNetUnitRequest.model_validate(arg)
                except ValidationError as e:
                    raise RequestValidationError([{**err, "loc": ("body", "alwayson_scripts", name, "args", i,
                                                                  *err["loc"])}
                                                  for err in e.errors(include_url=False, include_context=False)]) from None
                if unit.enabled:
                    units.append(self.control_unit(unit, field, body, init, warnings))
                    where.append(field)
        return tuple(units), where

    def control_unit(self, u: m.ControlNetUnitRequest, field: str, body, init, warnings: list[str]) -> ControlUnit:
        """One enabled unit as the engine's ControlUnit: its image decoded (img2img without one: the init
        image, as the extension), its model found in the ControlNet folders, its labels made ours."""
        image = u.image
        if isinstance(image, dict):
            image, mask = image.get("image"), image.get("mask")
        elif isinstance(image, list):
            image, mask = (image + [None, None])[:2]
        else:
            mask = u.mask
        if mask:
            warnings.append(f"{field}.mask ignored: the whole control image is used")
        if image in (None, "") and init is not None:
            decoded = init
        elif image in (None, ""):
            raise bad_field(f"{field}.image", f"{field}.image: ControlNet is enabled but no control image is given; "
                                              "send it base64")
        else:
            decoded = decode_image(image, f"{field}.image")
        module = {label.lower(): name for name, label in PREPROCESSOR_LABELS.items()}.get(u.module.strip().lower(),
                                                                                           u.module.strip().lower())
        if module not in PREPROCESSORS:
            raise bad_field(f"{field}.module", f"{field}.module {u.module!r} is not one of ours ("
                                               f"{', '.join(PREPROCESSORS)}); preprocess the image yourself and send "
                                               "the map with module none")
        resize = choice(u.resize_mode, {label.lower(): ours for ours, label in RESIZE_MODES.items()}
                        | CONTROL_RESIZE_ALIASES, CONTROL_RESIZE_NUMBERS, f"{field}.resize_mode", RESIZE_MODES.values())
        mode = choice(u.control_mode, {label.lower(): ours for ours, label in CONTROL_MODES.items()},
                      CONTROL_MODE_NUMBERS, f"{field}.control_mode", CONTROL_MODES.values())
        thresholds = {}
        if module == "canny":  # threshold_a/b, out of the slider's range (-1: unset) its default, as the extension
            for key, name, (low, high, default, _) in (("threshold_a", "low", CANNY_SLIDERS[0]),
                                                       ("threshold_b", "high", CANNY_SLIDERS[1])):
                value = getattr(u, key)
                thresholds[name] = value if low <= value <= high else default
                if thresholds[name] != value and value != -1:
                    warnings.append(f"{field}.{key} {value:g} is outside {low}-{high}: {default} used (the extension's)")
        if u.processor_res not in (-1, min(body.width, body.height)):
            warnings.append(f"{field}.processor_res {u.processor_res} ignored: the map is made at the render's size "
                            f"({body.width}x{body.height})")
        for key in ("advanced_weighting", "effective_region_mask", "ipadapter_input"):
            if (u.model_extra or {}).get(key) is not None:
                warnings.append(f"{field}.{key} ignored: not supported here")
        return ControlUnit(str(self.find_controlnet(u.model, f"{field}.model")), decoded, weight=u.weight,
                           start=u.guidance_start, end=u.guidance_end, mode=mode, preprocessor=module, resize=resize,
                           image_name=None, **thresholds)

    def controlnet_version(self) -> dict:
        return {"version": 3}  # the extension's API version whose unit fields these are

    def controlnet_model_list(self, update: bool = True) -> dict:
        return {"model_list": list(self.controlnets())}

    def controlnet_module_list(self, alias_names: bool = False) -> dict:
        names = [PREPROCESSOR_LABELS[p] if alias_names else p for p in PREPROCESSORS]
        sliders = {"canny": [dict(name=label, value=default, min=low, max=high, step=1)
                             for low, high, default, label in CANNY_SLIDERS]}
        return {"module_list": names, "module_detail": {
            PREPROCESSOR_LABELS[p] if alias_names else p: dict(model_free=True, sliders=sliders.get(p, []))
            for p in PREPROCESSORS}}

    def sampler_of(self, body, warnings: list[str]) -> tuple[str, bool]:
        """(our sampler, karras) of `sampler_name` (else `sampler_index`) and `scheduler`."""
        name = body.sampler_name or body.sampler_index or "Euler"
        hit = our_sampler(name)
        if hit is None or hit[0] not in SAMPLERS:
            labels = ", ".join(WEBUI_SAMPLERS[s] for s in WEBUI_SAMPLERS if s in SAMPLERS)
            err = HTTPException(404, f"Sampler not found: sampler_name {name!r}; choose one of {labels} "
                                     "(a k-sampler's label may end in ' Karras')")
            err.field = "sampler_name"
            raise err
        sampler, karras = hit
        schedule = (body.scheduler or "automatic").strip().lower()
        if schedule == "karras":
            karras = True
        elif schedule in OTHER_SCHEDULERS:
            warnings.append(f"scheduler {body.scheduler!r} is not one of ours (Automatic, Karras): the sampler's own used")
        elif schedule not in ("automatic", ""):
            err = HTTPException(422, f"unknown scheduler {body.scheduler!r}; choose automatic or karras")
            err.field = "scheduler"
            raise err
        return sampler, karras

    # ---- state --------------------------------------------------------------------------------
    def progress(self, skip_current_image: bool = False) -> dict:
        jobs = self.studio.jobs
        progress, eta, state = jobs.snapshot()
        image = jobs.current_image if state["job"] else None
        current = None
        if image is not None and not skip_current_image:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            current = base64.b64encode(buf.getvalue()).decode()
        return dict(progress=progress, eta_relative=eta, state=state, current_image=current, textinfo=None)

    def interrupt(self) -> dict:
        self.studio.jobs.interrupt()
        return {}

    def skip(self) -> None:
        self.studio.jobs.skip()

    def options(self) -> dict:
        engine = self.studio.engine
        current = next((c for c in self.checkpoints() if engine.spec.ckpt and c.path.resolve() == engine.spec.ckpt.resolve()), None)
        vae = engine.spec.custom.vae
        return {**self.stored, "sd_model_checkpoint": self.title(current) if current else None,
                "sd_checkpoint_hash": None, "sd_vae": vae.name if vae else "Automatic",
                "CLIP_stop_at_last_layers": self.clip_skip, "samples_format": "png", "return_grid": True,
                "enable_pnginfo": True, "eta_ddim": 0.0, "eta_ancestral": 1.0,
                "outdir_txt2img_samples": self.studio.outdirs["txt2img"],
                "outdir_img2img_samples": self.studio.outdirs["img2img"]}

    def get_options(self) -> dict:
        return self.options()

    def set_options(self, body: dict[str, Any]) -> None:
        """Set options: `sd_model_checkpoint` loads that model (404 if none of --ckpt_dir's),
        `CLIP_stop_at_last_layers` sets the clip skip; the others are kept for the round trip, or refused
        (422) where they would change what the server decided at start (output folders, format, VAE)."""
        fixed = self.options()
        for key in ("samples_format", "outdir_txt2img_samples", "outdir_img2img_samples", "sd_vae"):
            if key in body and body[key] != fixed[key] and not (key == "sd_vae" and body[key] in ("Automatic", "None")
                                                                  and fixed[key] == "Automatic"):
                err = HTTPException(422, f"option {key} is fixed when the server starts ({fixed[key]!r}); restart it "
                                         f"with another {'--vae' if key == 'sd_vae' else '--outdir'} to change it")
                err.field = key
                raise err
        clip_skip = self.clip_skip
        if "CLIP_stop_at_last_layers" in body:
            clip_skip = check_clip_skip(body["CLIP_stop_at_last_layers"], "CLIP_stop_at_last_layers")
        if "sd_model_checkpoint" in body:
            wanted = self.find_checkpoint(body["sd_model_checkpoint"])
            with self.studio.jobs.turn("load checkpoint"):
                self.load(wanted)
        self.clip_skip = clip_skip
        self.stored.update({k: v for k, v in body.items() if k not in fixed})
        return None

    def sd_models(self) -> list[dict]:
        return [dict(title=self.title(c), model_name=c.model_name, hash=self.title(c).partition(" [")[2][:-1] or None,
                     sha256=None, filename=str(c.path.resolve()), config=str(c.config) if c.config else None)
                for c in self.checkpoints()]

    def samplers(self) -> list[dict]:
        return [dict(name=label, aliases=[name, f"k_{name}"], options={})
                for name, label in WEBUI_SAMPLERS.items() if name in SAMPLERS]

    def schedulers(self) -> list:
        return SCHEDULERS

    def loras(self) -> list[dict]:
        from ..custom.lora import LoraError, find_lora

        dirs = self.studio.engine.spec.custom.lora_dirs
        out = []
        for name in lora_names(dirs):
            try:
                path = find_lora(name, dirs)
            except LoraError:  # a link out of the folders: not offered
                continue
            out.append(dict(name=name, alias=name, path=str(path), metadata={}))
        return out

    def embeddings(self) -> dict:
        loaded = {e.name: dict(shape=int(e.vectors.shape[-1]), vectors=int(e.vectors.shape[0]))
                  for e in self.studio.engine.spec.custom.embeddings}
        return dict(loaded=loaded, skipped={})

    def sd_vae(self) -> list[dict]:
        vae = self.studio.engine.spec.custom.vae
        return [dict(model_name=vae.name, filename=str(vae.resolve()))] if vae else []

    def cmd_flags(self) -> dict:
        return self.flags

    def memory(self) -> dict:
        import torch

        try:
            import psutil

            process = psutil.Process(os.getpid())
            rss, total = process.memory_info().rss, psutil.virtual_memory().total
            ram = dict(free=total - rss, used=rss, total=total)
        except Exception as e:  # noqa: BLE001 - reported, as the webui does
            ram = dict(error=str(e))
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            s = torch.cuda.memory_stats()
            cuda = dict(system=dict(free=free, used=total - free, total=total),
                        allocated=dict(current=s.get("allocated_bytes.all.current", 0),
                                       peak=s.get("allocated_bytes.all.peak", 0)),
                        reserved=dict(current=s.get("reserved_bytes.all.current", 0),
                                      peak=s.get("reserved_bytes.all.peak", 0)))
        else:
            cuda = dict(error="unavailable")
        return dict(ram=ram, cuda=cuda)

    def png_info(self, body: m.PNGInfoRequest) -> dict:
        image = decode_image(body.image.strip(), "image")
        text = read_parameters(image) or ""
        items = {k: v for k, v in image.info.items() if isinstance(v, (str, int, float)) and k != "parameters"}
        return dict(info=text, items=items, parameters=parse(text) if text else {})

    def refresh(self) -> None:
        """The model and LoRA folders are read on every request: nothing to refresh."""
        return None

    def scripts(self) -> dict:
        return dict(txt2img=[], img2img=[])


def check_clip_skip(value, field: str) -> int:
    """A clip skip from the options: a whole number (its upper bound is the model's, `request.check`)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise bad_field(field, f"{field} must be a whole number, 1 or more, got {value!r}")
    return value


def choice(value, labels: dict, numbers: dict, field: str, shown) -> str:
    """Ours for a label (any case) or its number, as the ControlNet extension takes them; a 422 otherwise."""
    ours = numbers.get(value) if isinstance(value, int) and not isinstance(value, bool) else \
        labels.get(str(value).strip().lower())
    if ours is None:
        by_number = ", ".join(str(n) for n in sorted(numbers) if n < 3)
        raise bad_field(field, f"unknown {field} {value!r}; choose one of {', '.join(shown)} (or {by_number})")
    return ours


def hires_fields(body, warnings: list[str]) -> dict:
    """The Request's hires fields of the webui's txt2img `enable_hr` fields (none when it is off, as the
    webui ignores them then): `hr_scale` (unless `hr_resize_x`/`hr_resize_y` is given, which wins there
    too), `hr_upscaler` by the webui's label (default Latent, its `latent_upscale_default_mode`),
    `hr_second_pass_steps`, `hr_resize_x/y`, and `denoising_strength` as the second pass's strength."""
    if not body.enable_hr:
        return {}
    labels = {label.lower(): ours for ours, (_, label) in UPSCALERS.items()} | {ours: ours for ours in UPSCALERS}
    name = body.hr_upscaler if body.hr_upscaler is not None else "Latent"
    upscaler = labels.get(str(name).strip().lower())
    if upscaler is None:
        raise bad_field("hr_upscaler", f"unknown hr_upscaler {name!r}; choose one of "
                                       f"{', '.join(label for _, label in UPSCALERS.values())}")
    if body.firstphase_width or body.firstphase_height:
        warnings.append("firstphase_width/firstphase_height ignored: the first pass renders at width x height")
    for key, same in (("hr_checkpoint_name", None), ("hr_sampler_name", body.sampler_name),
                      ("hr_scheduler", body.scheduler), ("hr_prompt", body.prompt),
                      ("hr_negative_prompt", body.negative_prompt)):
        value = getattr(body, key)
        if value not in (None, "", same):
            warnings.append(f"{key} ignored: the second pass uses the first pass's "
                            f"{key[3:].replace('_name', '').replace('_', ' ')}")
    resize = bool(body.hr_resize_x or body.hr_resize_y)
    return dict(hr_scale=None if resize else body.hr_scale, hr_upscaler=upscaler, hr_steps=body.hr_second_pass_steps,
                hr_denoise=HIRES_DENOISE if body.denoising_strength is None else body.denoising_strength,
                hr_resize_x=body.hr_resize_x, hr_resize_y=body.hr_resize_y)


def extra_generation_params(r: Request) -> dict:
    """The webui's `extra_generation_params` of a render: its hires and ControlNet infotext keys."""
    hires = {k: v for k, v in hires_metadata(r).items() if k not in ("strength", "size")}
    return {**hires, **(control_metadata(r) if r.controls else {})}


def decode_image(text: str, field: str) -> Image.Image:
    """A base64 image (a `data:image/...;base64,` URL too), refused (422, naming `field`) when it is not
    base64, not an image, or past the pixel limit (from its header, before it is decoded). URLs are
    not fetched."""
    if not isinstance(text, str):
        raise refused(f"{field} must be a base64 image, got {type(text).__name__}")
    if text.startswith(("http://", "https://", "file:")):
        err = refused(f"{field}: this server fetches no URLs; send the image itself, base64")
        err.field = field
        raise err
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)  # MIME-style line breaks allowed
        return open_image(data, field)
    except (binascii.Error, ValueError):
        err = refused(f"{field} is not base64; send the image file's bytes base64-encoded")
    except InputError as e:
        err = refused(f"{field}: {e}")
    err.field = field
    raise err


def unsupported(kind: str, body) -> list[str]:
    """A warning for each field whose value asks for something this server does not do (ignored)."""
    w = []

    def ignored(field, why):
        w.append(f"{field} ignored: {why}")
    if body.restore_faces:
        ignored("restore_faces", "no face restoration here")
    if body.tiling:
        ignored("tiling", "no tiling mode here")
    if body.styles:
        ignored("styles", "no saved styles here")
    if body.subseed_strength:
        ignored("subseed_strength", "no variation seeds here")
    if (body.seed_resize_from_w or 0) > 0 or (body.seed_resize_from_h or 0) > 0:
        ignored("seed_resize_from_w/h", "no seed resize here")
    if body.script_name:
        ignored("script_name", "no scripts here")
    if body.refiner_checkpoint:
        ignored("refiner_checkpoint", "no refiner here")
    for name, neutral in (("s_churn", 0), ("s_tmin", 0), ("s_tmax", 0), ("s_noise", 1), ("s_min_uncond", 0)):
        value = getattr(body, name)
        if value is not None and value != neutral and not (name == "s_tmax" and value in (float("inf"),)):
            ignored(name, "the samplers run with their defaults")
    if kind != "txt2img":
        if body.resize_mode:
            ignored("resize_mode", "the init image is resized to width x height (Lanczos), the webui's 'Just resize'")
        if body.initial_noise_multiplier not in (None, 1, 1.0):
            ignored("initial_noise_multiplier", "the noise is drawn at scale 1")
        if body.mask:
            blur = body.mask_blur if body.mask_blur is not None else max(body.mask_blur_x, body.mask_blur_y)
            if blur:
                ignored("mask_blur", "the mask is binarised (gray >= 128 repainted) and pasted back exactly")
            if body.inpainting_fill != 1:
                ignored("inpainting_fill", "the masked area starts from the init image noised to the strength's "
                        "level (the webui's 'original', 1)")
            if body.inpaint_full_res:
                ignored("inpaint_full_res", "the whole picture is inpainted at width x height")
    known = set(type(body).model_fields)
    for name in (body.model_extra or {}):
        if name not in known:
            ignored(name, "not a field of this API")
    return w


def add_flags(a) -> None:
    """webui.py's flags for the API, and the webui's own spellings of flags webui.py has."""
    a("--api", action="store_true", help=f"also serve AUTOMATIC1111's HTTP API ({PREFIX}/txt2img, ...) beside the UI, "
      "on the same port and engine (docs at /docs)")
    a("--nowebui", action="store_true", help="serve the API alone, without the browser UI")
    a("--listen", action="store_true", help="listen on every network (0.0.0.0), as --host 0.0.0.0; use --api-auth")
    a("--ckpt_dir", "--ckpt-dir", dest="ckpt_dir", default=None, metavar="DIR",
      help=f"the checkpoints sd_model_checkpoint may name (default: {DEFAULT_CKPT_DIR}); without --ckpt, the first "
           "one there is loaded")
    a("--lora-dir", dest="lora_dir", action="append", default=None, metavar="DIR", help="the webui's spelling of --lora_dir")
    a("--api-auth", dest="api_auth", default=None, metavar="USER:PASS[,USER2:PASS2]",
      help="HTTP basic auth for the API (every name and password compared in constant time)")
    a("--gradio-auth", dest="gradio_auth", default=None, metavar="USER:PASS[,USER2:PASS2]",
      help="the browser UI's login (as --auth, several pairs allowed)")
    a("--api-max-body", dest="api_max_body", default="50M", metavar="SIZE",
      help="largest request body the API reads, e.g. 50M (default) or 1G; a larger one is refused with 413 "
           "before it is read")


def ckpt_dir_of(arg: str | None) -> Path:
    """--ckpt_dir, else the webui's models/Stable-diffusion under the working directory, then this checkout."""
    from ..model.paths import bases

    if arg:
        return Path(arg)
    return next((b / DEFAULT_CKPT_DIR for b in bases() if (b / DEFAULT_CKPT_DIR).is_dir()), DEFAULT_CKPT_DIR)


def first_checkpoint(folder: Path) -> str | None:
    """The first checkpoint of `folder` by name (the webui loads one of its folder when none is named)."""
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in CKPT_SUFFIXES and p.is_file()
                   and is_inside(p, folder))
    return str(found[0]) if found else None


def prepare(args) -> dict:
    """webui.py --api / --nowebui: the API's settings of the parsed `args`, checked before the checkpoint
    is read (each mistake one line)."""
    from ..engine.planner import parse_size

    try:
        max_body = parse_size(args.api_max_body)
    except ValueError as e:
        raise RequestError(f"--api-max-body: {e}") from None
    credentials = parse_credentials(args.api_auth, "--api-auth")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not credentials:
        print(f"note: the API listens on {args.host} without --api-auth: anyone who can reach port {args.port} can "
              "render on this server", file=sys.stderr, flush=True)
    flags = {k: v for k, v in vars(args).items()}
    return dict(ckpt_dir=ckpt_dir_of(args.ckpt_dir), flags=flags, credentials=credentials, max_body=max_body)


def serve_args(args, studio, page, settings: dict, *, model_args: dict, gradio_auth=None, log=print) -> None:
    """Serve the API of `prepare`'s `settings` over `studio` (and `page`, the UI) on --host:--port."""
    api = Api(studio, model_args=model_args, **settings)
    serve(studio, page, host=args.host, port=args.port, api=api, gradio_auth=gradio_auth, log=log)


def serve(studio, page, *, host: str, port: int, api: Api, gradio_auth=None, log=print) -> None:
    """Serve `api` (and `page`, the gradio UI, at `/` when given) on one uvicorn server, until Ctrl-C."""
    import uvicorn

    app = api.app()
    if page is not None:
        import gradio as gr

        page.queue()
        app = gr.mount_gradio_app(app, page, path="", auth=gradio_auth or None, ssr_mode=False, mcp_server=False,
                                  pwa=False, enable_monitoring=False, show_error=False, footer_links=[])
    shown = f"[{host}]" if ":" in host else host

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # listening: only now may a client connect (not when the port could not be had)
                log(f"serving {'the UI and ' if page is not None else ''}the API ({PREFIX}, docs at /docs) on "
                    f"http://{shown}:{port}; Ctrl-C stops")
                sys.stdout.flush()

    Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_keep_alive=30)).run()
