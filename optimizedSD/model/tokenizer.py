"""CLIP ViT-L/14 byte-level BPE tokenizer, offline.

Produces the same ids as OpenAI's ``clip/simple_tokenizer.py`` ``SimpleTokenizer().encode``
(Radford et al. 2021; BPE of Sennrich et al. 2016 over GPT-2's byte-to-unicode alphabet).
The merges come from ``bpe_simple_vocab_16e6.txt.gz`` inside the ``openai-clip`` pip package.
The package is only *located* (``importlib.util.find_spec``), never imported: importing ``clip``
pulls in ``pkg_resources``/torchvision and fails on current setuptools.

Rows fed to the text encoder are ``[BOS] + ids[:length - 2] + [EOS]`` padded with EOS, as the
SD v1 reference pipeline (CompVis ``FrozenCLIPEmbedder``, HF ``openai/clip-vit-large-patch14``) pads.
``chunks`` instead cuts long texts into several such rows, as AUTOMATIC1111's webui does.
"""

from __future__ import annotations

import copy
import functools
import gzip
import html
import importlib.util
import logging
import os
import sys
from importlib.machinery import PathFinder

import ftfy
import regex
import torch

__all__ = [
    "BOS",
    "EOS",
    "CONTEXT_LENGTH",
    "VocabNotFoundError",
    "ClipTokenizer",
    "default_vocab_path",
    "get_tokenizer",
]

log = logging.getLogger(__name__)

BOS = 49406  # <|startoftext|>
EOS = 49407  # <|endoftext|>, also the padding id of SD v1
CONTEXT_LENGTH = 77  # CLIP's positional embedding length: BOS + 75 tokens + EOS

_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = 49152 - 256 - 2  # vocabulary of 49408 = 2 * 256 byte symbols + merges + 2 specials
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")

# Same pattern as OpenAI's: specials, English contractions, letter runs, single digits,
# runs of everything else that is not whitespace. Needs the `regex` module for \p{..}.
_TOKEN_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")  # `regex`'s \s (Unicode White_Space), as OpenAI uses


class VocabNotFoundError(FileNotFoundError):
    """The BPE vocabulary file (shipped with the ``openai-clip`` package) cannot be found."""


def default_vocab_path() -> str:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``openai-clip`` package.

    Every ``clip`` package on ``sys.path`` is looked at, in order, not only the first: a CompVis
    checkout may hold a ``clip`` folder of its own that shadows the installed one.
    """
    folders = []
    for spec in [importlib.util.find_spec("clip")] + [PathFinder.find_spec("clip", [entry]) for entry in sys.path]:
        if spec is not None:  # located, never imported
            folders += list(spec.submodule_search_locations or [])
            folders += [os.path.dirname(spec.origin)] if spec.origin else []
    folders = list(dict.fromkeys(folders))
    for folder in folders:
        path = os.path.join(folder, _VOCAB_FILE)
        if os.path.isfile(path):
            return path
    raise VocabNotFoundError(
        f"CLIP tokenizer vocabulary {_VOCAB_FILE} not found"
        + (f" in {folders}" if folders else "")
        + "; install it with `pip install openai-clip`, or pass vocab_path="
    )


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """Map each of the 256 bytes to a printable character (GPT-2's table).

    Printable Latin-1 bytes map to themselves; the other 68 (control, space, soft hyphen...)
    map to U+0100 onwards, in byte order. The dict's insertion order (printable bytes first)
    is the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def _clean(text: str) -> str:
    """OpenAI's text normalisation: ftfy, HTML unescaped twice, whitespace collapsed, lower case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()  # "&amp;amp;" -> "&"
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower()


def _merge_pair(word: tuple[str, ...], first: str, second: str) -> tuple[str, ...]:
    """Replace each non-overlapping (first, second), scanning left to right, by first+second."""
    out = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
            out.append(first + second)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


class ClipTokenizer:
    """CLIP's BPE tokenizer: ``encode`` gives ids, calling it gives padded (N, length) rows.

    ``vocab_path``: the gzip'd merges file; default: the one inside the ``openai-clip`` package.
    """

    def __init__(self, vocab_path: str | os.PathLike | None = None, bpe_cache_size: int = 1 << 16):
        path = default_vocab_path() if vocab_path is None else os.fspath(vocab_path)
        if not os.path.isfile(path):
            raise VocabNotFoundError(f"CLIP tokenizer vocabulary not found: {path}")
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            lines = f.read().decode("utf-8").split("\n")
        # Line 0 is a version header; OpenAI keeps exactly the first _N_MERGES merges after it.
        merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]

        self.byte_encoder = _byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(_SPECIALS)
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {m: rank for rank, m in enumerate(merges)}
        if (self.encoder.get(_SPECIALS[0]), self.encoder.get(_SPECIALS[1])) != (BOS, EOS):
            raise ValueError(f"{path} is not the CLIP BPE vocabulary (specials are not at {BOS}, {EOS})")
        # Cache BPE results per pre-token; each instance owns its cache.
        self._bpe = functools.lru_cache(maxsize=bpe_cache_size)(self._bpe_uncached)
        self.words: dict[str, list[int]] = {}  # added words (textual inversion) -> their ids
        self._words_pattern = None

    def __len__(self) -> int:
        return len(self.encoder)

    def _bpe_uncached(self, token: str) -> tuple[str, ...]:
        """Byte-encoded pre-token -> BPE symbols; the last symbol carries the '</w>' end marker."""
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = zip(word, word[1:])
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            word = _merge_pair(word, *best)
        return word

    def with_words(self, words: dict[str, list[int]]) -> "ClipTokenizer":
        """A tokenizer sharing this one's vocabulary that also reads each of ``words`` (textual inversion
        embeddings: name -> the ids of its vectors, beyond the vocabulary). A word is found in the
        cleaned (lower-cased) text where no letter or digit touches it on either side, longest first;
        it becomes its ids. This tokenizer is left as it is."""
        out = copy.copy(self)
        out.words = {_clean(w): list(ids) for w, ids in words.items()}
        names = sorted(out.words, key=len, reverse=True)
        out._words_pattern = regex.compile(
            r"(?<![\p{L}\p{N}])(?:" + "|".join(map(regex.escape, names)) + r")(?![\p{L}\p{N}])") if names else None
        return out

    def words_in(self, text: str) -> list[str]:
        """The added words ``text`` uses, in order of first use."""
        if self._words_pattern is None:
            return []
        return list(dict.fromkeys(self._words_pattern.findall(_clean(text))))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS. Literal "<|endoftext|>" in the text maps to EOS;
        added words (``with_words``) map to their ids."""
        text = _clean(text)
        if self._words_pattern is None:
            return self._encode_clean(text)
        ids, start = [], 0
        for match in self._words_pattern.finditer(text):
            ids += self._encode_clean(text[start:match.start()]) + self.words[match.group(0)]
            start = match.end()
        return ids + self._encode_clean(text[start:])

    def _encode_clean(self, text: str) -> list[int]:
        ids = []
        for token in _TOKEN_PATTERN.findall(text):
            if token in _SPECIALS:
                ids.append(self.encoder[token])
                continue
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self._bpe(token))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Approximate inverse of ``encode`` (text comes back cleaned and lower-cased); an added word's
        ids come back as the word."""
        added = {i: w for w, word_ids in self.words.items() for i in word_ids}
        pieces, run = [], []
        for i in list(ids) + [None]:
            if i in self.decoder:
                run.append(i)
                continue
            if run:
                raw = bytearray(self.byte_decoder[c] for c in "".join(self.decoder[j] for j in run))
                pieces.append(raw.decode("utf-8", errors="replace").replace("</w>", " ").strip())
                run = []
            if i is not None and (not pieces or pieces[-1] != added.get(i)):
                pieces.append(added.get(i, f"<{i}>"))
        return " ".join(p for p in pieces if p)

    def count_dropped(self, text: str, length: int = CONTEXT_LENGTH) -> int:
        """How many tokens of ``text`` do not fit in a row of ``length`` (BOS and EOS take 2)."""
        return max(0, len(self.encode(text)) - _capacity(length))

    def __call__(self, texts: list[str] | str, length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """(N, length) int64 rows ``[BOS] + ids + [EOS]``, padded with EOS.

        Ids beyond ``length - 2`` are dropped, with one logged warning per distinct text.
        """
        if isinstance(texts, str):
            texts = [texts]
        capacity = _capacity(length)
        rows = torch.full((len(texts), length), EOS, dtype=torch.long)  # (N, length)
        warned = set()
        for n, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > capacity and text not in warned:
                warned.add(text)
                log.warning(
                    "prompt is %d tokens; the last %d of them were dropped (CLIP reads %d): %r; "
                    "--long_prompts encodes them all",
                    len(ids), len(ids) - capacity, capacity, self.decode(ids[capacity:]),
                )
            ids = ids[:capacity]
            rows[n, 0] = BOS
            rows[n, 1 : 1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
            # rows[n, 1 + len(ids)] is already EOS, as is the padding after it.
        return rows

    def chunks(self, texts: list[str] | str, length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """(N, K, length) int64: every text whole, in K rows of ``length - 2`` tokens each.

        Text n's ids (no BOS/EOS) are cut into consecutive pieces of ``length - 2`` (75); piece j
        becomes row ``[n, j]`` = ``[BOS] + piece + [EOS]`` padded with EOS, as ``__call__`` builds
        a row. An empty text is one piece (BOS, then EOS to the end). K is the most pieces any of
        the texts needs, at least 1; texts with fewer pieces are padded with such empty rows, so
        every text ends up K rows long (AUTOMATIC1111's webui: 75-token chunks, each encoded on
        its own, the shorter prompt padded with empty chunks). Nothing is dropped and nothing is
        logged; when every text fits one row, ``chunks(texts)[:, 0]`` equals ``self(texts)``.
        """
        if isinstance(texts, str):
            texts = [texts]
        capacity = _capacity(length)
        ids = [self.encode(text) for text in texts]
        k = max([1] + [-(-len(i) // capacity) for i in ids])  # ceil(tokens / capacity), at least 1
        rows = torch.full((len(texts), k, length), EOS, dtype=torch.long)  # (N, K, length)
        rows[:, :, 0] = BOS
        for n, text_ids in enumerate(ids):
            for j in range(0, len(text_ids), capacity):
                piece = text_ids[j : j + capacity]
                rows[n, j // capacity, 1 : 1 + len(piece)] = torch.tensor(piece, dtype=torch.long)
        return rows


def _capacity(length: int) -> int:
    if length < 2:
        raise ValueError(f"length must be at least 2 (BOS and EOS), got {length}")
    return length - 2


@functools.cache
def get_tokenizer() -> ClipTokenizer:
    """The shared default tokenizer, built on first use (parsing the vocabulary takes a moment)."""
    return ClipTokenizer()
