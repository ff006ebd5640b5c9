"""Weighted sub-prompts, as in the original optimizedSD (``split_weighted_subprompts``).

``"a tabby cat:0.25 a white duck:0.75"`` means: encode ``"a tabby cat"`` and ``"a white duck"``
separately and condition on ``0.25 * c1 + 0.75 * c2``, the weights normalised to sum to 1
(the original divides each weight by ``totalWeight``).

Grammar. A colon is a weight separator only when it is followed directly by a number
(``2``, ``0.75``, ``.5``, ``-1``, ``1e-1``) that runs up to whitespace or the end of the text.
The text before it, back to the previous separator, is the sub-prompt (whitespace stripped);
text after the last separator is one more sub-prompt of weight 1, if it is not blank.
Every other colon stays part of the text:

* ``"a cat: fluffy"``, ``"a cat:"``, ``"a cat:0.5,"`` — not followed by a number up to whitespace.
* ``"https://example.com"`` — followed by ``//``.
* ``"at 10:30"``, ``"16:9"``, ``"John 3:16"`` — a digit before the colon and a bare integer after
  it reads as a time, ratio or verse. (``"born 1990:0.5"`` with a decimal point is a weight.)

Differences from the original, on purpose:

* The original split at every colon and gave a missing or unparsable weight 1.0 (with a printed
  warning), so ``"time: 10:30"`` became three sub-prompts. Here such colons are text.
* The original kept whitespace-only trailing parts as a sub-prompt and, for a single weighted
  sub-prompt, encoded the whole text, weight included. Here sub-prompts are stripped and the
  weight text never reaches CLIP.

Pure Python; the caller sums the embeddings.
"""

from __future__ import annotations

import re

__all__ = ["parse_weighted"]

# ":" + number, ending at whitespace or end of text. Group 1: the digit before the colon, if any;
# group 2: the number; group 3: set when the number has a fraction or exponent (not a bare integer).
_SEPARATOR = re.compile(
    r"""
    (\d)?:                                         # optional digit just before the colon
    ( [+-]? (?: \d+ ((?:\.\d*)?(?:[eE][+-]?\d+)?) | \.\d+ (?:[eE][+-]?\d+)? ) )
    (?=\s|$)
    """,
    re.VERBOSE,
)


def _is_separator(match: re.Match) -> bool:
    """A digit before the colon and a bare integer after it is a time/ratio ("10:30"), not a weight."""
    digit_before, fraction = match.group(1), match.group(3)
    bare_integer = fraction == ""  # None for the ".5" branch
    return digit_before is None or not bare_integer


def parse_weighted(prompt: str) -> list[tuple[str, float]]:
    """Split ``prompt`` into ``(sub_prompt, weight)`` pairs, weights normalised to sum to 1.

    A prompt without weight separators gives ``[(prompt, 1.0)]``, the text unchanged.
    Raises ``ValueError`` when the weights sum to zero or less (e.g. all weights 0), since the
    normalised weights would then be undefined or have flipped signs.
    """
    parts: list[tuple[str, float]] = []
    start = 0
    for match in _SEPARATOR.finditer(prompt):
        if not _is_separator(match):
            continue
        colon = match.start(2) - 1  # the digit group, if any, belongs to the sub-prompt
        parts.append((prompt[start:colon].strip(), float(match.group(2))))
        start = match.end()
    if not parts:
        return [(prompt, 1.0)]
    tail = prompt[start:].strip()
    if tail:
        parts.append((tail, 1.0))

    total = sum(weight for _, weight in parts)
    if not total > 0:
        listed = ", ".join(f"{text!r}:{weight:g}" for text, weight in parts)
        raise ValueError(
            f"sub-prompt weights must sum to a positive number, got {total:g} ({listed}); "
            "give at least one sub-prompt a positive weight"
        )
    return [(text, weight / total) for text, weight in parts]
