"""--long_prompts: prompts over 75 tokens encoded whole, in 75-token chunks, as AUTOMATIC1111's webui does.

Every expectation is built here independently of the code under test: token ids from OpenAI's own
`simple_tokenizer.py`, chunk rows written out by hand ([BOS] + 75 ids + [EOS], EOS padding), hidden
states from transformers' `CLIPTextModel` converted from the checkpoint by diffusers' converter, and
images from diffusers' `StableDiffusionPipeline` fed those states as `prompt_embeds`.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import DDIMScheduler
from reference import assert_same_image, random_tiny_model, sd_pipeline, sd_v1_scheduler_config, transformers_clip

from optimizedSD.model.attention import AttentionPolicy, using_policy
from optimizedSD.model.checkpoint import load_fragments
from optimizedSD.engine.inputs import to_pil
from optimizedSD.engine.offload import Offloader
from optimizedSD.engine.pipeline import Pipeline, SampleSettings

REPO = Path(__file__).resolve().parent.parent

# 160 tokens (asserted below): 75 + 75 + 10.
LONG = ("a highly detailed matte painting of a castle on a hill at sunset, by greg rutkowski and thomas kinkade, "
        "trending on artstation, 8k, octane render, volumetric lighting, dramatic clouds, a river in the valley, "
        "birds in the sky, cinematic composition, golden hour, ultra wide angle, sharp focus, intricate, elegant, "
        "fantasy, concept art, hdr, masterpiece, award winning photograph, in the style of studio ghibli, "
        "a lighthouse on a rocky shore, stormy sea, crashing waves, seagulls, a small boat with a red sail, "
        "fishermen mending nets, lanterns glowing in the dusk, cobblestone streets, a bakery with fresh bread "
        "in the window, children playing, a cat asleep on a windowsill" + " 7" * 13)
SHORT = "blurry, low quality"


def oracle_rows(oracle, text: str) -> list[list[int]]:
    """The chunk rows of `text`, written out: [BOS] + ids[75j:75j+75] + [EOS], padded with EOS to 77."""
    bos, eos = oracle.encoder["<|startoftext|>"], oracle.encoder["<|endoftext|>"]
    ids = oracle.encode(text)
    pieces = [ids[i:i + 75] for i in range(0, len(ids), 75)] or [[]]
    return [[bos, *piece, eos] + [eos] * (75 - len(piece)) for piece in pieces]


def padded(rows: list[list[int]], k: int, oracle) -> list[list[int]]:
    """`rows` followed by empty chunks (BOS, EOS, EOS padding) up to `k` rows."""
    return rows + oracle_rows(oracle, "") * (k - len(rows))


# ---- 1. chunk rows ------------------------------------------------------------------------------

def test_long_text_rows_are_75_token_chunks(tok, oracle):
    ids = oracle.encode(LONG)
    assert len(ids) == 160
    bos, eos = 49406, 49407
    rows = tok.chunks([LONG])
    assert rows.dtype == torch.long and rows.shape == (1, 3, 77)
    assert rows[0, 0].tolist() == [bos, *ids[0:75], eos]
    assert rows[0, 1].tolist() == [bos, *ids[75:150], eos]
    assert rows[0, 2].tolist() == [bos, *ids[150:160], eos] + [eos] * 65


def test_texts_are_padded_to_the_same_number_of_chunks(tok, oracle):
    texts = [SHORT, LONG, ""]
    rows = tok.chunks(texts)
    assert rows.shape == (3, 3, 77)
    for n, text in enumerate(texts):
        assert rows[n].tolist() == padded(oracle_rows(oracle, text), 3, oracle), text


def test_short_texts_are_one_row_equal_to_the_default(tok, oracle, caplog):
    texts = [SHORT, "", "a cat", " ".join(["cat"] * 75)]  # the last exactly fills one row
    assert len(oracle.encode(texts[-1])) == 75
    rows = tok.chunks(texts)
    assert rows.shape == (4, 1, 77)
    assert torch.equal(rows[:, 0], tok(texts))
    for n, text in enumerate(texts):
        assert rows[n].tolist() == oracle_rows(oracle, text)


def test_exact_multiples_of_75_add_no_empty_chunk_and_nothing_is_logged(tok, oracle, caplog):
    text = " ".join(["cat", "dog", "fox"] * 50)  # 150 tokens
    assert len(oracle.encode(text)) == 150
    with caplog.at_level(logging.WARNING, logger="optimizedSD.model.tokenizer"):
        rows = tok.chunks([text, LONG])
    assert rows.shape == (2, 3, 77)
    assert rows[0].tolist() == padded(oracle_rows(oracle, text), 3, oracle)
    assert not caplog.records


# ---- 2. conditioning ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model whose every weight is random, as a real .ckpt: (cfg, path, state dict, tokenizer dir)."""
    return random_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def reference_clip(model):
    cfg, _, state, _ = model
    return transformers_clip(cfg, state)


def pipeline(model, long_prompts: bool) -> Pipeline:
    cfg, path, _, _ = model
    return Pipeline(cfg, Offloader(load_fragments(path, cfg), torch.device("cpu")), long_prompts=long_prompts)


def reference_states(clip, oracle, texts: list[str]) -> list[torch.Tensor]:
    """Each text's chunks encoded one row at a time by transformers' CLIP and concatenated on the token
    axis, shorter texts padded with empty-chunk encodings: one (77 * K, hidden) tensor per text."""
    rows = [oracle_rows(oracle, t) for t in texts]
    k = max(len(r) for r in rows)
    with torch.no_grad():
        return [torch.cat([clip(input_ids=torch.tensor([row])).last_hidden_state[0]
                           for row in padded(r, k, oracle)]) for r in rows]


def assert_close(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = ref.abs().max().item()
    assert scale > 1e-2
    assert (ours - ref).abs().max().item() <= 1e-5 * scale


def test_conditioning_concatenates_chunk_encodings(model, reference_clip, oracle):
    cfg = model[0]
    with torch.no_grad():
        context = pipeline(model, True).conditioning([LONG, SHORT])
    assert context.shape == (2, 3 * 77, cfg.text.hidden_size)
    long_ref, short_ref = reference_states(reference_clip, oracle, [LONG, SHORT])
    assert_close(context[0], long_ref)
    assert_close(context[1], short_ref)  # its chunks 2 and 3 are the empty prompt's encoding
    # Each chunk is encoded on its own: chunk 2 starts again at BOS, so its first state is chunk 1's.
    assert torch.allclose(context[0, 77], context[0, 0], atol=1e-6)


def test_weighted_sub_prompts_are_summed_after_padding(model, reference_clip, oracle):
    with torch.no_grad():
        context = pipeline(model, True).conditioning([f"{LONG}:0.75 {SHORT}:0.25"])
    long_ref, short_ref = reference_states(reference_clip, oracle, [LONG, SHORT])
    assert_close(context[0], 0.75 * long_ref + 0.25 * short_ref)


def test_short_prompts_give_the_default_conditioning_exactly(model):
    prompts = ["a red fox in the snow", SHORT]
    with torch.no_grad():
        default = pipeline(model, False).conditioning(prompts)
        chunked = pipeline(model, True).conditioning(prompts)
    assert default.shape == chunked.shape == (2, 77, model[0].text.hidden_size)
    assert torch.equal(default, chunked)


def test_default_still_truncates_to_the_first_chunk(model, caplog):
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="optimizedSD.model.tokenizer"):
        default = pipeline(model, False).conditioning([LONG, SHORT])
    assert default.shape == (2, 77, model[0].text.hidden_size)
    messages = [r.getMessage() for r in caplog.records if r.name == "optimizedSD.model.tokenizer"]
    assert len(messages) == 1 and messages[0].startswith("prompt is 160 tokens; the last 85 of them were dropped")
    assert "--long_prompts" in messages[0]
    caplog.clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="optimizedSD.model.tokenizer"):
        chunked = pipeline(model, True).conditioning([LONG, SHORT])
    assert not caplog.records
    # The truncated row is the first chunk row, so the default states are the first 77 positions.
    assert torch.allclose(default, chunked[:, :77], rtol=0, atol=1e-5)


# ---- 3. end to end against diffusers ------------------------------------------------------------

def _ddim():
    cfg = sd_v1_scheduler_config()
    cfg.pop("skip_prk_steps")
    return DDIMScheduler(**cfg)


@pytest.mark.parametrize("policy", [
    AttentionPolicy("sdpa"),
    AttentionPolicy("chunked", slice_size=3, chunk_size=7),  # blocks over a 231-token context
], ids=["sdpa", "chunked"])
def test_image_equals_diffusers_fed_chunked_embeddings(model, oracle, policy):
    cfg, _, state, workdir = model
    seed, size, steps, scale = 1234, 64, 10, 7.5
    with using_policy(policy), torch.no_grad():
        x = pipeline(model, True).txt2img(LONG, SHORT, [seed], size, size, SampleSettings("ddim", steps, scale))
    ours = np.stack([np.asarray(im) for im in to_pil(x)]).astype(np.int16)[0]

    reference = sd_pipeline(cfg, state, _ddim(), workdir)
    cond, uncond = reference_states(reference.text_encoder, oracle, [LONG, SHORT])
    generator = torch.Generator("cpu").manual_seed(seed)
    f = cfg.downsample_factor
    latents = torch.randn((1, cfg.channels, size // f, size // f), generator=generator)
    with torch.no_grad():
        out = reference(prompt_embeds=cond[None], negative_prompt_embeds=uncond[None], height=size, width=size,
                        num_inference_steps=steps, guidance_scale=scale, latents=latents, generator=generator,
                        output_type="np").images
    theirs = (out * 255).round().astype(np.int16)[0]
    assert_same_image(ours, theirs)

    # The tokens after the first 75 matter: the default (truncating) image is another image.
    with using_policy(policy), torch.no_grad():
        x = pipeline(model, False).txt2img(LONG, SHORT, [seed], size, size, SampleSettings("ddim", steps, scale))
    truncated = np.asarray(to_pil(x)[0]).astype(np.int16)
    print(f"truncated vs long_prompts image: mean diff {np.abs(truncated - ours).mean():.1f}/255")
    assert np.abs(truncated - ours).mean() > 1


# ---- 4. command line ----------------------------------------------------------------------------

def run_script(tiny_model, outdir, *extra) -> tuple[subprocess.CompletedProcess, np.ndarray]:
    """optimized_txt2img.py on the tiny checkpoint with LONG as the prompt, in a process of its own (so
    a warning reaches stderr as a user sees it): (the process, the one image it wrote)."""
    ckpt, yaml, *_ = tiny_model
    argv = ["--ckpt", ckpt, "--config", yaml, "--outdir", outdir, "--H", 64, "--W", 64, "--ddim_steps", 2,
            "--sampler", "ddim", "--device", "cpu", "--n_samples", 1, "--seed", 3, "--skip_grid",
            "--prompt", LONG, *extra]
    result = subprocess.run([sys.executable, str(REPO / "optimizedSD/optimized_txt2img.py"), *map(str, argv)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    (folder,) = Path(outdir).iterdir()
    assert [p.name for p in folder.iterdir()] == ["seed_3_00000.png"]
    return result, np.asarray(Image.open(folder / "seed_3_00000.png").convert("RGB")).astype(np.int16)


def test_cli_long_prompts_writes_an_image_and_plain_syntax_warns(tiny_model, tmp_path):
    result, chunked = run_script(tiny_model, tmp_path / "long", "--prompt_syntax", "plain", "--long_prompts")
    assert "were dropped" not in result.stderr
    result, _ = run_script(tiny_model, tmp_path / "webui")  # the webui syntax (default) chunks, as the webui
    assert "were dropped" not in result.stderr

    result, truncated = run_script(tiny_model, tmp_path / "default", "--prompt_syntax", "plain")
    assert "prompt is 160 tokens; the last 85 of them were dropped (CLIP reads 75)" in result.stderr
    assert "--long_prompts" in result.stderr
    assert np.abs(truncated - chunked).max() > 0  # the flag reached the pipeline


def test_cli_help_describes_long_prompts():
    result = subprocess.run([sys.executable, str(REPO / "optimizedSD/optimized_txt2img.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps the help text
    assert "--long_prompts" in text and "75-token chunks" in text
