"""A request's images as files: the metadata every front writes, and one writer per request.

Every front that saves (the CLI, the browser UI, a cluster's driver) goes through `RequestWriter`,
so names (`images.ImageWriter`: `OUTDIR/<prompt>/seed_<seed>_<NNNNN>.png`, `grid_<NNNN>.png`),
metadata and the never-overwrite rule are one thing.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from .images import ImageWriter
from .infotext import model_metadata
from ..engine.request import Request


def metadata(r: Request, spec, checkpoint_hash: str | None) -> dict:
    """What a completed request's images record besides prompt, seed and size (the writer's), made with
    the model of `spec` (`model.ModelSpec`): its LoRAs, embeddings, VAE and adapters too."""
    from ..engine.customize import custom_metadata
    from ..engine.hires import hires_metadata
    from .watermark import watermark_metadata

    checkpoint = spec.ckpt
    meta = dict(negative_prompt=r.negative_prompt, steps=r.steps, sampler=r.sampler_name(), scale=r.scale,
                checkpoint=Path(checkpoint).name if checkpoint else None, checkpoint_hash=checkpoint_hash)
    if r.long_prompts:
        meta.update(long_prompts=True)
    meta.update(text_metadata(r))
    if r.kind != "txt2img":
        meta.update(init_image=r.init_image_name, strength=r.strength)
    if r.kind == "inpaint":
        meta.update(mask=r.mask_name)
    meta.update(custom_metadata(spec.custom, spec.cfg, r))
    if r.controls:  # `ControlNet 0: "Module: canny, Model: name [hash], Weight: 1.0, ..."` (the webui extension's)
        from ..engine.control import control_metadata

        meta.update(control_metadata(r))
    meta.update(hires_metadata(r))  # the hires fix: Hires upscale/steps/upscaler, Denoising strength, base Size
    meta.update(watermark_metadata(r.watermark))
    meta.update(model_metadata(getattr(spec, "fp8", None), spec.precision))  # --fp8, bf16 (infotext.py)
    return {k: v for k, v in meta.items() if v is not None}


def text_metadata(r: Request) -> dict:
    """The webui's keys for how the prompts were read (only where they differ from its defaults, as it
    writes them): `Clip skip`, `Pad conds`; and ours, `Prompt syntax: plain` (brackets read as text)."""
    meta = {}
    if r.clip_skip != 1:
        meta["Clip skip"] = r.clip_skip
    if r.pad_conds:
        meta["Pad conds"] = True
    if r.prompt_syntax != "webui":
        meta["Prompt syntax"] = r.prompt_syntax
    return meta


class RequestWriter:
    """Saves a request's images as they come (unless `skip_save`) and, at `finish`, their grid of
    `n_rows` images per row (default: the batch size; unless `skip_grid`)."""

    def __init__(self, outdir: str | Path, request: Request, meta: dict, fmt: str = "png", skip_save: bool = False,
                 skip_grid: bool = False, n_rows: int = 0):
        self.writer = ImageWriter(outdir, request.prompt, fmt=fmt, metadata=meta, watermark=request.watermark)
        self.skip_save, self.skip_grid = skip_save, skip_grid
        self.n_rows = n_rows or request.n_samples
        self.images: list[Image.Image] = []
        self.written: list[Path] = []
        self.grid: Path | None = None

    @property
    def dir(self) -> Path:
        return self.writer.dir

    def add(self, image: Image.Image | None, seed: int, data: bytes | None = None,
            meta: dict | None = None) -> Path | None:
        """Save `image`, or `data`, its file's bytes when encoded already (`ImageWriter.encode`: a
        cluster worker's); `image` may then be None when there is no grid to make. `meta`: what this
        image's metadata adds to the request's (`Rendered.meta`: the safety checker's verdict)."""
        if image is not None:
            self.images.append(image)
        if self.skip_save:
            return None
        path = self.writer.save(image, seed, meta) if data is None else self.writer.save_encoded(data, seed)
        self.written.append(path)
        return path

    def finish(self) -> Path | None:
        if not self.skip_grid and self.images:
            self.grid = self.writer.save_grid(self.images, self.n_rows)
        return self.grid


def write_preview(folder: str | Path, preview) -> list[Path]:
    """A live preview's images (`engine.previews.Preview`) as `folder/previews/seed_<seed>_step_<NNNN>.png`,
    for people who watch the folder; a name taken already gets `_<k>` (nothing is overwritten)."""
    where = Path(folder) / "previews"
    where.mkdir(parents=True, exist_ok=True)
    written = []
    for seed, image in zip(preview.seeds, preview.images):
        stem, k = f"seed_{seed}_step_{preview.step:04d}", 0
        path = where / f"{stem}.png"
        while path.exists():
            k += 1
            path = where / f"{stem}_{k}.png"
        image.save(path)
        written.append(path)
    return written
