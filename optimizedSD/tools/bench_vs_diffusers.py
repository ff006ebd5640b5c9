"""This tool's CPU run against diffusers' StableDiffusionPipeline on the same weights, whole process
each (`python optimizedSD/bench.py --vs-diffusers CKPT`).

Every run is a process of its own, timed from its start to its exit: load, text encoding, sampling
(DDIM), VAE decode and writing the PNG. Its peak resident set, CPU seconds and minor page faults come
from the kernel's accounting of that one child (`os.wait4`). Runs alternate, ours first (ours,
diffusers, ours, diffusers, ...), so that load from other processes on a shared machine falls on both
alike; the figures are medians with their range, and the ratio is the median of each pair's ratio.

Ours is the command a user types (`optimized_txt2img.py`). diffusers is a test-only dependency
(requirements-dev.txt), imported only by this mode's child processes: before any timing, one child
converts CKPT with diffusers' own single-file converters (`tests/reference.py`, as the fidelity tests
do) and saves the pipeline as a diffusers folder (`save_pretrained`, safetensors); each timed
diffusers run loads that folder (`from_pretrained` of a local path, offline), as a diffusers user
would, and runs SD v1's DDIM schedule with the same prompt, size, steps, guidance and seed. Both
start from the same noise, so their images are compared too (same work done).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]  # the checkout
PROMPT = "a photograph of an astronaut riding a horse"
SEED, SCALE = 0, 7.5
TOOLS = ("ours", "diffusers")


class BenchError(Exception):
    """A run that failed or cannot start; the message says which and why."""


def write_diffusers_folder(ckpt: str, config: str | None, folder: str) -> None:
    """(child process) The pipeline diffusers builds from `ckpt`, saved to `folder` with SD v1's DDIM
    scheduler. `tests/reference.py` holds the conversion (diffusers' own converters)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from diffusers import DDIMScheduler
    from reference import sd_pipeline, sd_v1_scheduler_config

    from optimizedSD.model.checkpoint import read_state
    from optimizedSD.model.config import SDConfig

    cfg = SDConfig.from_yaml(config) if config else SDConfig()
    schedule = {k: v for k, v in sd_v1_scheduler_config().items() if k != "skip_prk_steps"}  # a PNDM option
    with tempfile.TemporaryDirectory() as vocab:
        pipe = sd_pipeline(cfg, read_state(ckpt), DDIMScheduler(**schedule), Path(vocab))
        pipe.save_pretrained(folder, safe_serialization=True)


def diffusers_txt2img(folder: str, size: int, steps: int, out: str) -> None:
    """(child process) One timed diffusers run: load `folder`, sample, decode, write `out`."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    generator = torch.Generator("cpu").manual_seed(SEED)  # its first draw is the starting noise, as ours
    image = pipe(PROMPT, negative_prompt="", height=size, width=size, num_inference_steps=steps,
                 guidance_scale=SCALE, generator=generator).images[0]
    image.save(out)


def _child(call: str) -> list[str]:
    return [sys.executable, "-c", f"from optimizedSD.tools.bench_vs_diffusers import *; {call}"]


def _ours(ckpt: str, config: str | None, size: int, steps: int, precision: str, outdir: str) -> list[str]:
    argv = [sys.executable, str(ROOT / "optimizedSD" / "optimized_txt2img.py"), "--device", "cpu",
            "--ckpt", ckpt, "--prompt", PROMPT, "--seed", str(SEED), "--scale", str(SCALE), "--sampler", "ddim",
            "--ddim_steps", str(steps), "--H", str(size), "--W", str(size), "--n_samples", "1", "--skip_grid",
            "--precision", precision, "--outdir", outdir]
    return argv + (["--config", config] if config else [])


def run_child(argv: list[str], log: Path) -> dict:
    """Run `argv` (cwd: the repo, offline) to its end: wall seconds, peak RSS, CPU seconds, faults."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    with open(log, "wb") as out:
        start = time.perf_counter()
        child = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"{Path(argv[1]).name if argv[1] != '-c' else argv[2][-60:]} exited with status "
                         f"{child.returncode}: {tail[0][:200]} (log: {log})")
    rss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return dict(wall_s=round(wall, 2), peak_rss_bytes=rss, user_s=round(usage.ru_utime, 2),
                sys_s=round(usage.ru_stime, 2), minor_faults=usage.ru_minflt)


def compare(ckpt: str, config: str | None, size: int, steps: int, runs: int, precision: str,
            log=print) -> dict:
    """Paired whole-process runs; returns {"runs": [...], "summary": {...}}."""
    try:
        import diffusers  # noqa: F401  (only to fail early with one line; the children import it)
    except ImportError:
        raise BenchError("--vs-diffusers needs diffusers, a test-only dependency: "
                         "pip install -r requirements-dev.txt") from None
    if not Path(ckpt).is_file():
        raise BenchError(f"checkpoint not found: {ckpt}")
    ckpt = str(Path(ckpt).resolve())
    config = str(Path(config).resolve()) if config else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-vs-diffusers-") as work:
        work = Path(work)
        folder = work / "diffusers-pipeline"
        log(f"converting {ckpt} into a diffusers folder (not timed) ...")
        run_child(_child(f"write_diffusers_folder({ckpt!r}, {config!r}, {str(folder)!r})"), work / "convert.log")
        for i in range(runs):
            for tool in TOOLS:
                image = work / f"{tool}-{i}.png"
                if tool == "ours":
                    outdir = work / f"ours-{i}"
                    argv = _ours(ckpt, config, size, steps, precision, str(outdir))
                else:
                    argv = _child(f"diffusers_txt2img({str(folder)!r}, {size}, {steps}, {str(image)!r})")
                row = dict(tool=tool, run=i, **run_child(argv, work / f"{tool}-{i}.log"))
                if tool == "ours":
                    (written,) = outdir.glob("*/*.png")
                    written.rename(image)
                rows.append(row)
                log(format_row(row, first=len(rows) == 1))
        diff = np.abs(_pixels(work / "ours-0.png") - _pixels(work / "diffusers-0.png"))
    summary = summarize(rows, size, steps, precision)
    summary.update(image_max_diff=int(diff.max()), image_mean_diff=round(float(diff.mean()), 3))
    return dict(runs=rows, summary=summary)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def summarize(rows: list[dict], size: int, steps: int, precision: str) -> dict:
    out = dict(size=size, steps=steps, precision=precision, pairs=len(rows) // 2)
    for tool in TOOLS:
        mine = [r for r in rows if r["tool"] == tool]
        for key in ("wall_s", "peak_rss_bytes", "user_s", "sys_s"):
            values = [r[key] for r in mine]
            out[f"{tool}_{key}"] = dict(median=statistics.median(values), min=min(values), max=max(values))
    pairs = [(a, b) for a, b in zip(rows[0::2], rows[1::2])]
    out["wall_ratio"] = round(statistics.median(a["wall_s"] / b["wall_s"] for a, b in pairs), 3)
    out["cpu_ratio"] = round(statistics.median((a["user_s"] + a["sys_s"]) / (b["user_s"] + b["sys_s"])
                                               for a, b in pairs), 3)
    out["rss_ratio"] = round(statistics.median(a["peak_rss_bytes"] / b["peak_rss_bytes"] for a, b in pairs), 3)
    return out


def format_row(row: dict, first: bool) -> str:
    head = ("| tool | run | wall s | peak RSS GiB | user s | sys s | minor faults |\n"
            "|---|---|---|---|---|---|---|\n")
    line = (f"| {row['tool']} | {row['run']} | {row['wall_s']:.1f} | {row['peak_rss_bytes'] / 2**30:.2f} | "
            f"{row['user_s']:.1f} | {row['sys_s']:.1f} | {row['minor_faults']} |")
    return (head if first else "") + line


def format_summary(s: dict) -> str:
    def spread(key, scale=1.0, digits=1):
        v = s[key]
        return f"{v['median'] / scale:.{digits}f} ({v['min'] / scale:.{digits}f}-{v['max'] / scale:.{digits}f})"

    return (f"{s['size']}x{s['size']}, {s['steps']} DDIM steps, {s['pairs']} pair(s), median (range):\n"
            f"  wall s:       ours {spread('ours_wall_s')}, diffusers {spread('diffusers_wall_s')}; "
            f"ours/diffusers {s['wall_ratio']:.3f}\n"
            f"  CPU s (user+sys) ours/diffusers {s['cpu_ratio']:.3f}\n"
            f"  peak RSS GiB: ours {spread('ours_peak_rss_bytes', 2**30, 2)}, "
            f"diffusers {spread('diffusers_peak_rss_bytes', 2**30, 2)}; ours/diffusers {s['rss_ratio']:.3f}\n"
            f"  images (run 0): max difference {s['image_max_diff']}/255, mean {s['image_mean_diff']}/255")


def main(ckpt: str, config: str | None, size: int, steps: int, runs: int, precision: str, as_json: bool) -> int:
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if as_json else (lambda s: print(s, flush=True))
    try:
        result = compare(ckpt, config, size, steps, runs, precision, log)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(result))
    else:
        print(format_summary(result["summary"]))
    return 0
