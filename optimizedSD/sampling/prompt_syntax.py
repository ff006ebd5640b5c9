"""AUTOMATIC1111 webui prompt syntax, parsed: text -> a schedule of weighted pieces.

Two passes, as the webui's `modules/prompt_parser.py` (its published rules; this is our own code):

1. **Prompt editing** (`schedule`): `[from:to:when]` reads `from` up to step `when`, `to` after it;
   `[to:when]` adds `to` after `when`; `[from::when]` drops `from` after it; `when` with a decimal
   point is a fraction of the steps (`0.25`), else a step count (`5`). `[a|b|c]` alternates a, b, c, a...
   one per step. The result is `[(until_step, text)]`: `text` is the prompt for the steps
   `previous until_step < step <= until_step`, counted from 1 (the sampler's first model evaluation is
   step 0 and reads the first entry with `step <= until_step`, as the webui's `reconstruct_cond_batch`).
   A prompt the grammar rejects (a `|` outside `[...]`) has no schedule: `[(steps, prompt)]`.
   Brackets that do not close are plain text for this pass; emphasis and escapes pass through verbatim.

2. **Emphasis** (`attention`): `(x)` x1.1, `((x))` x1.21, `[x]` /1.1, `(x:1.4)` x1.4; nesting
   multiplies; `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters; an unclosed `(` or `[` weighs
   everything after it (as if closed at the end); a `)` or `]` with nothing to close is text;
   `BREAK` (a word of its own, upper case) is `(BREAK_TEXT, BREAK_WEIGHT)`, a marker that starts a
   new 75-token chunk. Runs of equal weight are merged. As the webui, a `BREAK` inside brackets gets
   the brackets' weight and is then no marker but the word "BREAK" at that weight.

Pure Python, no tokens: engine/conditioning.py tokenizes the pieces, chunks them and encodes them.
"""
from __future__ import annotations

import re

__all__ = ["BREAK_TEXT", "BREAK_WEIGHT", "ScheduleError", "attention", "schedule", "parse", "second_order"]

BREAK_TEXT, BREAK_WEIGHT = "BREAK", -1.0  # the webui's marker pair for BREAK
ROUND, SQUARE = 1.1, 1 / 1.1  # the emphasis multipliers of ( ) and [ ]

# The webui's emphasis tokens, in its order of preference: escapes, a lone backslash, openers, an explicit
# weight closing a round bracket, closers, runs of other text, a lone colon.
_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")  # lark's SIGNED_NUMBER
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # text of the editing grammar (escapes kept)
_WHITESPACE = re.compile(r"\s*")

# Samplers that evaluate the model twice per step: the webui counts a schedule's steps in model evaluations
# and builds it over twice the steps for them (its samplers' `second_order` option).
SECOND_ORDER = frozenset({"heun", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde"})


class ScheduleError(ValueError):
    """A `when` of prompt editing outside the steps (one line: what and what to do)."""


def second_order(sampler: str) -> bool:
    return sampler in SECOND_ORDER


# ---- prompt editing ---------------------------------------------------------------------------------
# Nodes: str (verbatim text), ("edit", before | None, after, when_text), ("alt", [options]),
# ("group", open, [parts...]) where parts are node lists and separator strings.

class _Reject(Exception):
    """The text is not a prompt of the editing grammar (a `|` outside brackets)."""


def _prompt(text: str, i: int) -> tuple[list, int]:
    """A run of text, emphasis groups, edits and alternations from `i`; stops at any other character."""
    nodes = []
    while i < len(text):
        m = _PLAIN.match(text, i)
        if m:
            nodes.append(m.group(0))
            i = m.end()
            continue
        parsed = _bracket(text, i) if text[i] in "([" else None
        if parsed is None:
            break
        node, i = parsed
        nodes.append(node)
    return nodes, i


def _bracket(text: str, i: int):
    """The construct opened at `text[i]` ("(" or "["), or None when it does not close as one."""
    inner, j = _prompt(text, i + 1)
    at = text[j:j + 1]
    if text[i] == "(":
        if at == ")":
            return ("group", "(", [inner], ")"), j + 1
        if at == ":":
            second, k = _prompt(text, j + 1)
            if text[k:k + 1] == ")":
                return ("group", "(", [inner, ":", second], ")"), k + 1
        return None
    if at == "]":
        return ("group", "[", [inner], "]"), j + 1
    if at == "|":
        options = [inner]
        while text[j:j + 1] == "|":
            option, j = _prompt(text, j + 1)
            options.append(option)
        return (("alt", options), j + 1) if text[j:j + 1] == "]" else None
    if at != ":":
        return None
    when = _when(text, j + 1)  # [to:when]
    if when is not None:
        return ("edit", None, inner, when[0]), when[1]
    after, k = _prompt(text, j + 1)
    if text[k:k + 1] == ":":
        when = _when(text, k + 1)  # [from:to:when]
        if when is not None:
            return ("edit", inner, after, when[0]), when[1]
    return None


def _when(text: str, i: int):
    """(number text, index after "]") for `[ws] NUMBER [ws] ]` at `i`, else None."""
    i = _WHITESPACE.match(text, i).end()
    m = _NUMBER.match(text, i)
    if not m:
        return None
    j = _WHITESPACE.match(text, m.end()).end()
    return (m.group(0), j + 1) if text[j:j + 1] == "]" else None


def _document(text: str) -> list:
    """The whole text: prompts, and between them brackets, parens and colons that open nothing."""
    nodes, i = [], 0
    while i < len(text):
        part, i = _prompt(text, i)
        nodes += part
        if i < len(text):
            if text[i] not in "[]():":  # a `|`, a backslash at the end
                raise _Reject
            nodes.append(text[i])  # one of [ ] ( ) : as text
            i += 1
    return nodes


def _step_of(when: str, steps: int) -> int:
    value = float(when)
    return min(steps, int(value * steps if "." in when else value))


def _walk(nodes, visit) -> None:
    for node in nodes:
        if isinstance(node, str):
            continue
        visit(node)
        if node[0] == "edit":
            _walk(node[1] or [], visit), _walk(node[2], visit)
        elif node[0] == "alt":
            for option in node[1]:
                _walk(option, visit)
        else:
            for part in node[2]:
                if not isinstance(part, str):
                    _walk(part, visit)


def _text_at(nodes, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "edit":
            _, before, after, when = node
            out.append(_text_at(before or [], step, steps) if step <= _step_of(when, steps) else
                       _text_at(after, step, steps))
        elif node[0] == "alt":
            out.append(_text_at(node[1][(step - 1) % len(node[1])], step, steps))
        else:
            _, opener, parts, closer = node
            out.append(opener + "".join(p if isinstance(p, str) else _text_at(p, step, steps) for p in parts) + closer)
    return "".join(out)


def schedule(prompt: str, steps: int, check: bool = False) -> list[tuple[int, str]]:
    """`[(until_step, text)]` of `prompt` over `steps` steps (see the module docstring), in step order;
    the last entry's `until_step` is `steps`. With `check`, a `when` below 0 or past the steps (a step
    count over `steps`, a fraction over 1) is a `ScheduleError` instead of being clamped as the webui does."""
    try:
        nodes = _document(prompt)
    except _Reject:
        return [(steps, prompt)]
    ends = {steps}

    def visit(node):
        if node[0] == "alt":
            ends.update(range(1, steps + 1))
        elif node[0] == "edit":
            when = node[3]
            if check and (float(when) < 0 or float(when) > (1 if "." in when else steps)):
                kind = "a fraction from 0 to 1 (with a decimal point)" if "." in when else f"a step from 0 to {steps}"
                raise ScheduleError(f"prompt editing [...:{when}] switches outside the {steps} steps; give "
                                    f"{kind}")
            if _step_of(when, steps) >= 1:
                ends.add(_step_of(when, steps))

    _walk(nodes, visit)
    return [(end, _text_at(nodes, end, steps)) for end in sorted(ends)]


# ---- emphasis ---------------------------------------------------------------------------------------

def attention(text: str) -> list[tuple[str, float]]:
    """`[(text, weight)]` of one prompt text (see the module docstring), BREAK as (BREAK_TEXT, BREAK_WEIGHT)."""
    pieces: list[list] = []
    rounds, squares = [], []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):  # an escape; a lone backslash is dropped
            pieces.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(pieces))
        elif token == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds and _is_float(weight):
            multiply(rounds.pop(), float(weight))
        elif token == ")" and rounds:
            multiply(rounds.pop(), ROUND)
        elif token == "]" and squares:
            multiply(squares.pop(), SQUARE)
        else:
            for n, part in enumerate(_BREAK.split(token)):
                if n:
                    pieces.append([BREAK_TEXT, BREAK_WEIGHT])
                pieces.append([part, 1.0])
    for start in rounds:  # unclosed: as if closed at the end
        multiply(start, ROUND)
    for start in squares:
        multiply(start, SQUARE)
    if not pieces:
        return [("", 1.0)]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse(prompt: str, steps: int, check: bool = False) -> list[tuple[int, list[tuple[str, float]]]]:
    """Both passes: `[(until_step, [(text, weight)])]` of one (sub-)prompt over `steps` steps."""
    return [(end, attention(text)) for end, text in schedule(prompt, steps, check)]
