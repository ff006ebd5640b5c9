"""The --ray driver's writing and resume state, without Ray: batches delivered in any order give the
single-process run's files, name for name and byte for byte; a run killed at any point, run again,
renders only what is missing and still ends with exactly those files."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prompt_runs import IMAGES, run_flags, single_process_run, tree

from optimizedSD.fronts.cli import build_parser, prepare_ray
from optimizedSD.outputs.delivery import Delivery
from optimizedSD.outputs.images import ImageWriter
from optimizedSD.outputs.manifest import NAME, Manifest, ManifestError


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    return single_process_run(tiny_model, tmp_path_factory.mktemp("reference"))


def delivery_for(tiny_model, reference, outdir: Path, *extra):
    args = build_parser().parse_args(run_flags(tiny_model, reference[0], outdir, "--ray", *extra))
    run = prepare_ray(args, lambda *a: None)
    manifest = Manifest.open(outdir)
    return Delivery(outdir, run.requests, run.metas, run.keys, manifest, skip_grid=args.skip_grid), manifest


def deliver_all(delivery, reference, order_seed: int = 0, encoded: bool = False) -> None:
    """Every job, in a shuffled order, with the reference run's pixels for its seeds (as arrays, or
    `encoded` as a worker sends them: the files' bytes, and the pixels only for the grid)."""
    jobs = delivery.jobs()
    random.Random(order_seed).shuffle(jobs)
    for job in jobs:
        images = [np.asarray(Image.open(next(reference[1].glob(f"*/seed_{s}_*.png")))) for s in job.seeds]
        r = delivery.requests[job.request]
        encoder = ImageWriter("", r.prompt, metadata=delivery.metas[job.request])
        files = [encoder.encode(Image.fromarray(a), s) for a, s in zip(images, job.seeds)] if encoded else None
        delivery.deliver(job, list(job.seeds), None if encoded and delivery.skip_grid else images, files)


def lines(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / NAME).read_text().splitlines()]


def test_any_arrival_order_writes_the_single_process_files(tiny_model, reference, tmp_path):
    for order in range(4):
        out = tmp_path / str(order)
        delivery, manifest = delivery_for(tiny_model, reference, out)
        with manifest:
            assert delivery.skipped == 0 and delivery.to_render == IMAGES and len(delivery.jobs()) == IMAGES // 2
            deliver_all(delivery, reference, order, encoded=order % 2 == 1)
            assert delivery.done and delivery.written == IMAGES and delivery.grids == 3
        assert tree(out) == tree(reference[1])
        assert sum("file" in entry for entry in lines(out)) == IMAGES + 3


def test_same_settings_skip_everything_other_settings_render_anew(tiny_model, reference, tmp_path):
    delivery, manifest = delivery_for(tiny_model, reference, tmp_path)
    with manifest:
        deliver_all(delivery, reference)
    delivery, manifest = delivery_for(tiny_model, reference, tmp_path)
    with manifest:
        assert delivery.jobs() == [] and delivery.skipped == IMAGES
    delivery, manifest = delivery_for(tiny_model, reference, tmp_path, "--scale", "5")
    with manifest:
        assert len(delivery.jobs()) == IMAGES // 2 and delivery.skipped == 0
    delivery, manifest = delivery_for(tiny_model, reference, tmp_path, "--n_samples", "3", "--n_iter", "2")
    with manifest:  # other batches, the same seeds and settings: the same images
        assert delivery.jobs() == [] and delivery.skipped == IMAGES
    next(tmp_path.glob("a_cat/seed_*_00002.png")).unlink()  # a file deleted by hand is rendered again
    delivery, manifest = delivery_for(tiny_model, reference, tmp_path)
    with manifest:
        assert delivery.skipped == IMAGES - 1 and [len(job.seeds) for job in delivery.jobs()] == [2]


@pytest.mark.parametrize("where", ["between files", "line half-written", "file written, line not",
                                   "name reserved, nothing written"])
def test_killed_run_resumes_to_the_single_process_files(tiny_model, reference, tmp_path, where):
    """A whole run cut back to what a run killed while writing its 8th file would have left."""
    delivery, manifest = delivery_for(tiny_model, reference, tmp_path)
    with manifest:
        deliver_all(delivery, reference, order_seed=1)
    raw = (tmp_path / NAME).read_bytes().splitlines(keepends=True)
    entries = [json.loads(line) for line in raw]
    assert "dir" in entries[14] and "file" in entries[15]  # each file: a "writing" line, then a "written" one
    for entry in entries[16:]:  # what came after the kill never was
        if "file" in entry:
            (tmp_path / entry["file"]).unlink()
    eighth = tmp_path / entries[15]["file"]
    keep = 14 if where == "between files" else 15
    tail = raw[15][:len(raw[15]) // 2] if where == "line half-written" else b""
    (tmp_path / NAME).write_bytes(b"".join(raw[:keep]) + tail)
    if where == "between files":
        eighth.unlink()
    if where == "name reserved, nothing written":  # images.py reserves the name, then renames a temporary file onto it
        eighth.write_bytes(b"")
        eighth.with_name(f".{eighth.name}.part").write_bytes(b"\x89PNG, cut short")
    before = sum("seed" in e and "file" in e for e in entries[:14])
    adopted = where in ("line half-written", "file written, line not") and "seed" in entries[15]

    delivery, manifest = delivery_for(tiny_model, reference, tmp_path)
    with manifest:
        assert delivery.skipped == before + adopted
        assert manifest.dropped == (where == "line half-written")
        assert len(manifest.settled) == (where != "between files")
        deliver_all(delivery, reference)
        assert delivery.done
    assert tree(tmp_path) == tree(reference[1])  # nothing twice, nothing missing, the same names
    assert not list(tmp_path.rglob("*.part"))


def test_grids_of_a_resumed_run_come_from_the_files_on_disk(tiny_model, reference, tmp_path):
    delivery, manifest = delivery_for(tiny_model, reference, tmp_path, "--skip_grid")
    with manifest:
        deliver_all(delivery, reference, encoded=True)  # files only: no pixels are sent without a grid
    assert not list(tmp_path.glob("*/grid_*"))
    delivery, manifest = delivery_for(tiny_model, reference, tmp_path)
    with manifest:
        assert delivery.jobs() == []
        delivery.start()
        assert delivery.grids == 3 and delivery.done
    assert tree(tmp_path) == tree(reference[1])


def test_one_run_at_a_time_per_folder(tmp_path):
    with Manifest.open(tmp_path):
        with pytest.raises(ManifestError, match="another run is writing to .*; wait for it to finish"):
            Manifest.open(tmp_path)
    Manifest.open(tmp_path).close()  # released
    shutil.rmtree(tmp_path)
