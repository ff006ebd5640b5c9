"""ClipTokenizer against OpenAI's own clip/simple_tokenizer.py (the oracle)."""

import gzip
import importlib.util
import logging

import pytest
import torch

from optimizedSD.model.tokenizer import BOS, EOS, ClipTokenizer, VocabNotFoundError, default_vocab_path, get_tokenizer

TEXTS = [
    "",
    " ",
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT, riding a HoRsE!!!",
    "hello, world... (masterpiece:1.2), [best quality]; {detailed} -- ~~ @#$%^&*",
    "it's a dog's life; we're here, they've gone, I'm sure you'll see, he'd go, don't",
    "IT'S CAPS'LL",
    "café crème brûlée, naïve façade, Ærøskøbing, Œuvre, straße",
    "cafe\u0301 (combining accent)",
    "東京の夜景, 中文提示词, 한국어 프롬프트",
    "Ελληνικά και Русский текст, עברית, العربية",
    "3.14159 1024x768 2023-01-01 10:30 100% #ff00ff 1e-5 ½ ² Ⅻ",
    "emoji 🐱🦆 🚀 👩‍👩‍👧 🇯🇵 ❤️",
    "  lots   of\tweird \n\n whitespace\u00a0and\u3000ideographic space\u2003em\u2028 ",
    "control\x1cchars\x1f and zero\u200bwidth",
    "Tom &amp; Jerry &lt;3 &amp;amp; &quot;quoted&quot; &#39;apos&#39; &eacute; &nbsp;x",
    "mojibake: cafÃ© â€œquotesâ€\x9d",
    "<|startoftext|> in the middle <|endoftext|> and <|ENDOFTEXT|>",
    "antidisestablishmentarianism supercalifragilisticexpialidocious pneumonoultramicroscopic",
    "https://example.com/path?q=1&x=2 user@example.org C:\\Windows\\system32",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "trending on artstation, octane render, 8k, unreal engine 5, by greg rutkowski and alphonse mucha",
]

LONG = (
    "a highly detailed matte painting of a castle on a hill at sunset, by greg rutkowski and "
    "thomas kinkade, trending on artstation, 8k, octane render, volumetric lighting, dramatic "
    "clouds, a river in the valley, birds in the sky, cinematic composition, golden hour, "
    "ultra wide angle, sharp focus, intricate, elegant, fantasy, concept art, hdr, "
    "masterpiece, award winning photograph, in the style of studio ghibli"
)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_openai(tok, oracle, text):
    assert tok.encode(text) == oracle.encode(text)


def test_encode_matches_openai_long(tok, oracle):
    assert tok.encode(LONG) == oracle.encode(LONG)
    assert len(tok.encode(LONG)) > 75


def test_vocabulary_matches_openai(tok, oracle):
    assert len(tok) == len(oracle.encoder) == 49408
    assert tok.encoder == oracle.encoder
    assert tok.encoder["<|startoftext|>"] == BOS
    assert tok.encoder["<|endoftext|>"] == EOS


def test_every_byte_roundtrips(tok, oracle):
    """All 256 single bytes, as latin-1 characters, encode like the oracle."""
    text = " ".join(chr(b) for b in range(256))
    assert tok.encode(text) == oracle.encode(text)


def test_rows_shape_and_padding(tok, oracle):
    rows = tok(["a cat", "", "a dog on a log"])
    assert rows.dtype == torch.long
    assert rows.shape == (3, 77)
    for row, text in zip(rows.tolist(), ["a cat", "", "a dog on a log"]):
        ids = oracle.encode(text)
        expected = [BOS, *ids, EOS] + [EOS] * (77 - len(ids) - 2)
        assert row == expected


def test_single_string_and_custom_length(tok):
    rows = tok("a cat", length=10)
    assert rows.shape == (1, 10)
    assert rows[0, 0] == BOS and rows[0, -1] == EOS
    with pytest.raises(ValueError):
        tok(["a cat"], length=1)


def test_truncation_and_warning(tok, oracle, caplog):
    ids = oracle.encode(LONG)
    n_dropped = len(ids) - 75
    assert tok.count_dropped(LONG) == n_dropped
    assert tok.count_dropped("a cat") == 0

    with caplog.at_level(logging.WARNING, logger="optimizedSD.model.tokenizer"):
        rows = tok([LONG, "a cat", LONG])
    assert rows.shape == (3, 77)
    row = rows[0].tolist()
    assert row[0] == BOS
    assert row[1:76] == ids[:75]  # index 75 holds the last token that fits
    assert row[76] == EOS
    assert rows[2].tolist() == row
    # One line for the repeated long prompt, none for the short one.
    records = [r for r in caplog.records if r.name == "optimizedSD.model.tokenizer"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "\n" not in message
    assert message.startswith(
        f"prompt is {len(ids)} tokens; the last {n_dropped} of them were dropped (CLIP reads 75)"
    )
    assert "studio ghibli" in message  # the dropped words are named


def test_exactly_full_row_does_not_warn(tok, caplog):
    text = " ".join(["cat"] * 75)
    assert len(tok.encode(text)) == 75
    with caplog.at_level(logging.WARNING, logger="optimizedSD.model.tokenizer"):
        rows = tok([text])
    assert not caplog.records
    assert rows[0, 0] == BOS and rows[0, 76] == EOS and (rows[0, 1:76] != EOS).all()


def test_decode_matches_openai(tok, oracle):
    ids = tok.encode("Café, 東京 & a Cat! 🐱")
    assert tok.decode(ids) == oracle.decode(ids).strip()


def test_get_tokenizer_is_cached():
    assert get_tokenizer() is get_tokenizer()


def test_plain_text_vocab_and_missing_file(tmp_path):
    plain = tmp_path / "vocab.txt"
    with gzip.open(default_vocab_path(), "rb") as f:
        plain.write_bytes(f.read())
    assert ClipTokenizer(plain).encode("a cat") == get_tokenizer().encode("a cat")

    with pytest.raises(FileNotFoundError):
        ClipTokenizer(tmp_path / "nope.txt.gz")


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr("optimizedSD.model.tokenizer.PathFinder.find_spec", lambda name, path=None: None)
    with pytest.raises(VocabNotFoundError, match="pip install openai-clip"):
        default_vocab_path()


def test_vocab_found_behind_a_shadowing_clip_folder(tmp_path, monkeypatch):
    """A `clip` folder first on sys.path (as in some CompVis checkouts) without the vocabulary does
    not hide the installed package's file."""
    installed = default_vocab_path()
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip/__init__.py").write_text("raise ImportError('never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("clip").submodule_search_locations[0] == str(tmp_path / "clip")
    assert default_vocab_path() == installed
