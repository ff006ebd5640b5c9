"""--ray on a local Ray cluster (2 CPUs, one worker each) with the tiny checkpoint: a prompt file of 3
prompts x 2 samples x 3 batches gives the single-process CLI's files, name for name and byte for byte
(pixels and metadata), through a Ctrl-C and a resume, and with a worker killed mid-run; a run of what
is all there renders nothing and says so. Bad input stops a run before Ray starts."""
from __future__ import annotations

import _thread
import io
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from prompt_runs import IMAGES, run_flags, single_process_run, tree

from optimizedSD.fronts import cluster
from optimizedSD.fronts.cli import main
from optimizedSD.outputs.manifest import NAME
from optimizedSD.engine.request import RequestError


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    return single_process_run(tiny_model, tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def local_cluster():
    assert cluster.connect(None, num_cpus=2)  # what --ray alone does, kept for the module's runs
    yield
    ray.shutdown()


def run_acting_on_first_image(flags: list[str], outdir: Path, act, monkeypatch) -> tuple[int, str, str]:
    """main(flags) here, while a watcher calls act(stdout so far) once the manifest records a file:
    (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    running = threading.Event()
    running.set()

    def watch():
        deadline = time.monotonic() + 240
        while running.is_set() and time.monotonic() < deadline:
            if (outdir / NAME).is_file() and b'"file"' in (outdir / NAME).read_bytes():
                act(out.getvalue())
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        code = main(flags)
    finally:
        running.clear()
        watcher.join(10)
        monkeypatch.undo()
    return code, out.getvalue(), err.getvalue()


def run(flags, capsys) -> tuple[int, str, str]:
    code = main(flags)
    out, err = capsys.readouterr()
    return code, out, err


# ---- refused before any cluster -------------------------------------------------------------
def test_bad_input_stops_the_run_before_ray_starts(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cluster, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na cat:1 a dog:-1\n")
    code, _, err = run(run_flags(tiny_model, prompts, tmp_path / "out", "--ray"), capsys)
    assert code == 2 and err.startswith(f"error: {prompts} line 2: sub-prompt weights must sum to a positive number")
    assert err.count("\n") == 1
    code, _, err = run(run_flags(tiny_model, prompts, tmp_path / "out", "--workers", 2), capsys)
    assert code == 2 and err.startswith("error: --workers goes with --ray")
    prompts.write_text("a red fox\n")
    code, _, err = run(run_flags(tiny_model, prompts, tmp_path / "out", "--ray", "--device", "meta"), capsys)
    assert code == 2 and err.startswith("error: --device meta does not go with --ray")
    flags = [f for f in run_flags(tiny_model, prompts, tmp_path / "out", "--ray", "--vram", "1M")]
    at = flags.index("--device")
    del flags[at:at + 2]  # no --device, no --precision: planned for a CUDA worker at its default precision
    code, _, err = run(flags, capsys)
    assert code == 2 and err.startswith("error: --vram ") and "is too small for 64x64" in err and err.count("\n") == 1
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    code, _, err = run(run_flags(tiny_model, prompts, tmp_path / "out", "--ray"), capsys)
    assert (code, err) == (2, "error: --ray needs Ray: pip install ray (or drop --ray to render in this process)\n")
    assert not (tmp_path / "out").exists()


def test_what_a_worker_raises_reaches_the_command_line_as_it_would_in_one_process():
    def raised(cause):
        return ray.exceptions.RayTaskError("render", "Traceback ...", cause)
    refused = cluster._cause(raised(RequestError("--scale must be a finite number, got nan")))
    assert type(refused) is RequestError and str(refused) == "--scale must be a finite number, got nan"
    oom = torch.cuda.OutOfMemoryError("out of memory")
    assert cluster._cause(raised(oom)) is oom  # the CLI's out-of-memory line, exit 1
    bug = raised(ZeroDivisionError("division by zero"))
    assert cluster._cause(bug) is bug  # with the worker's traceback


# ---- on the cluster -------------------------------------------------------------------------
def test_interrupted_run_resumes_to_the_single_process_files_then_renders_nothing(
        tiny_model, reference, local_cluster, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ray"
    flags = run_flags(tiny_model, reference[0], out, "--ray", "--workers", 2)
    code, _, err = run_acting_on_first_image(flags, out, lambda _: _thread.interrupt_main(), monkeypatch)
    assert code == 130 and "interrupted" in err
    # images written whole; an interrupt can also leave one empty name reserved (the manifest's "writing"
    # line), which the resume deletes and renders (outputs/manifest.py)
    first = sum(1 for png in out.glob("*/seed_*.png") if png.stat().st_size)
    assert 0 < first < IMAGES

    code, stdout, err = run(flags, capsys)
    assert code == 0, err
    assert f"skipping {first} images already in {out}, rendering {IMAGES - first}" in stdout
    assert f"wrote {IMAGES - first} images and 3 grid(s)" in stdout
    assert tree(out) == tree(reference[1])  # every name, pixel and metadata chunk of the single-process run

    code, stdout, err = run(flags, capsys)
    assert code == 0, err
    assert stdout == f"nothing to render: all {IMAGES} images of this run are in {out} already (skipped {IMAGES})\n"
    assert tree(out) == tree(reference[1])


def test_a_worker_killed_mid_run_its_jobs_rerun_every_image_once(tiny_model, reference, local_cluster, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "ray"
    killed = []

    def kill_a_busy_worker(stdout: str):
        k = re.search(r"worker (\d+) ready", stdout).group(1)  # the first one ready holds jobs now
        name = next(n for n in ray.util.list_named_actors() if n.startswith(f"optimizedSD-worker-{k}-"))
        ray.kill(ray.get_actor(name), no_restart=False)  # as a crash: its running job fails, Ray restarts it
        killed.append(k)

    flags = run_flags(tiny_model, reference[0], out, "--ray", "--workers", 2)
    code, stdout, err = run_acting_on_first_image(flags, out, kill_a_busy_worker, monkeypatch)
    assert code == 0, err
    assert killed and f"worker {killed[0]} died (" in err
    assert f"wrote {IMAGES} images and 3 grid(s)" in stdout
    assert tree(out) == tree(reference[1])  # each image once, none half-written, the same names
