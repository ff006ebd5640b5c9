"""The webui prompt syntax (--prompt_syntax webui, the default) against an independent implementation of
AUTOMATIC1111's published rules, written here: the editing grammar run by `lark` (the parser library the
webui uses, on its published grammar), emphasis by a character scanner of its rules, tokens from
transformers' CLIPTokenizer, hidden states from transformers' CLIPTextModel, images from diffusers'
StableDiffusionPipeline fed `prompt_embeds` (a `callback_on_step_end` swaps them at the step for editing
and alternation), and diffusers' UNet + DDIMScheduler in a loop of our own for prompt and negative of
other lengths (two UNet batches, the webui's default). Nothing here is computed by the code under test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import assert_same_image, ddim_scheduler, sd_pipeline

from optimizedSD.engine.inputs import to_pil
from optimizedSD.engine.offload import Offloader
from optimizedSD.engine.pipeline import Pipeline, SampleSettings
from optimizedSD.engine.request import Request, RequestError, check
from optimizedSD.model.checkpoint import load_fragments
from optimizedSD.sampling import prompt_syntax

lark = pytest.importorskip("lark")

# ---- the reference parse -----------------------------------------------------------------------------
# The webui's published grammar for prompt editing (modules/prompt_parser.py), for lark's Earley parser.
GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""
PARSER = lark.Lark(GRAMMAR)


def ref_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(until_step, text)]: every switching step of the tree (a decimal `when` is a fraction of the steps,
    clamped to the steps; alternation switches at every step), the text at each by walking the tree."""
    try:
        tree = PARSER.parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]

    def when(node):
        s = str(node.children[-2])
        return min(steps, int(float(s) * steps if "." in s else float(s)))

    ends = {steps}
    for node in tree.iter_subtrees():
        if node.data == "scheduled" and when(node) >= 1:
            ends.add(when(node))
        if node.data == "alternate":
            ends |= set(range(1, steps + 1))

    def text(node, step) -> str:
        if node is None:
            return ""
        if isinstance(node, lark.Token):
            return str(node)
        if node.data == "scheduled":
            before, after = node.children[0], node.children[1]
            return text(before, step) if step <= when(node) else text(after, step)
        if node.data == "alternate":
            options = node.children
            return text(options[(step - 1) % len(options)], step)
        return "".join(text(c, step) for c in node.children)

    return [(end, text(tree, end)) for end in sorted(ends)]


def ref_attention(text: str) -> list[tuple[str, float]]:
    """The webui's emphasis rules, scanned character by character: (x) x1.1, [x] /1.1, (x:w) xw, escapes,
    unclosed openers weigh to the end, stray closers are text, BREAK -> ("BREAK", -1), equal runs merged."""
    out: list[list] = []  # [text, weight]
    opens: dict[str, list[int]] = {"(": [], "[": []}
    i = 0

    def add(s):
        out.append([s, 1.0])

    def scale(start, factor):
        for item in out[start:]:
            item[1] *= factor

    buf = ""

    def flush():
        nonlocal buf
        if buf:
            parts = [p for p in __import__("re").split(r"\s*\bBREAK\b\s*", buf)]
            for n, p in enumerate(parts):
                if n:
                    out.append(["BREAK", -1.0])
                add(p)
        buf = ""

    while i < len(text):
        c = text[i]
        if c == "\\":
            flush()
            add(text[i + 1:i + 2] if text[i + 1:i + 2] in ("(", ")", "[", "]", "\\") else "")
            i += 2 if text[i + 1:i + 2] in ("(", ")", "[", "]", "\\") else 1
            continue
        if c in "([":
            flush()
            opens[c].append(len(out))
        elif c == ":" and opens["("]:
            j = i + 1
            while j < len(text) and text[j].isspace():
                j += 1
            k = j
            while k < len(text) and (text[k].isdigit() or text[k] in ".+-"):
                k += 1
            m = k
            while m < len(text) and text[m].isspace():
                m += 1
            number = text[j:k]
            if m < len(text) and text[m] == ")" and number and number[0] in "+-.0123456789" \
                    and all(ch in ".0123456789" for ch in number[1:]):
                flush()
                scale(opens["("].pop(), float(number))
                i = m + 1
                continue
            flush()
            add(":")
        elif c == ":":
            flush()
            add(":")
        elif c == ")" and opens["("]:
            flush()
            scale(opens["("].pop(), 1.1)
        elif c == "]" and opens["["]:
            flush()
            scale(opens["["].pop(), 1 / 1.1)
        elif c in ")]":
            flush()
            add(c)
        else:
            buf += c
        i += 1
    flush()
    for start in opens["("]:
        scale(start, 1.1)
    for start in opens["["]:
        scale(start, 1 / 1.1)
    out = out or [["", 1.0]]
    merged = [out[0]]
    for item in out[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


# The webui's own documented examples (its doctests), steps = 10.
WEBUI_SCHEDULES = {
    "test": [(10, "test")], "a [b:3]": [(3, "a "), (10, "a b")], "a [b: 3]": [(3, "a "), (10, "a b")],
    "a [[[b]]:2]": [(2, "a "), (10, "a [[b]]")], "[(a:2):3]": [(3, ""), (10, "(a:2)")],
    "a [b : c : 1] d": [(1, "a b  d"), (10, "a  c  d")], "a[b:[c:d:2]:1]e": [(1, "abe"), (2, "ace"), (10, "ade")],
    "a [unbalanced": [(10, "a [unbalanced")], "a [b:.5] c": [(5, "a  c"), (10, "a b c")],
    "((a][:b:c [d:3]": [(3, "((a][:b:c "), (10, "((a][:b:c d")],
    "[a|(b:1.1)]": [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)],
    "[fe|]male": [(s, "female" if s % 2 else "male") for s in range(1, 11)],
    "[fe|||]male": [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)],
}
WEBUI_ATTENTION = {
    "normal text": [("normal text", 1.0)],
    "an (important) word": [("an ", 1.0), ("important", 1.1), (" word", 1.0)],
    "(unbalanced": [("unbalanced", 1.1)],
    "\\(literal\\]": [("(literal]", 1.0)],
    "(unnecessary)(parens)": [("unnecessaryparens", 1.1)],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)],
}
MORE = ["a (red:1.4) fox in ((deep snow)), [blurry]", "a fox) in] snow :1.2) x", "a ( fox : 1.5 ) here",
        "x [a:b:c] y", "[a|b:3]", "a | b", "[from::0.5] [to: 0.25 ] [[x|y]:z:4]", "a \\[b\\] \\\\ c \\",
        "(a [b:c:2] d:1.2)", "[a:b:12]", "[a:b:-1]", "a BREAK (b BREAK c)", "BREAK", "", "((a:1.2) b [c [d]])"]


@pytest.mark.parametrize("prompt", list(WEBUI_SCHEDULES))
def test_schedules_are_the_webuis_examples(prompt):
    assert prompt_syntax.schedule(prompt, 10) == WEBUI_SCHEDULES[prompt]


@pytest.mark.parametrize("prompt", list(WEBUI_SCHEDULES) + MORE)
def test_schedules_equal_the_grammar_parsed_by_lark(prompt):
    for steps in (1, 7, 20):
        assert prompt_syntax.schedule(prompt, steps) == ref_schedule(prompt, steps), steps


@pytest.mark.parametrize("text", list(WEBUI_ATTENTION))
def test_emphasis_is_the_webuis_examples(text):
    ours = prompt_syntax.attention(text)
    assert [t for t, _ in ours] == [t for t, _ in WEBUI_ATTENTION[text]]
    assert np.allclose([w for _, w in ours], [w for _, w in WEBUI_ATTENTION[text]], rtol=1e-12)


@pytest.mark.parametrize("text", MORE + [t for p in MORE for _, t in ref_schedule(p, 4)])
def test_emphasis_equals_the_reference_scanner(text):
    assert prompt_syntax.attention(text) == ref_attention(text)


# ---- the reference conditioning and image ------------------------------------------------------------

def ref_rows(hf_tokenizer, pieces, backtrack=20):
    """The webui's chunking of weighted pieces: [(77 ids, 77 weights)]."""
    bos, eos, comma = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.get_vocab()[",</w>"]
    chunks, ids, ws, comma_at = [], [], [], None

    def close():
        nonlocal ids, ws, comma_at
        chunks.append(([bos] + ids + [eos] * (76 - len(ids)), [1.0] + ws + [1.0] * (76 - len(ws))))
        ids, ws, comma_at = [], [], None

    for text, weight in pieces:
        if (text, weight) == ("BREAK", -1.0):
            close()
            continue
        for token in hf_tokenizer(text, add_special_tokens=False)["input_ids"]:
            if len(ids) == 75:
                if token != comma and comma_at is not None and 75 - comma_at <= backtrack:
                    keep = comma_at + 1
                    rest = ids[keep:], ws[keep:]
                    ids, ws = ids[:keep], ws[:keep]
                    close()
                    ids, ws = rest[0], rest[1]
                else:
                    close()
            if token == comma:
                comma_at = len(ids)
            ids.append(token)
            ws.append(weight)
    if ids or not chunks:
        close()
    return chunks


def ref_encode(clip, hf_tokenizer, prompt, steps, clip_skip=1):
    """[(until_step, (tokens, hidden))] of one prompt, as the webui: the schedule's texts chunked, each
    chunk encoded, weighted and rescaled to its unweighted mean over the schedule's texts together."""
    sched = ref_schedule(prompt, steps)
    rows = [ref_rows(hf_tokenizer, ref_attention(text)) for _, text in sched]
    k = max(len(r) for r in rows)
    empty = ref_rows(hf_tokenizer, [("", 1.0)])[0]
    rows = [r + [empty] * (k - len(r)) for r in rows]
    norm = getattr(clip, "text_model", clip).final_layer_norm
    chunks = []
    with torch.no_grad():
        for j in range(k):
            ids = torch.tensor([r[j][0] for r in rows])
            w = torch.tensor([r[j][1] for r in rows])
            out = clip(input_ids=ids, output_hidden_states=True)
            z = norm(out.hidden_states[-clip_skip]) if clip_skip > 1 else out.last_hidden_state
            mean = z.mean()
            z = z * w[..., None]
            chunks.append(z * (mean / z.mean()))
    states = torch.cat(chunks, dim=1)
    return [(end, states[n]) for n, (end, _) in enumerate(sched)]


def ref_at(entries, k):
    return next((s for end, s in entries if k <= end), entries[-1][1])


@pytest.fixture(scope="module")
def reference(random_model):
    cfg, _, state, workdir = random_model
    return sd_pipeline(cfg, state, ddim_scheduler(), workdir)


def ours(model, prompt, negative, steps, seed, clip_skip=1, pad_conds=False, sampler="ddim", scale=7.5):
    cfg, path, _, _ = model
    pipe = Pipeline(cfg, Offloader(load_fragments(path, cfg), torch.device("cpu")))
    pipe.prompt_syntax, pipe.clip_skip, pipe.pad_conds = "webui", clip_skip, pad_conds
    with torch.no_grad():
        x = pipe.txt2img(prompt, negative, [seed], 64, 64, SampleSettings(sampler, steps, scale))
    return np.asarray(to_pil(x)[0]).astype(np.int16)


def theirs(model, pipe, cond, uncond, steps, seed, scale=7.5):
    """diffusers' image fed `cond`/`uncond` schedules [(until_step, states)], swapped after each step."""
    cfg = model[0]
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, cfg.channels, 64 // cfg.downsample_factor, 64 // cfg.downsample_factor), generator=generator)

    def swap(p, i, t, kwargs):
        kwargs["prompt_embeds"] = torch.cat([ref_at(uncond, i + 1)[None], ref_at(cond, i + 1)[None]])
        return kwargs

    with torch.no_grad():
        out = pipe(prompt_embeds=ref_at(cond, 0)[None], negative_prompt_embeds=ref_at(uncond, 0)[None], height=64,
                   width=64, num_inference_steps=steps, guidance_scale=scale, latents=latents, generator=generator,
                   output_type="np", callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"]
                   ).images
    return (out[0] * 255).round().astype(np.int16)


LONG = ("masterpiece, best quality, a (highly detailed:1.2) matte painting of a castle on a hill at sunset, "
        "by greg rutkowski and thomas kinkade, trending on artstation, 8k, octane render, [volumetric lighting], "
        "dramatic clouds, a river in the valley, birds in the sky, cinematic composition, golden hour, "
        "ultra wide angle, sharp focus, intricate, elegant, fantasy, concept art, hdr, award winning photograph, "
        "in the style of studio ghibli, a lighthouse on a rocky shore, stormy sea, crashing waves, seagulls")
IMAGE_PROMPTS = {
    "emphasis": ("a (red:1.4) fox in ((deep snow)), [blurry]", "(ugly:1.3), [[bad]]"),
    "escapes": ("a \\(literal\\) fox \\[not weighted\\] (but this:0.8)", ""),
    "nesting": ("(((nested (deep:1.3) emphasis))) [[less]] text", "blurry"),
    "unbalanced open": ("a (fox [in (snow", "low quality"),
    "unbalanced close": ("a fox) in] snow :1.2) x", "low quality"),
    "break": ("a red fox BREAK snowy forest, (winter:1.2)", "blurry BREAK ugly"),
    "long": (LONG, "blurry, (worst quality:1.4), low quality BREAK watermark"),
    "editing fraction": ("a [fox:cat:0.5] in the (snow:1.2)", "blurry"),
    "editing steps": ("a [fox:cat:2] [in the snow::4] [(tree:1.3):3]", "[ugly:blurry:0.3]"),
    "alternation": ("a [fox|cat|(dog:1.2)] in the snow", "[ugly|blurry]"),
    "editing long": (LONG + ", [a ship:a whale:0.4]", "blurry, low quality BREAK [watermark|text]"),
}


@pytest.mark.parametrize("case", list(IMAGE_PROMPTS))
def test_image_equals_diffusers_fed_the_reference_embeddings(random_model, reference, case):
    prompt, negative = IMAGE_PROMPTS[case]
    steps, seed = 8, 7
    cond = ref_encode(reference.text_encoder, reference.tokenizer, prompt, steps)
    uncond = ref_encode(reference.text_encoder, reference.tokenizer, negative, steps)
    k = max(cond[0][1].shape[0], uncond[0][1].shape[0])
    if cond[0][1].shape[0] != uncond[0][1].shape[0]:  # diffusers needs one length: compare with --pad_conds
        empty = ref_encode(reference.text_encoder, reference.tokenizer, "", steps)[0][1]
        cond, uncond = ([(e, torch.cat([s, empty.repeat((k - s.shape[0]) // 77, 1)])) for e, s in x]
                        for x in (cond, uncond))
    mine = ours(random_model, prompt, negative, steps, seed, pad_conds=True)
    assert_same_image(mine, theirs(random_model, reference, cond, uncond, steps, seed))
    if case in ("emphasis", "editing steps", "alternation"):  # the syntax matters: plain text is another image
        cfg, path, _, _ = random_model
        pipe = Pipeline(cfg, Offloader(load_fragments(path, cfg), torch.device("cpu")))
        with torch.no_grad():
            plain = np.asarray(to_pil(pipe.txt2img(prompt, negative, [seed], 64, 64, SampleSettings("ddim", steps)))[0])
        assert np.abs(plain.astype(np.int16) - mine).max() > 2


def test_other_lengths_run_as_two_unet_batches(random_model, reference):
    """The webui's default: prompt (3 chunks) and negative (1) each through the UNet at its own length."""
    prompt, negative = LONG + " BREAK (snow:1.2)", "[blurry]"
    steps, seed, scale = 8, 3, 7.5
    cond = ref_encode(reference.text_encoder, reference.tokenizer, prompt, steps)[0][1]
    uncond = ref_encode(reference.text_encoder, reference.tokenizer, negative, steps)[0][1]
    assert cond.shape[0] == 3 * 77 and uncond.shape[0] == 77
    mine = ours(random_model, prompt, negative, steps, seed)
    cfg = random_model[0]
    unet, vae, scheduler = reference.unet, reference.vae, ddim_scheduler()
    scheduler.set_timesteps(steps)
    latents = torch.randn((1, cfg.channels, 64 // cfg.downsample_factor, 64 // cfg.downsample_factor),
                          generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_c = unet(latents, t, encoder_hidden_states=cond[None]).sample
            eps_u = unet(latents, t, encoder_hidden_states=uncond[None]).sample
            latents = scheduler.step(eps_u + scale * (eps_c - eps_u), t, latents).prev_sample
        image = vae.decode(latents / vae.config.scaling_factor).sample
    image = ((image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
    assert_same_image(mine, image)
    padded = ours(random_model, prompt, negative, steps, seed, pad_conds=True)
    assert np.abs(padded - mine).max() > 0  # --pad_conds is another computation


def test_weighted_sub_prompts_are_split_first_then_parsed(random_model, reference):
    prompt = "a [fox|cat] in (snow:1.3):0.7 a [dark:bright:0.5] forest:0.3"
    steps, seed = 8, 5
    parts = [ref_encode(reference.text_encoder, reference.tokenizer, p, steps)
             for p in ("a [fox|cat] in (snow:1.3)", "a [dark:bright:0.5] forest")]
    ends = sorted({e for p in parts for e, _ in p})
    cond = [(e, 0.7 * ref_at(parts[0], e) + 0.3 * ref_at(parts[1], e)) for e in ends]
    uncond = ref_encode(reference.text_encoder, reference.tokenizer, "blurry", steps)
    assert_same_image(ours(random_model, prompt, "blurry", steps, seed),
                      theirs(random_model, reference, cond, uncond, steps, seed))


def test_a_when_outside_the_steps_is_one_line(random_model):
    cfg = random_model[0]
    base = dict(sampler="ddim", steps=10, width=64, height=64, seed=1, scale=7.5, unet_bs=1)
    for prompt, words in (("a [fox:cat:11]", "switches outside the 10 steps; give a step from 0 to 10"),
                          ("a [fox:cat:1.5]", "give a fraction from 0 to 1"),
                          ("a [fox::-2]", "outside the 10 steps")):
        with pytest.raises(RequestError) as e:
            check(Request(prompt, **base), cfg)
        assert words in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("--prompt: ")
    with pytest.raises(RequestError, match="--negative_prompt: prompt editing"):
        check(Request("a fox", negative_prompt="[x:y:20]", **base), cfg)
    check(Request("a [fox:cat:10] [x:0.99]", **base), cfg)  # the last step and fractions below 1 are fine
    check(Request("a [fox:cat:11]", prompt_syntax="plain", **base), cfg)  # plain: brackets are text
    with pytest.raises(RequestError, match="unknown --prompt_syntax 'lark'"):
        check(Request("a fox", prompt_syntax="lark", **base), cfg)


def test_second_order_samplers_count_evaluations_as_the_webui():
    from optimizedSD.engine.conditioning import schedule_steps

    assert schedule_steps(20, "heun") == 40 and schedule_steps(20, "dpmpp_2s_a") == 40
    assert schedule_steps(20, "euler_a") == 20 and schedule_steps(20, "ddim") == 20
