"""The commands' `--ray`: one run's images rendered by many workers on a Ray cluster, the files the same.

    driver (this process)                         workers (Ray actors, one per GPU or --workers N on CPU)
    flags -> requests, all checked                RenderWorker: the model loaded once (an Engine)
    manifest: what is on disk already             render(job): one batch of one request
    jobs: the batches still to render  ------->
    Delivery: writes in single-process order <---  seeds, encoded files (PNG/JPEG bytes), pixels for the grid

Every (prompt, seed) image belongs to one job, a batch of `--n_samples` consecutive seeds of one
prompt, batched as a single-process run batches them, so each image equals that run's to the bit.
The driver keeps every worker `DEPTH` jobs deep, writes through `outputs.RequestWriter` (names,
numbering, metadata and grids as a single-process run: `delivery.py`), and records each file in the
output folder's manifest, so the same command run again renders only what is missing (`manifest.py`).

Faults: a worker that dies (killed, out of host memory, its node lost) fails the jobs it held; the
driver puts them back at the head of the queue for the other workers, while Ray restarts the actor
(`MAX_RESTARTS`), which reloads the model and takes jobs again. A job lost `MAX_TRIES` times stops the
run. A result is written once, by the driver, atomically. An error a worker raises on purpose (a
`RequestError`: bad input; running out of GPU memory at the smallest batch) stops the run with its one
line, as in a single-process run; bad input is found on the driver before Ray starts.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..engine.request import RequestError

PACKAGE = Path(__file__).resolve().parents[1]  # optimizedSD/, shipped to every node (Ray runtime_env py_modules)
DEPTH = 2  # jobs queued per worker: the next batch is there when one ends
MAX_RESTARTS = 3  # Ray restarts of a worker that died, after which it is dropped
MAX_TRIES = 3  # times one job may be lost with its worker before the run stops
WORKER_NAME = "optimizedSD-worker-{}-{}"  # Ray actor name (ray.get_actor): worker number, run tag


class ClusterError(RequestError):
    """The cluster cannot finish the run (no worker left, a job lost too often); one line, exit 2."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray: pip install ray (or drop --ray to render in this process)") from None
    return ray


def connect(address: str | None, **init) -> bool:
    """Connect this process to Ray: `address` "auto" (or host:port) for a cluster started with `ray start`,
    None for a new local one (`init`: e.g. num_cpus). Nothing goes to the internet: no dashboard, no
    usage statistics. Returns whether this call connected (so the caller disconnects); a process
    already connected (a test, a notebook) keeps its connection."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, runtime_env={"py_modules": [str(PACKAGE)], "excludes": ["__pycache__"]},
                 **init)
    except ConnectionError as e:
        raise ClusterError(f"--ray {address}: no Ray cluster found ({str(e).splitlines()[0]}); start one with "
                           "`ray start --head`, or give --ray alone for a local one") from None
    return True


class RenderWorker:
    """A Ray actor: the model loaded once (`setup`, again after a restart), then jobs (`render`)."""

    def __init__(self, model: dict):
        self.model = model  # resolve_model's arguments, paths absolute
        self.engine = None
        self.notes: list[str] = []
        self._run = (None, None)  # (object ref id, the run: requests, metadata, what to return)

    def setup(self) -> dict:
        """Load the model; what the driver checks: the node, the device, the checkpoint's hash."""
        import ray
        from dataclasses import asdict

        node = ray.util.get_node_ip_address()
        try:
            engine = self._engine()
        except RequestError as e:  # e.g. the checkpoint is not at that path on this node
            raise RequestError(f"worker on {node}: {e}") from None
        # Ray sets OMP_NUM_THREADS to the actor's CPUs unless the user set it: torch's threads follow it.
        return dict(node=node, pid=os.getpid(), device=str(engine.device), threads=torch.get_num_threads(),
                    checkpoint_hash=engine.checkpoint_hash, config=asdict(engine.cfg))

    def render(self, run: list, index: int, iteration: int) -> dict:
        """Batch `iteration` of request `index` (`run`: [object ref of `generate`'s run dict], fetched
        once): its seeds; the images' files, encoded here as the driver would (so encoding scales with
        the workers), and/or their pixels as (H, W, 3) uint8 arrays for the grid; notes; figures."""
        from ..engine.engine import RunStats
        from ..outputs.images import ImageWriter

        engine = self._engine()
        run = self._fetch(run[0])
        r = run["requests"][index]
        self.notes.clear()
        stats = RunStats()
        items = [item for batch in engine.render(r, stats=stats, iterations=[iteration]) for item in batch]
        encoder = ImageWriter("", r.prompt, fmt=run["fmt"], metadata=run["metas"][index],
                              watermark=r.watermark)  # encodes, writes nothing
        return dict(seeds=[item.seed for item in items], notes=list(self.notes), stats=stats,
                    files=[encoder.encode(item.image, item.seed, item.meta) for item in items] if run["files"] else None,
                    images=[np.asarray(item.image) for item in items] if run["pixels"] else None)

    def _engine(self):
        from ..engine.engine import Engine
        from ..engine.spec import resolve_model

        if self.engine is None:
            self.engine = Engine(resolve_model(**self.model), notify=self.notes.append).load()
        return self.engine

    def _fetch(self, ref) -> dict:
        import ray

        if self._run[0] != ref.hex():
            self._run = (ref.hex(), ray.get(ref))
        return self._run[1]


@dataclass(frozen=True)
class Options:
    """Where the driver writes and which workers render (the CLI's --outdir ... --ray --workers --device)."""
    outdir: str
    fmt: str = "png"
    skip_save: bool = False
    skip_grid: bool = False
    n_rows: int = 0
    address: str = ""  # "" a local cluster, "auto" or host:port one started with `ray start`
    workers: int | None = None  # None: one per GPU (without GPUs, 1)
    device: str | None = None  # None or "cuda": the GPUs; "cpu": CPU workers
    seed_given: bool = True  # the first seed was chosen by the user (else the resume hint names it)
    quiet_stdout: bool = False  # --json: the figures alone on stdout


@dataclass
class Prepared:
    """A run checked on the driver, before any worker starts: the model, every request (one per
    prompt, as a single-process run makes them), each one's file metadata and manifest key."""
    spec: object  # engine.spec.ModelSpec, resolved on the driver's CPU: it reads no weights
    requests: list
    metas: list[dict]
    keys: list[str]
    checkpoint_hash: str
    model: dict  # the workers' resolve_model arguments, paths absolute
    options: Options


def check_options(options: Options) -> None:
    """What only the cluster's own options can get wrong, before anything is resolved."""
    device = options.device or ""
    if device == "meta" or device.startswith("cuda:"):
        raise RequestError(f"--device {options.device} does not go with --ray: each worker uses the GPU Ray gives it "
                           "(or --device cpu); --device meta plans a run in this process")
    if options.workers is not None and options.workers < 1:
        raise RequestError(f"--workers must be at least 1, got {options.workers}")


def worker_spec(spec, options: Options, precision: str | None):
    """The spec a worker renders with: the driver's CPU spec, or for a CUDA worker, planned on meta
    as --device meta plans (`precision` None: autocast; a GTX 16xx card's own default may differ)."""
    from ..engine.pipeline import weight_dtype

    if options.device == "cpu":
        return spec
    meta, planned = torch.device("meta"), precision or "autocast"
    return replace(spec, device=meta, precision=planned, dtype=weight_dtype(meta, planned))


def prepare(spec, worker, requests: list, model: dict, options: Options, precision: str | None = None,
            ema: bool = False) -> Prepared:
    """Everything a single-process run checks before its first image, for a cluster run: `requests`
    completed for `worker` (`worker_spec`), each planned (a --vram budget too small for the size is an
    error before any worker starts), the output folder writable, metadata and manifest keys made."""
    from ..engine.engine import Engine
    from ..model.hashes import file_hash
    from ..outputs.images import check_outdir, ensure_writable
    from ..outputs.manifest import settings_key
    from ..outputs.writer import metadata

    import_ray()  # Ray not installed: one line before the output folder is made
    check_outdir(options.outdir)
    planner = Engine(worker)
    for r in requests:
        planner.plan(r)
    ensure_writable(options.outdir)
    checkpoint_hash = file_hash(spec.ckpt)
    metas = [metadata(r, spec, checkpoint_hash) for r in requests]
    keys = [settings_key(r, m, spec.cfg, precision, ema, options.fmt) for r, m in zip(requests, metas)]
    return Prepared(spec, requests, metas, keys, checkpoint_hash, model, options)


def warn(message: str) -> None:
    """A line on stderr that clears the progress bar first."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def generate(run: Prepared, log) -> dict:
    """A prepared run (`prepare`) rendered on the cluster; returns its figures (`--json`)."""
    from tqdm import tqdm

    from ..outputs.delivery import Delivery
    from ..outputs.manifest import Manifest

    ray = import_ray()
    o = run.options
    requests, spec = run.requests, run.spec
    say = lambda m: tqdm.write(m, file=sys.stderr if o.quiet_stdout else sys.stdout)  # noqa: E731 (above the bar)
    with Manifest.open(o.outdir) as manifest:
        if manifest.dropped:
            warn(f"note: {manifest.dropped} unreadable line(s) of the manifest ignored (a run killed while writing it)")
        for note in manifest.settled:
            warn(f"note: {note}")
        delivery = Delivery(o.outdir, requests, run.metas, run.keys, manifest, fmt=o.fmt,
                            skip_save=o.skip_save, skip_grid=o.skip_grid, n_rows=o.n_rows)
        delivery.start()  # grids of requests whose images are all on disk
        jobs, skipped = delivery.jobs(), delivery.skipped
        if not jobs:
            log(f"nothing to render: all {skipped} images of this run are in {o.outdir} already (skipped {skipped})"
                + (f"; wrote {delivery.grids} grid(s) from them" if delivery.grids else ""))
            return dict(images=0, skipped=skipped, workers=0, grids=delivery.grids)
        log(f"seed: {requests[0].seed}" + ("" if o.seed_given else f" (give --seed {requests[0].seed} to resume)")
            + f"; checkpoint: {spec.ckpt}"
            + (f"; skipping {skipped} images already in {o.outdir}, rendering {delivery.to_render}" if skipped else ""))
        started, workers = connect(o.address or None), []
        try:
            count, options, device = _worker_plan(ray, o)
            remote, tag = ray.remote(RenderWorker), os.urandom(4).hex()  # a killed run's names may linger a moment
            workers = [remote.options(name=WORKER_NAME.format(k, tag), max_restarts=MAX_RESTARTS, max_task_retries=0,
                                      **options).remote(dict(run.model, device=device)) for k in range(count)]
            log(f"ray: {count} worker(s) on {device}, " + (f"{options['num_cpus']} CPU(s) each" if device != "cuda" else "one GPU each"))
            with tqdm(total=delivery.to_render, unit="image", desc=f"rendering on {count} worker(s)") as bar:
                shared = ray.put(dict(requests=requests, metas=run.metas, fmt=o.fmt, files=not o.skip_save,
                                      pixels=not o.skip_grid))
                stats, seconds = _run(ray, workers, jobs, shared, delivery, bar, run, say)
        finally:
            for w in workers:
                ray.kill(w, no_restart=True)
            if started:
                ray.shutdown()
    figures = stats.figures(device, requests[0].width, requests[0].height)
    rate = stats.images / max(seconds, 1e-9)
    figures.update(workers=count, skipped=skipped, render_seconds=round(seconds, 3), images_per_second=round(rate, 3))
    for line in stats.notes():
        warn(line)
    dirs = list(dict.fromkeys(delivery.dirs))
    where = dirs[0] if len(dirs) == 1 else f"{len(dirs)} folders under {o.outdir}"
    log(f"wrote {delivery.written} images{'' if o.skip_grid else f' and {delivery.grids} grid(s)'} to {where}; "
        f"{stats.images} rendered in {seconds:.1f} s from the first worker ready ({rate:.2f} images/s on {count} "
        f"worker(s))" + (f"; skipped {skipped} already there" if skipped else ""))
    return figures


def _worker_plan(ray, args: Options) -> tuple[int, dict, str]:
    """(workers, Ray actor options, their --device): one per GPU of the cluster (or --workers N of
    them); without GPUs, or with --device cpu, --workers N (default 1) sharing the CPUs."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if args.device == "cuda" and not gpus:
        raise RequestError("--device cuda: the Ray cluster has no GPU; add GPU nodes or use --device cpu")
    if gpus and args.device in (None, "cuda"):
        count = args.workers or gpus
        if count > gpus:
            raise RequestError(f"--workers {count}: the Ray cluster has {gpus} GPU(s), one per worker; "
                             f"use --workers {gpus} or fewer")
        return count, dict(num_gpus=1, num_cpus=1), "cuda"
    count = args.workers or 1
    if count > cpus:
        raise RequestError(f"--workers {count}: the Ray cluster has {cpus} CPU(s), at least one per worker; "
                         f"use --workers {max(1, cpus)} or fewer")
    return count, dict(num_cpus=cpus // count, scheduling_strategy="SPREAD"), args.device or "cpu"


def _run(ray, workers: list, jobs: list, shared, delivery, bar, run: Prepared, log) -> tuple:
    """Render `jobs` on `workers` and hand each result to `delivery`, keeping every ready worker `DEPTH`
    jobs deep; a lost job goes back to the head of the queue and its worker is taken up again once Ray
    has restarted it (up to `MAX_RESTARTS` times). Returns the workers' figures summed (`RunStats`) and
    the seconds from the first worker ready to the last image delivered."""
    from ..engine.engine import RunStats

    pending, left = deque(jobs), len(jobs)
    ready, held = [], Counter()  # workers taking jobs; jobs each holds
    setups = {}  # setup ref -> worker (starting, or restarting after a death)
    running = {}  # result ref -> (worker, job)
    tries, total, start, last_error = Counter(), RunStats(), None, None
    name = {w: f"worker {k}" for k, w in enumerate(workers)}

    restarting = {}  # worker -> when to ask again whether Ray has restarted it

    def set_up(w):
        setups[w.setup.remote()] = w

    def lost(w, error):
        """A worker died (or its node): take it up again once Ray has restarted it."""
        if w in ready:  # else the same death, seen through another of its jobs
            ready.remove(w)
            warn(f"{name[w]} died ({type(error).__name__}); its unfinished jobs go to the other workers")
            set_up(w)

    for w in workers:
        set_up(w)
    while left:
        for w, when in list(restarting.items()):
            if time.monotonic() >= when:
                del restarting[w]
                set_up(w)
        for w in list(ready):
            while pending and held[w] < DEPTH:
                job = pending.popleft()
                running[w.render.remote([shared], job.request, job.iteration)] = (w, job)
                held[w] += 1
        if not running and not setups and not restarting:
            raise ClusterError(f"every worker is gone ({last_error}), {left} job(s) unfinished; see the Ray logs "
                               "(`ray logs`); the same command renders the rest")
        done, _ = ray.wait(list(running) + list(setups), num_returns=1, timeout=1.0)
        for ref in done:
            if ref in setups:
                w = setups.pop(ref)
                try:
                    info = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    raise _cause(e) from None
                except ray.exceptions.ActorUnavailableError:  # Ray is restarting it: ask again in a moment
                    restarting[w] = time.monotonic() + 1.0
                    continue
                except ray.exceptions.RayError as e:  # out of restarts, or it could not start at all
                    last_error = _first_line(e)
                    warn(f"{name[w]} is gone ({type(e).__name__}); going on without it")
                    continue
                _check_worker(info, run)
                start = start or time.perf_counter()
                ready.append(w)
                log(f"{name[w]} ready on {info['node']} ({info['device']}, {info['threads']} thread(s))")
                continue
            w, job = running.pop(ref)
            held[w] -= 1
            try:
                out = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise _cause(e) from None
            except ray.exceptions.RayError as e:
                last_error = _first_line(e)
                tries[job] += 1
                if tries[job] >= MAX_TRIES:
                    r = delivery.requests[job.request]
                    raise ClusterError(f"the batch of seeds {job.seeds[0]}-{job.seeds[-1]} ({r.prompt!r}) was lost "
                                       f"{tries[job]} times with its worker ({type(e).__name__}); see the Ray logs "
                                       "(`ray logs`); the same command renders the rest") from None
                pending.appendleft(job)
                lost(w, e)
                continue
            for note in out["notes"]:
                warn(f"{name[w]}: {note}")
            bar.update(delivery.deliver(job, out["seeds"], out["images"], out["files"]))
            total.add(out["stats"])
            left -= 1
    return total, time.perf_counter() - start


def _first_line(error) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def _check_worker(info: dict, run: Prepared) -> None:
    """Every worker must load the driver's model: the same checkpoint bytes and config at that path."""
    from dataclasses import asdict

    if info["checkpoint_hash"] != run.checkpoint_hash:
        raise ClusterError(f"the worker on {info['node']} reads another checkpoint (hash {info['checkpoint_hash']}, "
                           f"here {run.checkpoint_hash}); put the same file at that path on every node")
    if info["config"] != asdict(run.spec.cfg):
        raise ClusterError(f"the worker on {info['node']} reads another model config; put the same --config file "
                           "at that path on every node")


def _cause(error):
    """The error a worker raised: a RequestError (bad input) as this process's one line, running out of
    GPU memory as the single-process run's; anything else as Ray reports it (with its traceback)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, RequestError):
        return RequestError(str(cause))
    if isinstance(cause, torch.cuda.OutOfMemoryError):
        return cause
    return error
