"""What a cluster run has already written: the resume state in the output folder.

`OUTDIR/.optimizedSD-manifest.jsonl` is append-only; each line is flushed and fsynced before the
next step. Every file takes two lines, one before it is written (the folder and the highest file
number already there) and one after it was renamed into place:

    {"key": "9c1e...", "seed": 42, "dir": "a_red_fox", "after": -1}       writing image seed 42 ...
    {"key": "9c1e...", "seed": 42, "file": "a_red_fox/seed_42_00000.png"}  ... written
    {"key": "9c1e...", "grid": [42, 8, 4], "dir": "a_red_fox", "after": -1}  a grid: first seed, images, per row
    {"key": "9c1e...", "grid": [42, 8, 4], "file": "a_red_fox/grid_0000.png"}

`key` (`settings_key`) stands for everything that decides an image's pixels and file besides its
seed: the same command run again finds its images and renders only what is missing; a changed
setting (checkpoint, sampler, scale, size, ...) renders anew. A run killed at any moment leaves at
most one file in flight; `Manifest.open` cuts a half-written last line and settles that file: a
complete one (files are renamed into place whole) is recorded as written, so it is not made twice;
an empty one (its name reserved, nothing written yet) and a stray temporary file are deleted. A
recorded file that is gone no longer counts. The leading dot keeps the manifest apart from the
prompt folders (`images.slugify` never starts a name with a dot). One run at a time per folder: the
manifest is locked while open.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from .images import _GRID_RE, _IMAGE_RE, OutputError
from ..engine.request import Request

NAME = ".optimizedSD-manifest.jsonl"


class ManifestError(OutputError):
    """The manifest cannot be used (locked by another run, unwritable); one line."""


def settings_key(r: Request, meta: dict, cfg, precision: str, ema: bool, fmt: str) -> str:
    """16 hex digits over what decides a completed request's image files besides the seed: the prompt,
    its file metadata (`outputs.metadata`: checkpoint and its hash, sampler, steps, scale, ...), the
    other pixel settings (kind, size, karras, eta, long prompts, fixed code with its seed), the model
    config, precision, EMA weights, the init image's and mask's pixels, and the file format. Not in it:
    device, memory mode, --unet_bs and batch sizes, which leave an image's pixels alone."""
    parts = dict(prompt=r.prompt, meta=meta, kind=r.kind, width=r.width, height=r.height, karras=r.karras,
                 eta=r.eta, long_prompts=r.long_prompts, fixed_code=r.seed if r.fixed_code else None,
                 config=asdict(cfg), precision=precision, ema=ema, fmt=fmt,
                 init_image=_pixels_hash(r.init_image), mask=_pixels_hash(r.mask))
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pixels_hash(image) -> str | None:
    if image is None:
        return None
    if not isinstance(image, Image.Image):  # a completed request holds images; a path is hashed as text
        return str(image)
    return hashlib.sha256(f"{image.mode} {image.size}".encode() + image.tobytes()).hexdigest()[:16]


def _ident(entry: dict) -> tuple:
    """What a line is about: ("image", key, seed) or ("grid", key, first seed, images, per row)."""
    if "grid" in entry:
        return ("grid", entry["key"], *entry["grid"])
    return ("image", entry["key"], int(entry["seed"]))


class Manifest:
    """The manifest of one output folder, opened (and locked) for a run; use as a context manager."""

    def __init__(self, outdir: Path, handle):
        self.outdir = outdir
        self._file = handle
        self._done: dict[tuple, str] = {}  # ident -> file, relative to outdir
        self.dropped = 0  # lines that could not be read (a half-written last line)
        self.settled: list[str] = []  # what `open` did with the file a killed run left in flight

    @classmethod
    def open(cls, outdir: str | Path) -> "Manifest":
        """Read `outdir`'s manifest (created if missing), lock it, and settle what a killed run left."""
        outdir = Path(outdir)
        path = outdir / NAME
        try:
            handle = open(path, "a+b")
        except OSError as e:
            raise ManifestError(f"cannot open {path} ({e.strerror or e}); fix the output directory or "
                                "choose another --outdir") from e
        _lock(handle, path)
        m = cls(outdir, handle)
        handle.seek(0)
        data = handle.read()
        if data and not data.endswith(b"\n"):  # killed while appending: drop the partial line
            handle.truncate(data.rfind(b"\n") + 1)
        writing = {}  # ident -> its "writing" line, until its "written" line
        for line in data.splitlines():
            try:
                entry = json.loads(line)
                ident = _ident(entry)
            except (ValueError, KeyError, TypeError):
                m.dropped += 1
                continue
            if "file" in entry:
                m._done[ident] = entry["file"]
                writing.pop(ident, None)
            else:
                writing[ident] = entry
        for ident, entry in writing.items():
            m._settle(ident, entry)
        return m

    def image(self, key: str, seed: int) -> Path | None:
        """The file of the image (key, seed) a run wrote, if it is still there."""
        return self._existing(("image", key, seed))

    def grid(self, key: str, grid: tuple[int, int, int]) -> Path | None:
        """The file of the grid (key, (first seed, images, per row)) a run wrote, if it is still there."""
        return self._existing(("grid", key, *grid))

    def writing(self, key: str, folder: Path, seed: int | None = None, grid: tuple | None = None) -> None:
        """Before writing image `seed` (or grid `grid`) into `folder`: where it goes (see `open`)."""
        pattern = _IMAGE_RE if grid is None else _GRID_RE
        after = max((n for n, _ in _numbered(folder, pattern)), default=-1)
        which = dict(seed=seed) if grid is None else dict(grid=list(grid))
        self._append(dict(key=key, **which, dir=self._relative(folder), after=after))

    def written(self, key: str, path: Path, seed: int | None = None, grid: tuple | None = None) -> None:
        which = dict(seed=seed) if grid is None else dict(grid=list(grid))
        entry = dict(key=key, **which, file=self._relative(path))
        self._append(entry)
        self._done[_ident(entry)] = entry["file"]

    def _settle(self, ident: tuple, entry: dict) -> None:
        """The file a killed run was writing (`entry`: its "writing" line): the one file numbered after
        `after` in its folder for that seed (or grid). Kept and recorded if it holds data, else deleted;
        its temporary file (`images.ImageWriter._fill`) is deleted either way."""
        folder = self.outdir / entry["dir"]
        pattern = _GRID_RE if ident[0] == "grid" else _IMAGE_RE
        prefix = "grid_" if ident[0] == "grid" else f"seed_{ident[2]}_"
        recorded = set(self._done.values())
        for n, name in _numbered(folder, pattern):
            if n <= entry["after"] or not name.startswith(prefix) or f"{entry['dir']}/{name}" in recorded:
                continue
            (folder / f".{name}.part").unlink(missing_ok=True)
            if (folder / name).stat().st_size == 0:
                (folder / name).unlink()
                self.settled.append(f"deleted {entry['dir']}/{name}, empty (its run was killed before writing it)")
            else:
                self.written(ident[1], folder / name, **({"grid": ident[2:]} if ident[0] == "grid" else {"seed": ident[2]}))
                self.settled.append(f"kept {entry['dir']}/{name} (written just before its run was killed)")

    def _existing(self, ident: tuple) -> Path | None:
        file = self._done.get(ident)
        return self.outdir / file if file is not None and (self.outdir / file).is_file() else None

    def _relative(self, path: Path) -> str:
        return Path(path).relative_to(self.outdir).as_posix()

    def _append(self, entry: dict) -> None:
        """One whole line, on disk before the run goes on."""
        self._file.write(json.dumps(entry, ensure_ascii=False).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()  # closing releases the lock

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _numbered(folder: Path, pattern) -> list[tuple[int, str]]:
    """(number, name) of the files in `folder` that `pattern` (images.py's file names) matches."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [(int(m.group(1)), name) for name in names if (m := pattern.match(name))]


def _lock(handle, path: Path) -> None:
    """An exclusive, non-blocking lock for the run (POSIX; elsewhere runs are not guarded)."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ManifestError(f"another run is writing to {path.parent} (its manifest {path.name} is locked); "
                            "wait for it to finish or choose another --outdir") from None
