"""Helpers of the --ray tests: one prompt-file run's flags, the single-process CLI run that is their
reference, and an output folder as {relative path: bytes}."""
from __future__ import annotations

from pathlib import Path

import torch

from optimizedSD.fronts.cli import main
from optimizedSD.outputs.manifest import NAME

PROMPTS = "a red fox\na cat\na red fox\n"  # the repeated line shares a folder: numbering continues in it
N_SAMPLES, N_ITER = 2, 3  # 3 prompts x 6 images = 18 images, 9 batches, 3 grids
IMAGES = 3 * N_SAMPLES * N_ITER


def run_flags(tiny_model, prompt_file: Path, outdir: Path, *extra) -> list[str]:
    ckpt, yaml, *_ = tiny_model
    return [str(a) for a in ("--ckpt", ckpt, "--config", yaml, "--outdir", outdir, "--H", 64, "--W", 64,
                             "--ddim_steps", 3, "--sampler", "ddim", "--device", "cpu", "--from-file", prompt_file,
                             "--n_samples", N_SAMPLES, "--n_iter", N_ITER, "--seed", 5, *extra)]


def single_process_run(tiny_model, root: Path) -> tuple[Path, Path]:
    """(prompt file, output folder) of the plain CLI run, on one thread (as a Ray worker with one CPU:
    torch's float sums may round differently with another thread count)."""
    prompt_file = root / "prompts.txt"
    prompt_file.write_text(PROMPTS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(run_flags(tiny_model, prompt_file, root / "single")) == 0
    finally:
        torch.set_num_threads(threads)
    return prompt_file, root / "single"


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` but the manifest: {relative path: bytes}."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != NAME}
