"""The engine: loaded once, renders many requests; images equal the reference pipeline's; a request
leaves nothing behind for the next; progress, cancelling, planning."""
from __future__ import annotations

import numpy as np
import pytest
from diffusers import DDIMScheduler
from reference import NEGATIVE, PROMPT, assert_same_image, diffusers_images, random_tiny_model, sd_v1_scheduler_config, write_yaml_config

from optimizedSD.engine.engine import Cancelled, Engine, RunStats, model_evals
from optimizedSD.engine.spec import resolve_model
from optimizedSD.engine.request import Request, RequestError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(model, tmp_path_factory):
    cfg, path, _, _ = model
    yaml = write_yaml_config(cfg, tmp_path_factory.mktemp("cfg") / "tiny.yaml")
    return Engine(resolve_model(path, yaml, device="cpu")).load()


def pixels(batches) -> list[np.ndarray]:
    return [np.asarray(item.image).astype(np.int16) for batch in batches for item in batch]


def ddim():
    cfg = sd_v1_scheduler_config()
    cfg.pop("skip_prk_steps")
    return DDIMScheduler(**cfg)


def request(engine, **kw) -> Request:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, sampler="ddim", steps=10, width=64, height=64, seed=11)
    return engine.complete(Request(**{**base, **kw}))


def test_requests_on_one_engine_equal_diffusers(engine, model):
    """Several requests of different sizes, batches and memory modes on one loaded engine; each image
    equals diffusers' StableDiffusionPipeline for its seed."""
    first = pixels(engine.render(request(engine, n_samples=2, n_iter=2)))
    assert len(first) == 4
    for i in (0, 3):
        assert_same_image(first[i], diffusers_images(model, 11 + i, 64, 64, ddim())[0])
    other = pixels(engine.render(request(engine, width=72, height=56, seed=3, memory="lowvram", unet_bs=2)))
    assert_same_image(other[0], diffusers_images(model, 3, 56, 72, ddim())[0])
    again = pixels(engine.render(request(engine, n_samples=2, n_iter=2)))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # nothing left behind by the other requests
    assert engine.loads == 1


def test_progress_reports_every_step_and_cancel_stops_between_steps(engine):
    seen = []
    batches = list(engine.render(request(engine, n_samples=1, n_iter=2, steps=4), on_step=lambda d, t: seen.append((d, t))))
    assert len(batches) == 2 and seen == [(d, 8) for d in range(1, 9)]
    stats, got = RunStats(), []
    with pytest.raises(Cancelled):
        for batch in engine.render(request(engine, n_samples=1, n_iter=3, steps=4), stats=stats,
                                   on_step=lambda d, t: seen.append(d), cancel=lambda: len(seen) >= 8 + 6):
            got.append(batch)
    assert len(got) == 1 and stats.images == 1  # the first image finished; the second stopped at its 2nd step
    assert engine._engine.on_device == set()  # nothing left on the device


def test_one_batch_of_a_request_is_that_batch_of_the_whole_run(engine):
    """`iterations` renders chosen batches (a cluster job), each exactly as in the whole run, fixed code included."""
    for fixed in (False, True):
        r = request(engine, n_samples=2, n_iter=3, steps=4, fixed_code=fixed)
        whole = list(engine.render(r))
        seen = []
        part = list(engine.render(r, iterations=[2, 0], on_step=lambda d, t: seen.append((d, t))))
        assert [[item.seed for item in b] for b in part] == [[15, 16], [11, 12]] and seen[-1] == (8, 8)
        for got, want in zip(part, (whole[2], whole[0])):
            assert [item.index for item in got] == [item.index for item in want]
            assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="outside the request's 3 batches"):
        list(engine.render(r, iterations=[3]))


def test_request_errors_come_before_any_work(engine):
    with pytest.raises(RequestError, match="--scale must be a finite number"):
        request(engine, scale=float("inf"))
    with pytest.raises(RequestError, match="--W 60 is not a positive multiple of 8"):
        request(engine, width=60)
    with pytest.raises(RequestError, match="--vram 0.00 GiB is too small"):
        engine.plan(request(engine, memory="1K"))


def test_an_image_request_without_its_image_says_so_before_the_size(engine):
    from optimizedSD.engine.request import UI_LABELS

    with pytest.raises(RequestError, match="^inpaint needs an init image; give Image$"):
        engine.complete(Request("a cat", kind="inpaint"), labels=UI_LABELS)


def test_whole_numbers_in_real_fields_are_the_same_request(engine):
    """A form's 3 for the guidance scale is 3.0: the same request, recorded the same way by every front."""
    r = request(engine, scale=3, eta=0)
    assert (type(r.scale), type(r.eta)) == (float, float) and r == request(engine, scale=3.0, eta=0.0)


def test_planning_runs_one_step_per_batch_shape(monkeypatch):
    """On meta a run of 10 images, 4 at once (4, 4, 2), predicts two shapes, each once."""
    from optimizedSD.engine import planner
    from optimizedSD.engine.planner import MemoryPlan

    engine = Engine(resolve_model(device="meta"))
    calls = []
    real = planner.predict

    def counting(cfg, dtype, plan, height, width, batch, *a, **k):
        calls.append(batch)
        return real(cfg, dtype, plan, height, width, batch, *a, **k)

    monkeypatch.setattr(planner, "predict", counting)
    r = engine.complete(Request("p", n_samples=10, n_iter=3, steps=20, sampler="heun", width=64, height=64))
    monkeypatch.setattr(engine, "plan", lambda r: MemoryPlan("stream", (), 4, 1, False))
    stats = RunStats()
    assert list(engine.render(r, stats=stats)) == []
    assert sorted(calls) == [2, 4] and stats.images == 30
    assert stats.peaks["sample"] > 0


@pytest.mark.parametrize("sampler,steps,evals", [("ddim", 10, 10), ("euler", 10, 10), ("heun", 10, 19),
                                                 ("dpm2", 10, 19), ("plms", 10, 11), ("dpmpp_2m", 10, 10)])
def test_model_evaluations_per_sampler(sampler, steps, evals):
    """Heun and DPM2 evaluate twice per step but the last (to sigma 0); PLMS twice on its first."""
    from optimizedSD.model.config import SDConfig

    r = Request("p", sampler=sampler, steps=steps, seed=0, scale=7.5, width=64, height=64)
    assert model_evals(SDConfig(), r) == evals
