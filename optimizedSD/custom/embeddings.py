"""Textual inversion embeddings: read from a folder, used in prompts by name.

Files (the token is the file's stem, as in AUTOMATIC1111's webui):
- webui / textual_inversion `.pt`: `{"string_to_param": {"*": (n, hidden)}, ...}`;
- webui `.safetensors`: `{"emb_params": (n, hidden)}`;
- diffusers `learned_embeds.bin` / `.safetensors`: `{"<token>": (hidden,) or (n, hidden)}`.
An embedding of n vectors takes n token positions. Applying a set extends, at run time, the text
encoder's token embedding by their vectors (new ids after the vocabulary) and gives a tokenizer that
reads each name as those ids (`ClipTokenizer.with_words`); the checkpoint is not touched, and `undo`
shrinks the token embedding back to the exact original rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..model.hashes import embedding_hash, hash_list
from ..model.weights_file import PICKLES, SAFETENSORS, load_pickle, read_tensors

EMBEDDING_SUFFIXES = (".pt", ".bin", SAFETENSORS)


class EmbeddingError(Exception):
    """An embedding file that cannot be used with this model; the message names the file and why."""


@dataclass(frozen=True)
class Embedding:
    name: str  # the token that stands for it in prompts: the file's stem
    path: Path
    vectors: torch.Tensor  # (n, hidden) fp32


def read_embedding(path: str | Path, hidden_size: int) -> Embedding:
    """One embedding file, its vectors checked against the text encoder's width `hidden_size`."""
    path = Path(path)
    if path.suffix.lower() == SAFETENSORS:
        data, _ = read_tensors(path, EmbeddingError, "embedding")
    elif path.suffix.lower() in PICKLES:
        data = load_pickle(path, EmbeddingError, "embedding")
    else:
        raise EmbeddingError(f"unsupported embedding file {path}: expected {', '.join(EMBEDDING_SUFFIXES)}")
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path} holds a {type(data).__name__}, not an embedding")
    if "clip_g" in data or "clip_l" in data:
        raise EmbeddingError(f"{path} is an SDXL embedding (clip_l and clip_g vectors); this model is SD v1")
    if "string_to_param" in data:  # webui / textual_inversion .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: string_to_param must hold exactly one tensor; the file holds several terms")
        vectors = next(iter(params.values()))
    else:  # webui .safetensors (emb_params) or diffusers ({token: vector})
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise EmbeddingError(f"{path} holds {len(tensors)} tensors ({', '.join(list(tensors)[:4])}); an embedding "
                                 f"file holds one (string_to_param, emb_params or {{token: vector}})")
        vectors = next(iter(tensors.values()))
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point() or vectors.ndim not in (1, 2):
        raise EmbeddingError(f"{path} does not hold a (vectors, width) float tensor; it is not an embedding")
    vectors = vectors.detach().float().reshape(-1, vectors.shape[-1])
    width = vectors.shape[1]
    if width != hidden_size:
        family = {1024: " (SD 2.x)", 1280: " (SDXL)"}.get(width, "")
        raise EmbeddingError(f"{path} holds {width}-wide vectors{family}; this model's text encoder is "
                             f"{hidden_size}-wide (SD v1: 768)")
    if vectors.shape[0] == 0:
        raise EmbeddingError(f"{path} holds no vectors")
    return Embedding(path.stem, path, vectors)


def read_embeddings_dir(folder: str | Path, hidden_size: int) -> list[Embedding]:
    """Every embedding file under `folder` (subfolders too), sorted by name; two files of one name
    are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EmbeddingError(f"embeddings folder not found: {folder}; pass an existing folder with --embeddings")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES)
    out: dict[str, Embedding] = {}
    for path in files:
        embedding = read_embedding(path, hidden_size)
        key = embedding.name.lower()  # prompts are lower-cased before they are read
        if key in out:
            raise EmbeddingError(f"two embeddings are named {embedding.name!r}: {out[key].path} and {path}; "
                                 f"rename one (the token is the file's name)")
        out[key] = embedding
    return [out[k] for k in sorted(out)]


class TextualInversion:
    """Embeddings applied to a text encoder fragment: `tokenizer` reads their names; `undo` restores
    the token embedding exactly."""

    def __init__(self, text_encoder: nn.Module, tokenizer, embeddings: list[Embedding]):
        self.embeddings = list(embeddings)
        self._table = _token_embedding(text_encoder)
        weight = self._table.weight  # (vocab, hidden)
        self._vocab = weight.shape[0]
        words, rows, next_id = {}, [], self._vocab
        for e in self.embeddings:
            words[e.name] = list(range(next_id, next_id + e.vectors.shape[0]))
            rows.append(e.vectors)
            next_id += e.vectors.shape[0]
        self.tokenizer = tokenizer.with_words(words)
        if rows:
            extended = torch.cat([weight.detach(), torch.cat(rows).to(weight.device, weight.dtype)])
            self._set(extended)

    def used(self, texts) -> list[Embedding]:
        """The embeddings any of `texts` names, in order."""
        return _named(self.embeddings, self.tokenizer, texts)

    def undo(self) -> None:
        """The token embedding back to the vocabulary's rows, exactly (a copy of the first rows)."""
        if self._table.weight.shape[0] != self._vocab:
            self._set(self._table.weight.detach()[:self._vocab].clone())

    def _set(self, weight: torch.Tensor) -> None:
        self._table.weight = nn.Parameter(weight, requires_grad=False)
        self._table.num_embeddings = weight.shape[0]


def embeddings_in(embeddings: list[Embedding], texts) -> list[Embedding]:
    """The embeddings any of `texts` names, in order, as the text encoder will read them (without a
    loaded model: a run's metadata is written before, or without, loading it)."""
    from ..model.tokenizer import get_tokenizer

    return _named(embeddings, get_tokenizer().with_words({e.name: [] for e in embeddings}), texts)


def _named(embeddings: list[Embedding], tokenizer, texts) -> list[Embedding]:
    names = {w for t in texts for w in tokenizer.words_in(t)}
    return [e for e in embeddings if e.name.lower() in names]


def _token_embedding(text_encoder: nn.Module) -> nn.Embedding:
    return text_encoder.transformer.text_model.embeddings.token_embedding


def ti_metadata(used: list[Embedding]) -> dict[str, str]:
    """`TI hashes` (webui infotext) of the embeddings a prompt used, or {} for none."""
    return {"TI hashes": hash_list([(e.name, embedding_hash(e.path)) for e in used])} if used else {}
