"""A cluster run's files, exactly as a single-process run writes them, whatever order batches finish in.

`images.ImageWriter` numbers each file after the highest number already in its folder, so the names
depend on the order of writing. The driver therefore writes each folder in a single-process run's
order: request after request (prompts sharing a folder, such as a repeated line, in prompt-file
order), seed after seed, a request's grid after its last image. Images that arrive early wait in
memory. Every file written goes into the manifest (`manifest.py`), and what the manifest already
holds is not rendered again: on a resumed run a request's grid is made from its earlier images, read
back from their files, and the new ones.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .images import OutputError, slugify
from .manifest import Manifest
from .writer import RequestWriter
from ..engine.request import Request


@dataclass(frozen=True)
class Job:
    """One batch of a request, what a worker renders at once: `Engine.render(r, iterations=[iteration])`,
    the seeds `r.seeds[iteration * n_samples:(iteration + 1) * n_samples]`, as a single-process run
    batches them (so every image is that run's image, to the bit)."""
    request: int  # index in the run's requests
    iteration: int
    seeds: tuple[int, ...]


class Delivery:
    """Writes the images of `requests` as they are delivered (`deliver`), in a single-process run's order,
    and records them in `manifest`; `jobs` are the batches still to render (see the module docstring).
    `keys[i]` is request i's `manifest.settings_key`, `metas[i]` its file metadata (`outputs.metadata`)."""

    def __init__(self, outdir: str | Path, requests: list[Request], metas: list[dict], keys: list[str],
                 manifest: Manifest, fmt: str = "png", skip_save: bool = False, skip_grid: bool = False,
                 n_rows: int = 0):
        self.outdir, self.requests, self.metas, self.keys = Path(outdir), requests, metas, keys
        self.manifest, self.fmt, self.skip_save, self.skip_grid, self.n_rows = manifest, fmt, skip_save, skip_grid, n_rows
        self.written, self.grids, self.dirs = 0, 0, []
        self._earlier: list[dict[int, Path]] = []  # seed -> file an earlier run wrote
        self._missing: list[set[int]] = []  # seeds to render and deliver
        self._grid_due: list[bool] = []
        for r, key in zip(requests, keys):
            grid_done = manifest.grid(key, self._grid(r)) is not None
            grid_due = not skip_grid and not grid_done
            earlier = {} if skip_save else {s: p for s in r.seeds if (p := manifest.image(key, s)) is not None}
            wanted = (grid_due or skip_grid) if skip_save else True  # with --skip_save only a grid is kept
            self._earlier.append(earlier)
            self._missing.append({s for s in r.seeds if s not in earlier} if wanted else set())
            self._grid_due.append(grid_due)
        self._queues: dict[Path, deque[int]] = {}  # folder -> its unfinished requests, in order
        for i, r in enumerate(requests):
            if self._missing[i] or self._grid_due[i]:
                self._queues.setdefault(self.outdir / slugify(r.prompt), deque()).append(i)
        self._pos = [0] * len(requests)  # the next seed to write, per request
        self._arrived: list[dict[int, tuple]] = [{} for _ in requests]  # seed -> (pixels, file bytes)
        self._writers: dict[int, RequestWriter] = {}

    @property
    def to_render(self) -> int:
        return sum(len(m) for m in self._missing)

    @property
    def skipped(self) -> int:
        """Images of the run an earlier run already made (not rendered again)."""
        return sum(len(r.seeds) for r in self.requests) - self.to_render

    def jobs(self) -> list[Job]:
        """The batches with an image still to render, in the single-process run's order. A batch with
        some images on disk already is rendered whole and only its missing images are written."""
        out = []
        for i, r in enumerate(self.requests):
            for it in range(r.n_iter):
                seeds = tuple(r.seeds[it * r.n_samples:(it + 1) * r.n_samples])
                if self._missing[i].intersection(seeds):
                    out.append(Job(i, it, seeds))
        return out

    def start(self) -> None:
        """Write what needs no rendering: grids of requests whose images are all on disk already."""
        for folder in list(self._queues):
            self._flush(folder)

    def deliver(self, job: Job, seeds: list[int], images: list[np.ndarray] | None = None,
                files: list[bytes] | None = None) -> int:
        """Take a finished job's images and write what can be written now: `images`, (H, W, 3) uint8
        arrays (needed for a grid; encoded here when there are no `files`), and `files`, each image's
        file bytes encoded by the worker (`ImageWriter.encode`). Returns how many were new (images
        delivered before or already on disk are ignored)."""
        i, new = job.request, 0
        images = [None] * len(seeds) if images is None else images
        files = [None] * len(seeds) if files is None else files
        for seed, image, data in zip(seeds, images, files):
            if seed in self._missing[i] and seed not in self._arrived[i]:
                self._arrived[i][seed] = (image, data)
                new += 1
        self._flush(self.outdir / slugify(self.requests[i].prompt))
        return new

    @property
    def done(self) -> bool:
        return not any(self._queues.values())

    # ---- writing in order ----------------------------------------------------------------------
    def _grid(self, r: Request) -> tuple[int, int, int]:
        """What names a request's grid in the manifest: first seed, images, images per row (as RequestWriter)."""
        return r.seed, len(r.seeds), self.n_rows or r.n_samples

    def _flush(self, folder: Path) -> None:
        queue = self._queues.get(folder)
        while queue and self._advance(queue[0]):
            queue.popleft()

    def _advance(self, i: int) -> bool:
        """Write request i's images from where it stopped up to the first one not here yet; at its
        end its grid. Returns whether the request is finished."""
        r, key = self.requests[i], self.keys[i]
        if i not in self._writers:
            self._writers[i] = RequestWriter(self.outdir, r, self.metas[i], fmt=self.fmt, skip_save=self.skip_save,
                                             skip_grid=self.skip_grid, n_rows=self.n_rows)
        writer = self._writers[i]
        seeds = r.seeds
        while self._pos[i] < len(seeds):
            seed = seeds[self._pos[i]]
            if seed in self._earlier[i]:
                if self._grid_due[i]:
                    writer.images.append(_read(self._earlier[i][seed]))  # in the grid, not written again
            elif seed in self._arrived[i]:
                if not self.skip_save:
                    self.manifest.writing(key, writer.dir, seed=seed)
                pixels, data = self._arrived[i].pop(seed)
                path = writer.add(None if pixels is None else Image.fromarray(pixels), seed, data)
                self._missing[i].discard(seed)
                if path is not None:
                    self.manifest.written(key, path, seed=seed)
                    self.written += 1
            else:
                return False
            self._pos[i] += 1
        if self._grid_due[i] and writer.images:
            self.manifest.writing(key, writer.dir, grid=self._grid(r))
            self.manifest.written(key, writer.finish(), grid=self._grid(r))
            self.grids += 1
        if writer.written or writer.grid:
            self.dirs.append(writer.dir)
        del self._writers[i]
        return True


def _read(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except OSError as e:
        raise OutputError(f"cannot read {path}, an earlier run's image, for the grid ({e}); delete it to "
                          "render it again") from e
