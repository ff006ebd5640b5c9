"""Decoded tensors → image files on disk, with metadata, never overwriting anything.

Layout: `outdir/<slug>/seed_<seed>_<NNNNN>.<ext>` for each image and `outdir/<slug>/grid_<NNNN>.<ext>`
for a grid. `<slug>` comes from the prompt (`slugify`). Each running number continues after the
highest one already in that folder (images: any seed, any extension; grids separately), and every
file name is reserved with exclusive create (`"xb"`), so a concurrent writer or a file that appeared
between the scan and the write is skipped, never overwritten. The bytes go to a temporary file that
is then renamed onto the reserved name: an interrupted write (Ctrl-C, a full disk) leaves nothing.

Metadata: PNG gets one text chunk per key (prompt, negative_prompt, seed, sampler, steps, scale,
size, checkpoint, checkpoint_hash, any extras) plus `parameters`, the one-string summary that other
SD tools write and read (`infotext.parameters_text`, AUTOMATIC1111's webui format). JPEG gets the same
`parameters` string as its COM comment.
"""
from __future__ import annotations

import io
import os
import re
import tempfile
import unicodedata
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .infotext import parameters_text

SLUG_MAX_CHARS = 150  # as the original optimizedSD: "_".join(prompt.split())[:150]
SLUG_MAX_BYTES = 200  # UTF-8; NAME_MAX is 255 bytes on most filesystems, non-ASCII is 2-4 bytes/char
SLUG_FALLBACK = "untitled"
JPEG_QUALITY = 95
_MAX_TRIES = 100_000  # numbers tried past the scan before giving up (only a broken FS gets here)

_ILLEGAL = set('/\\:*?"<>|')  # illegal on Windows (and '/' on Unix); control chars are handled apart
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}
_IMAGE_RE = re.compile(r"^seed_-?\d+_(\d+)\.[^.]+$")
_GRID_RE = re.compile(r"^grid_(\d+)\.[^.]+$")
_FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}
# PNG text keys written first, in this order; other metadata keys follow in the caller's order.
_KNOWN_KEYS = ("prompt", "negative_prompt", "seed", "sampler", "steps", "scale", "size",
               "checkpoint", "checkpoint_hash", "strength")


class OutputError(Exception):
    """The output location cannot be created or written; the message names the path and the fix."""


def slugify(prompt: str, max_chars: int = SLUG_MAX_CHARS) -> str:
    """A single safe directory name from a prompt: whitespace runs → "_", characters illegal on
    Windows or Unix and control/format characters removed, dot runs collapsed and leading or
    trailing dots/underscores stripped (so never "." or ".."), at most `max_chars` characters and
    SLUG_MAX_BYTES UTF-8 bytes, Windows device names suffixed with "_", never empty.
    """
    s = "_".join(unicodedata.normalize("NFC", prompt).split())
    # Category C*: control, format (bidi overrides, zero-width), surrogate, private, unassigned.
    s = "".join(c for c in s if c not in _ILLEGAL and not unicodedata.category(c).startswith("C"))
    s = re.sub(r"\.{2,}", ".", s)
    s = re.sub(r"_{2,}", "_", s)
    s = s[:max_chars]
    while len(s.encode("utf-8")) > SLUG_MAX_BYTES:
        s = s[:-1]
    s = s.strip("._")
    if not s:
        return SLUG_FALLBACK
    if s.split(".")[0].upper() in _WINDOWS_RESERVED:
        s += "_"
    return s


def make_grid(images: list[Image.Image], n_rows: int | None = None) -> Image.Image:
    """Tile equal-size images, `n_rows` per row (CompVis `--n_rows`, which is torchvision's
    `make_grid(nrow=...)`: images per row; default all in one row), no padding, left to right,
    top to bottom; empty cells of the last row are black.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise ValueError(f"grid images must all be {w}x{h}, got {[im.size for im in images]}")
    per_row = max(1, min(n_rows or len(images), len(images)))
    rows = -(-len(images) // per_row)
    grid = Image.new("RGB", (per_row * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % per_row) * w, (i // per_row) * h))
    return grid


def check_outdir(outdir: str) -> None:
    """Fail early, without creating anything, if OUTDIR cannot be created or written."""
    path = Path(outdir).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create output directory {outdir}: {probe} is a file; choose another --outdir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {probe} is not writable; choose another --outdir")


def ensure_writable(path: str | os.PathLike) -> Path:
    """Create directory `path` (with parents) if needed and prove a file can be written in it.

    Raises OutputError with a one-line message; meant to run before any expensive work.
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {p} ({e.strerror or e}); "
                          "choose another output directory") from e
    try:
        with tempfile.TemporaryFile(dir=p, prefix=".write-test-") as f:
            f.write(b"ok")
            f.flush()
    except OSError as e:
        raise OutputError(f"cannot write to output directory {p} ({e.strerror or e}); "
                          "fix its permissions or choose another output directory") from e
    return p


class ImageWriter:
    """Saves the images of one prompt under `outdir/<slugify(prompt)>/`.

    `metadata`: negative_prompt, sampler, steps, scale, checkpoint (path or name; the file name is
    stored), checkpoint_hash (`file_hash`), plus any extra keys; prompt, seed and size (from the
    image) are filled in here. Nothing touches the disk until the first save. `watermark`: the
    payload every image and grid gets before it is encoded (`watermark.apply`, the reference's), or None.
    """

    def __init__(self, outdir: str | os.PathLike, prompt: str, fmt: str = "png",
                 metadata: dict | None = None, watermark: str | None = None):
        if fmt.lower() not in _FORMATS:
            raise ValueError(f"image format must be one of {sorted(_FORMATS)}, got {fmt!r}")
        self.ext = _FORMATS[fmt.lower()]
        self.prompt = prompt
        self.dir = Path(outdir) / slugify(prompt)
        self.metadata = dict(metadata or {})
        self.watermark = watermark
        self._next = {"image": 0, "grid": 0}  # lower bounds; the folder is rescanned every save

    def save(self, image: Image.Image, seed: int, extra_meta: dict | None = None) -> Path:
        """Write `image` as `seed_<seed>_<NNNNN>.<ext>`; returns the path written."""
        return self.save_encoded(self.encode(image, seed, extra_meta), seed)

    def encode(self, image: Image.Image, seed: int, extra_meta: dict | None = None) -> bytes:
        """The bytes `save` writes for `image`, metadata included: a cluster worker encodes its images
        and the driver writes them with `save_encoded` (the folder plays no part here)."""
        return self._encode(image, self._meta(image, extra_meta, seed=int(seed)))

    def save_encoded(self, data: bytes, seed: int) -> Path:
        """Write the bytes of `encode` as `seed_<seed>_<NNNNN>.<ext>`; returns the path written."""
        return self._write(data, "image", lambda n: f"seed_{int(seed)}_{n:05d}.{self.ext}")

    def save_grid(self, images: list[Image.Image], n_rows: int | None = None,
                  extra_meta: dict | None = None) -> Path:
        """Write `make_grid(images, n_rows)` as `grid_<NNNN>.<ext>`; returns the path written.
        Its metadata has no seed (it holds several) unless `extra_meta` gives one."""
        grid = make_grid(images, n_rows)
        return self._write(self._encode(grid, self._meta(grid, extra_meta)), "grid",
                           lambda n: f"grid_{n:04d}.{self.ext}")

    def _meta(self, image: Image.Image, extra: dict | None, **fixed) -> dict:
        meta = {**self.metadata, **(extra or {}), "prompt": self.prompt, **fixed,
                # an image's own size, unless the metadata gives the size it was asked at (the hires fix's base)
                "size": (fixed and self.metadata.get("size")) or f"{image.width}x{image.height}"}
        meta.pop("parameters", None)  # always derived from the fields, never passed in
        if meta.get("checkpoint"):
            meta["checkpoint"] = Path(str(meta["checkpoint"])).name
        order = [k for k in _KNOWN_KEYS if k in meta] + [k for k in meta if k not in _KNOWN_KEYS]
        return {k: meta[k] for k in order if meta[k] is not None}

    def _encode(self, image: Image.Image, meta: dict) -> bytes:
        if self.watermark:
            from .watermark import apply

            image = apply(image, self.watermark)
        buf = io.BytesIO()
        params = parameters_text(meta)
        if self.ext == "png":
            info = PngInfo()
            for k, v in meta.items():
                info.add_text(k, str(v))  # Pillow falls back to iTXt for non-Latin-1 text
            info.add_text("parameters", params)
            image.save(buf, format="PNG", pnginfo=info)
        else:
            rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
            comment = params.encode("utf-8")[:65533]  # a COM segment holds at most 65533 bytes
            rgb.save(buf, format="JPEG", quality=JPEG_QUALITY, comment=comment)
        return buf.getvalue()

    def _fill(self, path: Path, data: bytes) -> None:
        """Put `data` at the reserved (empty) `path` whole or not at all: written to a temporary file
        beside it, then renamed over it. Interrupted (Ctrl-C) or failed, neither file is left."""
        tmp = path.with_name(f".{path.name}.part")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            raise OutputError(f"failed writing {path} ({e.strerror or e}); check free disk space") from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            raise

    def _numbers(self, pattern: re.Pattern) -> list[tuple[int, str]]:
        """(number, file name) of every file in self.dir whose name matches `pattern`."""
        try:
            return [(int(m.group(1)), f) for f in os.listdir(self.dir) if (m := pattern.match(f))]
        except OSError as e:
            raise OutputError(f"cannot read output directory {self.dir} ({e.strerror or e}); "
                              "fix its permissions or choose another output directory") from e

    def _write(self, data: bytes, kind: str, name) -> Path:
        """Reserve the next free name and put `data` there (encoded first: a failure leaves no empty file)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create output directory {self.dir} ({e.strerror or e}); "
                              "choose another output directory") from e
        pattern = _IMAGE_RE if kind == "image" else _GRID_RE
        start = max(self._next[kind], max((n for n, _ in self._numbers(pattern)), default=-1) + 1)
        for n in range(start, start + _MAX_TRIES):
            path = self.dir / name(n)
            try:
                open(path, "xb").close()  # reserve the name: exclusive create never overwrites, even under a race
            except FileExistsError:
                continue
            except OSError as e:
                raise OutputError(f"cannot create {path} ({e.strerror or e}); "
                                  "fix the output directory or choose another") from e
            # A concurrent writer may have taken number n under another name (other seed or
            # extension) between our scan and our create: then back off to n + 1.
            if any(m == n and other != path.name for m, other in self._numbers(pattern)):
                path.unlink(missing_ok=True)
                continue
            self._fill(path, data)
            self._next[kind] = n + 1
            return path
        raise OutputError(f"no free file name in {self.dir} after {_MAX_TRIES} tries; "
                          "clean up the folder or choose another output directory")
