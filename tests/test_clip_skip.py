"""--clip_skip N: the text encoder's N-th hidden state from the end, through its final layer norm, for the
prompt and the negative prompt alike, checked against transformers' CLIPTextModel's own hidden states
(`output_hidden_states=True`, `hidden_states[-N]`, then `final_layer_norm`) fed to diffusers'
StableDiffusionPipeline as `prompt_embeds` and `negative_prompt_embeds`. (Not diffusers' `clip_skip`
argument: it counts one lower and applies to the prompt only.) Also: the layers after it never run and
never reach the device, bad values are one line, and an image replays from its PNG metadata.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from reference import assert_same_image, ddim_scheduler, sd_pipeline
from test_cli import run_cli, tiny_args

from optimizedSD.engine.offload import Offloader, fragment_bytes
from optimizedSD.engine.pipeline import Pipeline, SampleSettings
from optimizedSD.engine.inputs import to_pil
from optimizedSD.engine.request import Request, RequestError, check
from optimizedSD.model.checkpoint import load_fragments
from optimizedSD.model.fragments import TEXT_ENCODER

PROMPT, NEGATIVE = "a red fox sitting in the snow, oil painting", "blurry, low quality"


@pytest.fixture(scope="module")
def reference(random_model):
    cfg, _, state, workdir = random_model
    return sd_pipeline(cfg, state, ddim_scheduler(), workdir)


def reference_states(pipe, text: str, skip: int) -> torch.Tensor:
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    clip = pipe.text_encoder
    with torch.no_grad():
        out = clip(input_ids=ids, output_hidden_states=True)
        return getattr(clip, "text_model", clip).final_layer_norm(out.hidden_states[-skip])


def pipeline(model, **attrs) -> Pipeline:
    cfg, path, _, _ = model
    pipe = Pipeline(cfg, Offloader(load_fragments(path, cfg), torch.device("cpu"), copy_on_host=True))
    for k, v in attrs.items():
        setattr(pipe, k, v)
    return pipe


@pytest.mark.parametrize("syntax", ["webui", "plain"])
def test_states_are_the_reference_hidden_state_through_the_final_norm(random_model, reference, syntax):
    depth = random_model[0].text.num_hidden_layers
    for skip in range(1, depth + 1):
        pipe = pipeline(random_model, clip_skip=skip, prompt_syntax=syntax)
        with torch.no_grad():
            cond, uncond = pipe.prompt_pair(PROMPT, NEGATIVE, SampleSettings("ddim", 10))
        for ours, text in ((cond, PROMPT), (uncond, NEGATIVE)):
            ref = reference_states(reference, text, skip)[0]
            assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (skip, text)
    last = reference_states(reference, PROMPT, 1)
    with torch.no_grad():
        assert torch.allclose(last, reference.text_encoder(reference.tokenizer(
            PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids).last_hidden_state, atol=1e-5)


def test_image_equals_diffusers_fed_the_skipped_states(random_model, reference):
    cfg = random_model[0]
    steps, seed = 8, 21
    pipe = pipeline(random_model, clip_skip=2, prompt_syntax="webui")
    with torch.no_grad():
        ours = np.asarray(to_pil(pipe.txt2img(PROMPT, NEGATIVE, [seed], 64, 64, SampleSettings("ddim", steps)))[0])
    generator = torch.Generator("cpu").manual_seed(seed)
    f = cfg.downsample_factor
    latents = torch.randn((1, cfg.channels, 64 // f, 64 // f), generator=generator)
    with torch.no_grad():
        out = reference(prompt_embeds=reference_states(reference, PROMPT, 2),
                        negative_prompt_embeds=reference_states(reference, NEGATIVE, 2), height=64, width=64,
                        num_inference_steps=steps, guidance_scale=7.5, latents=latents, generator=generator,
                        output_type="np").images
    assert_same_image(ours.astype(np.int16), (out[0] * 255).round().astype(np.int16))
    with torch.no_grad():
        last = np.asarray(to_pil(pipeline(random_model).txt2img(PROMPT, NEGATIVE, [seed], 64, 64,
                                                                SampleSettings("ddim", steps)))[0])
    assert np.abs(last.astype(np.int16) - ours).max() > 2  # the skip reached the image


def test_the_layers_after_it_never_run_nor_reach_the_device(random_model):
    pipe = pipeline(random_model, clip_skip=2)
    encoder = pipe.engine.fragments[TEXT_ENCODER]
    layers = encoder.transformer.text_model.encoder.layers
    ran = []
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            pipe.prompt_pair(PROMPT, NEGATIVE, SampleSettings("ddim", 10))
    finally:
        for h in hooks:
            h.remove()
    assert set(ran) == set(range(len(layers) - 1))  # the last layer never ran
    moved = pipe.engine.phase_bytes["text"]
    assert moved == fragment_bytes(encoder) - fragment_bytes(layers[-1])  # ... nor was copied to the device


@pytest.mark.parametrize("skip,words", [(0, "--clip_skip must be at least 1, got 0"),
                                        (3, "--clip_skip must be at most 2 (the text encoder has 2 layers")])
def test_bad_clip_skip_is_one_line_and_nothing_is_written(tiny_model, tmp_path, capsys, skip, words):
    code, out, err = run_cli(tiny_args(tiny_model, tmp_path / "out", "--prompt", "p", "--seed", 1,
                                       "--clip_skip", skip), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and words in lines[0], err
    assert not (tmp_path / "out").exists()
    cfg = tiny_model[2]
    with pytest.raises(RequestError, match="Clip skip must be at least 1"):
        from optimizedSD.engine.request import UI_LABELS
        check(Request("p", sampler="ddim", width=64, height=64, seed=1, scale=7.5, unet_bs=1, clip_skip=0), cfg,
              UI_LABELS)


@pytest.mark.parametrize("extra,key", [
    (["--clip_skip", "2", "--prompt", "a [fox:cat:0.5] in (snow:1.3) BREAK [x|y]"], "Clip skip: 2"),
    (["--pad_conds", "--prompt", "a fox BREAK in the snow", "--negative_prompt", "[blurry:ugly:1]"],
     "Pad conds: True"),
    (["--prompt_syntax", "plain", "--prompt", "a (fox:1.5)"], "Prompt syntax: plain"),
])
def test_an_image_replays_from_its_png_metadata(tiny_model, tmp_path, capsys, extra, key):
    from optimizedSD.engine.engine import Engine
    from optimizedSD.engine.spec import resolve_model
    from optimizedSD.outputs.infotext import parse, read_parameters, request_fields

    code, out, err = run_cli(tiny_args(tiny_model, tmp_path, "--seed", 5, "--n_samples", 1, "--skip_grid",
                                       "--ddim_steps", 4, *extra), capsys)
    assert code == 0, err
    (png,) = tmp_path.glob("*/*.png")
    image = Image.open(png)
    text = read_parameters(image)
    assert key in text.splitlines()[-1]
    fields, notes = request_fields(parse(text))
    assert not notes
    ckpt, yaml, *_ = tiny_model
    engine = Engine(resolve_model(ckpt, yaml, device="cpu")).load()
    r = engine.complete(Request(**fields))
    (batch,) = list(engine.render(r))
    assert np.array_equal(np.asarray(batch[0].image), np.asarray(image.convert("RGB")))
