"""Prompts in the AUTOMATIC1111 webui's syntax -> the conditioning each model evaluation reads.

`sampling/prompt_syntax.py` parses a (sub-)prompt into a schedule of weighted pieces; here, as the
webui's `sd_hijack_clip.py` and `sd_emphasis.py` ("Original") do (its published behaviour; our code):

- **Chunks.** A text's pieces are tokenized piece by piece and laid into chunks of 75 tokens, each
  row `BOS + 75 + EOS` (EOS padding), every token carrying its piece's weight (`chunk_rows`). `BREAK`
  closes the chunk. When a chunk is full and a comma lies at most `COMMA_BACKTRACK` (20) tokens back,
  the tokens after the comma move to the next chunk. A textual-inversion word's vectors stay in one chunk.
- **Weights.** Each chunk is encoded on its own; the hidden states are multiplied by the token weights,
  then rescaled so their mean equals the unweighted mean. As in the webui, the mean is taken over the
  same chunk of every text of one prompt's schedule together (the webui encodes them as one batch),
  a text with fewer chunks than the others counted with empty chunks (BOS, EOS...) in their place.
- **Schedules.** A prompt's texts are encoded once each; the state for a model evaluation k (from 0)
  is the first schedule entry with `k <= until_step` (`Scheduled.at`). Weighted sub-prompts
  (`a cat:0.3 a dog:0.7`, sampling/prompts.py) are split first, each parsed on its own, and summed
  with their weights at every step (shorter ones padded with the empty prompt's chunk encoding).
- **Lengths.** The prompt and the negative prompt keep their own chunk counts (the UNet then runs
  them as separate batches, `sampling/samplers.EpsDenoiser`) unless `pad_conds`, which pads the shorter
  with the empty prompt's chunk encoding (the webui's "Pad prompt/negative prompt to be same length").

A schedule is counted in model evaluations over `steps` for the webui's first-order samplers and over
twice the steps for those it marks second order (`prompt_syntax.SECOND_ORDER`), as the webui does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..model.tokenizer import BOS, EOS
from ..sampling import prompt_syntax
from ..sampling.prompts import parse_weighted

SYNTAXES = ("webui", "plain")
CHUNK = 75  # tokens per chunk, between BOS and EOS
COMMA_BACKTRACK = 20  # the webui's default "comma padding backtrack"

Row = tuple[tuple[int, ...], tuple[float, ...]]  # (77 token ids, 77 weights)
EMPTY_ROW: Row = ((BOS,) + (EOS,) * (CHUNK + 1), (1.0,) * (CHUNK + 2))


def schedule_steps(steps: int, sampler: str) -> int:
    """The model evaluations a schedule of `steps` sampling steps is counted over (the webui's
    `total_steps`: twice the steps for its second-order samplers)."""
    return steps * 2 if prompt_syntax.second_order(sampler) else steps


def chunk_rows(tokenizer, pieces: list[tuple[str, float]], backtrack: int = COMMA_BACKTRACK) -> list[Row]:
    """The chunk rows of one text's weighted pieces (`prompt_syntax.attention`), as the webui's
    `tokenize_line`: at least one row; each `BOS + 75 + EOS`, the padding of weight 1."""
    comma = tokenizer.encoder[",</w>"]
    vocabulary = len(tokenizer.encoder)
    vectors = {ids[0]: len(ids) for ids in tokenizer.words.values() if ids}  # a TI word's first id -> its length
    rows: list[Row] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close():
        nonlocal tokens, weights, last_comma
        pad = CHUNK - len(tokens)
        rows.append(((BOS, *tokens, *[EOS] * pad, EOS), (1.0, *weights, *[1.0] * pad, 1.0)))
        tokens, weights, last_comma = [], [], -1

    for text, weight in pieces:
        if text == prompt_syntax.BREAK_TEXT and weight == prompt_syntax.BREAK_WEIGHT:
            close()
            continue
        ids = tokenizer.encode(text)
        i = 0
        while i < len(ids):
            token = ids[i]
            if token == comma:
                last_comma = len(tokens)
            elif backtrack and len(tokens) == CHUNK and last_comma != -1 and len(tokens) - last_comma <= backtrack:
                cut = last_comma + 1  # what follows the comma starts the next chunk
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == CHUNK:
                close()
            n = vectors.get(token, 1) if token >= vocabulary else 1
            if n > 1 and len(tokens) + n > CHUNK:
                close()
            tokens += ids[i:i + n]
            weights += [weight] * n
            i += n
    if tokens or not rows:
        close()
    return rows


class Scheduled:
    """One prompt's conditioning over a sampling run: `states[i]` (tokens, hidden) for the model
    evaluations k with `ends[i - 1] < k <= ends[i]`; the first also for k = 0, the last for any k after."""

    def __init__(self, ends: list[int], states: list[torch.Tensor]):
        assert len(ends) == len(states) > 0
        self.ends, self.states = list(ends), list(states)

    def at(self, k: int) -> torch.Tensor:
        return next((s for end, s in zip(self.ends, self.states) if k <= end), self.states[-1])

    @property
    def constant(self) -> bool:
        return len(self.states) == 1

    @property
    def length(self) -> int:
        return self.states[0].shape[0]

    def padded(self, length: int, empty: torch.Tensor) -> "Scheduled":
        """Every state followed by copies of `empty` (77, hidden) up to `length` tokens."""
        extra = (length - self.length) // empty.shape[0]
        if extra <= 0:
            return self
        return Scheduled(self.ends, [torch.cat([s, empty.repeat(extra, 1)]) for s in self.states])


@dataclass
class _Group:
    """One sub-prompt: its schedule's ends, each entry's chunk rows (padded to the group's count)."""
    weight: float
    ends: list[int]
    rows: list[list[Row]]  # entry -> chunk -> row


def _group(tokenizer, text: str, weight: float, steps: int, check: bool) -> _Group:
    entries = prompt_syntax.parse(text, steps, check)
    rows = {}
    for _, pieces in entries:  # the same text at many steps (alternation) is chunked once
        key = tuple(pieces)
        if key not in rows:
            rows[key] = chunk_rows(tokenizer, pieces)
    per_entry = [rows[tuple(pieces)] for _, pieces in entries]
    k = max(len(r) for r in per_entry)
    return _Group(weight, [end for end, _ in entries], [r + [EMPTY_ROW] * (k - len(r)) for r in per_entry])


def check_prompt(prompt: str, steps: int, label: str) -> None:
    """Raise ValueError with one line for a `when` outside the steps (the request's check)."""
    for text, _ in parse_weighted(prompt):
        try:
            prompt_syntax.schedule(text, steps, check=True)
        except prompt_syntax.ScheduleError as e:
            raise ValueError(f"{label}: {e}") from None


def encode_pair(prompt: str, negative: str, steps: int, tokenizer, encode: Callable[[torch.Tensor], torch.Tensor],
                pad_conds: bool = False) -> tuple[Scheduled, Scheduled]:
    """(prompt's, negative prompt's) `Scheduled` over `steps` model evaluations (`schedule_steps`).
    `encode(tokens (R, 77)) -> (R, 77, hidden)` fp32 runs the text encoder once, on every distinct
    chunk row of both prompts (and the empty one's)."""
    groups = [[_group(tokenizer, t, w, steps, False) for t, w in parse_weighted(p)] for p in (prompt, negative)]
    distinct = {EMPTY_ROW: 0}
    for g in (g for gs in groups for g in gs):
        for row in (row for entry in g.rows for row in entry):
            distinct.setdefault(row, len(distinct))
    rows = list(distinct)
    tokens = torch.tensor([r[0] for r in rows], dtype=torch.long)  # (R, 77)
    states = encode(tokens).float()  # (R, 77, hidden)
    weights = torch.tensor([r[1] for r in rows], dtype=torch.float32, device=states.device)  # (R, 77)
    empty = states[0]
    # per row: the sum of its states, unweighted and weighted (the means of the "Original" normalisation)
    plain_sums, weighted = states.sum(dim=(1, 2)), states * weights[..., None]
    weighted_sums = weighted.sum(dim=(1, 2))

    def scheduled(g: _Group) -> Scheduled:
        out = []
        for j in range(len(g.rows[0])):  # chunk j of every entry, normalised together (one webui batch)
            index = torch.tensor([distinct[entry[j]] for entry in g.rows], device=states.device)
            scale = plain_sums[index].sum() / weighted_sums[index].sum()
            out.append(weighted[index] * scale)  # (entries, 77, hidden)
        return Scheduled(g.ends, list(torch.cat(out, dim=1)))

    pair = []
    for gs in groups:
        parts = [scheduled(g) for g in gs]
        length = max(p.length for p in parts)
        parts = [p.padded(length, empty) for p in parts]
        ends = sorted({e for p in parts for e in p.ends})
        pair.append(Scheduled(ends, [sum(g.weight * p.at(e) for g, p in zip(gs, parts)) for e in ends]))
    if pad_conds:
        length = max(s.length for s in pair)
        pair = [s.padded(length, empty) for s in pair]
    return pair[0], pair[1]


class StepConditioned:
    """A denoiser whose k-th call (k from 0: one per model evaluation, as the webui's CFGDenoiser
    counts) gets `cond.at(k)` and `uncond.at(k)`, expanded to `batch` rows, as its cond and uncond."""

    def __init__(self, denoise, cond: Scheduled, uncond: Scheduled, batch: int, device: torch.device):
        self.denoise, self.cond, self.uncond, self.batch, self.device = denoise, cond, uncond, batch, device
        self.calls = 0

    def __call__(self, x, sigma, **extra):
        k, self.calls = self.calls, self.calls + 1
        extra["cond"] = self.cond.at(k).to(self.device).expand(self.batch, -1, -1)
        if extra.get("uncond") is not None:
            extra["uncond"] = self.uncond.at(k).to(self.device).expand(self.batch, -1, -1)
        return self.denoise(x, sigma, **extra)
