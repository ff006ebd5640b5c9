"""Textual inversion: webui .pt, webui .safetensors (a 3-vector embedding) and diffusers learned_embeds.bin,
end to end against diffusers' `load_textual_inversion`; the tokenizer's added words; exact undo;
`TI hashes`; every bad file."""
from __future__ import annotations

import hashlib

import pytest
import torch
from reference import assert_same_image, ddim_scheduler, diffusers_images, our_images, sd_pipeline

from optimizedSD.model.checkpoint import load_fragments
from optimizedSD.model.config import tiny_config
from optimizedSD.custom.embeddings import (EmbeddingError, TextualInversion, read_embedding, read_embeddings_dir,
                                    ti_metadata)
from optimizedSD.model.fragments import TEXT_ENCODER
from optimizedSD.engine.offload import Offloader
from optimizedSD.engine.pipeline import Pipeline
from optimizedSD.model.tokenizer import get_tokenizer

SEED = 23
HIDDEN = tiny_config().text.hidden_size
TI_PROMPT = "a fox-emb sitting in the snow, learned_embeds style, oil painting"
TI_NEGATIVE = "blurry, tri-style, low quality"



@pytest.fixture(scope="module")
def model(random_model):
    return random_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An embeddings folder: webui .pt (2 vectors), diffusers learned_embeds.bin (1 vector, in a subfolder),
    webui .safetensors (3 vectors). Vectors about as large as the model's token embeddings."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(5)
    vec = lambda n: torch.randn(n, HIDDEN, generator=g) * 0.5  # noqa: E731
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec(2)}, "name": "fox-emb", "step": 500,
                "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "tiny"}, d / "fox-emb.pt")
    (d / "concept").mkdir()
    torch.save({"<cat-toy>": vec(1)[0]}, d / "concept" / "learned_embeds.bin")
    save_file({"emb_params": vec(3)}, str(d / "tri-style.safetensors"))
    return d


def _ours(model, folder, prompt, negative):
    def prepare(fragments):
        ti = TextualInversion(fragments[TEXT_ENCODER], get_tokenizer(), read_embeddings_dir(folder, HIDDEN))
        return {"tokenizer": ti.tokenizer}
    return our_images(model, [SEED], 64, 64, "ddim", prompt=prompt, negative=negative, prepare=prepare)[0]


def _load_all(pipe, folder):
    for path in sorted(folder.rglob("*.*")):
        pipe.load_textual_inversion(str(path), token=path.stem)


def test_embeddings_equal_diffusers_load_textual_inversion(model, folder):
    """All three formats, in the prompt and the negative prompt, the 3-vector one included."""
    a = _ours(model, folder, TI_PROMPT, TI_NEGATIVE)
    b = diffusers_images(model, SEED, 64, 64, ddim_scheduler(), prompt=TI_PROMPT, negative=TI_NEGATIVE,
                         prepare=lambda pipe: _load_all(pipe, folder))[0]
    assert_same_image(a, b)


def test_conditioning_equals_diffusers_encode_prompt(model, folder):
    """Text features of each embedding alone: ours (tokenizer words + extended token embedding) against
    diffusers' multi-vector prompt conversion and resized CLIP, to 1e-5; and they differ from the plain
    words'."""
    cfg, path, state, workdir = model
    fragments = load_fragments(path, cfg)
    ti = TextualInversion(fragments[TEXT_ENCODER], get_tokenizer(), read_embeddings_dir(folder, HIDDEN))
    ours = Pipeline(cfg, Offloader(fragments, torch.device("cpu")), tokenizer=ti.tokenizer)
    plain = Pipeline(cfg, Offloader(load_fragments(path, cfg), torch.device("cpu")))
    pipe = sd_pipeline(cfg, state, ddim_scheduler(), workdir)
    _load_all(pipe, folder)
    for name in ("fox-emb", "learned_embeds", "tri-style"):
        prompt = f"a photo of {name}, in the snow"
        theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        mine = ours.conditioning([prompt])
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
        assert (mine - plain.conditioning([prompt])).abs().max() > 0.1, name


def test_formats_are_read_as_saved(folder):
    es = {e.name: e for e in read_embeddings_dir(folder, HIDDEN)}
    assert sorted(es) == ["fox-emb", "learned_embeds", "tri-style"]
    assert torch.equal(es["fox-emb"].vectors, torch.load(folder / "fox-emb.pt")["string_to_param"]["*"])
    assert torch.equal(es["learned_embeds"].vectors[0],
                       torch.load(folder / "concept" / "learned_embeds.bin")["<cat-toy>"])
    assert [e.vectors.shape[0] for e in es.values()] == [2, 1, 3]


def test_tokenizer_reads_names_as_their_ids_and_nothing_else():
    tok = get_tokenizer().with_words({"Fox-Emb": [49408, 49409], "tri": [49410]})
    base = get_tokenizer()
    assert tok.encode("a FOX-EMB fox, tri") == base.encode("a") + [49408, 49409] + base.encode("fox,") + [49410]
    for text in ("a fox-embx", "atri", "tri2", "a fox emb"):  # touching letters or digits: plain words
        assert tok.encode(text) == base.encode(text), text
    assert tok.words_in("tri, fox-emb and tri") == ["tri", "fox-emb"]
    assert base.words == {} and base.encode("fox-emb") != [49408, 49409]  # the shared tokenizer is untouched
    assert tok(["fox-emb"])[0, :4].tolist() == [49406, 49408, 49409, 49407]


def test_undo_restores_the_token_embedding_exactly(model, folder):
    cfg, path, _, _ = model
    fragments = load_fragments(path, cfg)
    table = fragments[TEXT_ENCODER].transformer.text_model.embeddings.token_embedding
    original = table.weight.detach().clone()
    ti = TextualInversion(fragments[TEXT_ENCODER], get_tokenizer(), read_embeddings_dir(folder, HIDDEN))
    assert table.weight.shape == (49408 + 6, HIDDEN) and table.num_embeddings == 49414
    assert torch.equal(table.weight[49408:49410], torch.load(folder / "fox-emb.pt")["string_to_param"]["*"])
    assert [e.name for e in ti.used([TI_PROMPT, "x"])] == ["fox-emb", "learned_embeds"]
    ti.undo()
    assert table.weight.shape == original.shape and torch.equal(table.weight, original)


def test_ti_hashes_are_the_webui_short_hashes(folder):
    es = read_embeddings_dir(folder, HIDDEN)
    expected = ", ".join(f"{e.name}: {hashlib.sha256(e.path.read_bytes()).hexdigest()[:12]}" for e in es)
    assert ti_metadata(es) == {"TI hashes": expected} and ti_metadata([]) == {}


# ---- bad files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, data, message", [
    ("xl.safetensors", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "SDXL embedding"),
    ("v2.pt", {"string_to_param": {"*": torch.zeros(2, 1024)}}, r"1024-wide vectors \(SD 2.x\).*32-wide"),
    ("two.bin", {"<a>": torch.zeros(HIDDEN), "<b>": torch.zeros(HIDDEN)}, "holds 2 tensors"),
    ("terms.pt", {"string_to_param": {"*": torch.zeros(1, HIDDEN), "+": torch.zeros(1, HIDDEN)}}, "several terms"),
    ("empty.safetensors", {"emb_params": torch.zeros(0, HIDDEN)}, "holds no vectors"),
    ("ints.pt", {"<a>": torch.zeros(HIDDEN, dtype=torch.int64)}, "not an embedding"),
])
def test_bad_embedding_files(tmp_path, name, data, message):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(data, str(path))
    else:
        torch.save(data, path)
    with pytest.raises(EmbeddingError, match=message) as e:
        read_embedding(path, HIDDEN)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_bad_embedding_folders(tmp_path):
    with pytest.raises(EmbeddingError, match="embeddings folder not found"):
        read_embeddings_dir(tmp_path / "none", HIDDEN)
    (tmp_path / "sub").mkdir()
    torch.save({"<x>": torch.zeros(HIDDEN)}, tmp_path / "Style.pt")
    torch.save({"<x>": torch.zeros(HIDDEN)}, tmp_path / "sub" / "style.bin")
    with pytest.raises(EmbeddingError, match="two embeddings are named"):
        read_embeddings_dir(tmp_path, HIDDEN)

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))
    torch.save({"string_to_param": {"*": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(EmbeddingError, match="refusing to unpickle"):
        read_embedding(tmp_path / "evil.pt", HIDDEN)
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(EmbeddingError, match="truncated or corrupt"):
        read_embedding(tmp_path / "cut.safetensors", HIDDEN)
    with pytest.raises(EmbeddingError, match="unsupported embedding file"):
        read_embedding(tmp_path / "x.png", HIDDEN)
