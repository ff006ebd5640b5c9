"""The weight changes of the LyCORIS layer kinds (and DoRA, (IA)^3, full diffs, norm diffs), as kohya's
scripts and LyCORIS write them: pure functions from the tensors of one module of a file to the fp32
change of that layer's weight or bias at weight 1. `lora.py` reads the files, names the layers and
patches the host masters with these.

One module's tensors are keyed by what follows its name in the file (`hada_w1_a`, `lora_up.weight`,
`alpha`, ...). `kind_of` names the kind; `weight_delta` / `bias_delta` build the change:

| kind | tensors | change of W (out, in[, kh, kw]) |
|---|---|---|
| LoRA / LoCon | lora_up (out, r), lora_down (r, in[, kh, kw]) [, lora_mid (r, r, kh, kw): CP] | s · up @ down (CP: mid ×1 up ×2 down) |
| LoHa | hada_w1_a (out, r), hada_w1_b (r, in·kh·kw), hada_w2_a/b [, hada_t1/t2 (r, r, kh, kw): CP, a (r, out), b (r, in)] | s · (w1_a @ w1_b) ⊙ (w2_a @ w2_b) |
| LoKr | lokr_w1 or lokr_w1_a @ lokr_w1_b (a, b); lokr_w2 or lokr_w2_a @ lokr_w2_b (c, d[, kh, kw]) [, lokr_t2: CP] | s · w1 ⊗ w2, (a·c, b·d[, kh, kw]) |
| (IA)^3 | weight (out) or (in) with on_input | W ⊙ weight, along the output or input channels |
| full | diff (the shape of W) [, diff_b] | diff (the bias: diff_b) |
| norm | w_norm, b_norm (LayerNorm / GroupNorm) | w_norm (the bias: b_norm) |

s is alpha / r (r: the rank, `lora_down`'s / `hada_w1_b`'s / `lokr_w?_b`'s first dimension; no alpha:
1; a LoKr of two full matrices: 1), or the module's `scale` when the file has one (the webui's rule).
`bias` (a tensor of W's size) is added to the product before s (the webui's rule). With `dora_scale`
(DoRA, Liu et al. 2024, arXiv 2402.09353) the change is `m · V / ‖V‖ - W` with V = W + s·ΔW: the norm
per output row when `dora_scale` is (out, 1, ...) (LyCORIS >= 3, `wd_on_output`), per input column
(over the output and kernel dimensions) when it is (1, in, ...) (LyCORIS 2 and the webui's reading).
A file's weight w multiplies every change (LyCORIS merges DoRA with w inside the magnitude; the webui
and ComfyUI, as here, scale the change: at w = 1 all agree).

Note: LyCORIS 4's `LohaModule/LokrModule.get_diff_weight` (its merge) multiplies by alpha / r twice;
the same modules' forward (what training optimised) and their functional `diff_weight` scale once,
as the webui and ComfyUI do, and as here.
"""
from __future__ import annotations

import math

import torch

PLAIN = ("lora_up.weight", "lora_down.weight", "alpha")  # what the plain LoRA path of lora.py reads
_COMMON = ("alpha", "scale", "dora_scale", "bias")
KINDS = {  # kind -> (tensors it may hold besides _COMMON, those it needs)
    "LoCon": (("lora_up.weight", "lora_down.weight", "lora_mid.weight"), ("lora_up.weight", "lora_down.weight")),
    "LoHa": (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
             ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
    "LoKr": (("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"), ()),
    "(IA)^3": (("weight", "on_input"), ("weight", "on_input")),
    "full diff": (("diff", "diff_b"), ()),
    "norm diff": (("w_norm", "b_norm"), ()),
}
REFUSED = {  # part of a key -> the kind it marks, which is not supported
    "oft_blocks": "OFT/BOFT", "oft_diag": "OFT", "rescale": "OFT/BOFT", "a1.weight": "GLoRA", "a2.weight": "GLoRA",
    "b1.weight": "GLoRA", "b2.weight": "GLoRA", "bm.weight": "GLoRA", "lambda_layer": "T-LoRA",
    "q_layer.weight": "T-LoRA", "p_layer.weight": "T-LoRA",
}
PARTS = frozenset(_COMMON).union(*(held for held, _ in KINDS.values()))  # every tensor name a module may hold


class LycorisError(ValueError):
    """A module whose tensors make no change of this kind (missing, extra or mis-shaped); says which."""


def refused_kind(part: str) -> str | None:
    """The unsupported kind (`OFT/BOFT`, `GLoRA`, `T-LoRA`) a tensor name marks, or None."""
    return REFUSED.get(part)


def kind_of(parts: dict) -> str:
    """The kind of one module's tensors (a `KINDS` key); LycorisError naming what is missing or mixed."""
    kinds = [k for k, (held, _) in KINDS.items() if any(p in parts for p in held)]
    if len(kinds) != 1:
        raise LycorisError("holds the tensors of " + (" and ".join(kinds) if kinds else "no layer kind")
                           + ("" if kinds else f" ({', '.join(sorted(parts))})"))
    kind = kinds[0]
    missing = [p for p in KINDS[kind][1] if p not in parts]
    if kind == "LoKr":
        missing += [f"lokr_w{i} or lokr_w{i}_a/b" for i in (1, 2)
                    if f"lokr_w{i}" not in parts and not (f"lokr_w{i}_a" in parts and f"lokr_w{i}_b" in parts)]
    elif kind == "full diff" and "diff" not in parts and "diff_b" not in parts or kind == "norm diff" \
            and "w_norm" not in parts and "b_norm" not in parts:
        missing.append("its tensors")
    if kind == "LoHa" and ("hada_t1" in parts) != ("hada_t2" in parts):
        missing.append("hada_t2" if "hada_t1" in parts else "hada_t1")
    if missing:
        raise LycorisError(f"is a {kind} layer without {', '.join(missing)}")
    return kind


def scale(parts: dict, kind: str) -> float:
    """s: the module's `scale`, else alpha / rank (no alpha, or a LoKr without a low-rank half: 1)."""
    if "scale" in parts:
        return float(parts["scale"])
    rank = {"LoCon": "lora_down.weight", "LoHa": "hada_w1_b"}.get(kind)
    dim = parts[rank].shape[0] if rank else None
    if kind == "LoKr":  # the webui's rule: the rank of the last low-rank half
        dim = next((parts[p].shape[0] for p in ("lokr_w2_b", "lokr_w1_b") if p in parts), None)
    if dim is None or "alpha" not in parts:
        return 1.0
    return float(parts["alpha"]) / dim


# ---- the kinds: fp32 changes at weight 1, before alpha / rank ---------------------------------------
def locon(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
    """up @ down, (out, in[, kh, kw]); with `mid` (r, r, kh, kw) the CP (Tucker) kernel
    Σ_mn mid[n, m] up[:, n] down[m, :] of LoCon's `use_tucker`."""
    up, down = up.float().flatten(1), down.float()
    if mid is None:
        return (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return torch.einsum("nmkl,in,mj->ijkl", mid.float(), up, down.flatten(1))


def _cp(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Tucker rebuild: t (r, r, kh, kw), a (r, out), b (r, in) -> (out, in, kh, kw), as LyCORIS' `rebuild_tucker`."""
    return torch.einsum("ijkl,ip,jr->prkl", t.float(), a.float(), b.float())


def loha(w1a, w1b, w2a, w2b, t1=None, t2=None) -> torch.Tensor:
    """LoHa (Hyeon-Woo et al. 2022, FedPara): (w1_a @ w1_b) ⊙ (w2_a @ w2_b), (out, in·kh·kw), or each
    factor a CP rebuild from hada_t1/t2 for a convolution: (out, in, kh, kw)."""
    if t1 is not None:
        return _cp(t1, w1a, w1b) * _cp(t2, w2a, w2b)
    return (w1a.float().flatten(1) @ w1b.float().flatten(1)) * (w2a.float().flatten(1) @ w2b.float().flatten(1))


def lokr(w1=None, w1a=None, w1b=None, w2=None, w2a=None, w2b=None, t2=None) -> torch.Tensor:
    """LoKr (Kronecker product): w1 (a, b) ⊗ w2 (c, d[, kh, kw]) = (a·c, b·d[, kh, kw]); either half
    may be a low-rank product, w2 of a convolution a CP rebuild with lokr_t2 or (c, r) @ (r, d·kh·kw)."""
    w1 = w1.float() if w1 is not None else w1a.float() @ w1b.float()
    if w2 is not None:
        w2 = w2.float()
    elif t2 is not None:
        w2 = _cp(t2, w2a, w2b)
    else:
        w2 = w2a.float() @ w2b.float().flatten(1)  # (c, d·kh·kw): kron then reshape keeps each tap in place
    return torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - 2)), w2.contiguous())


def ia3(weight: torch.Tensor, w: torch.Tensor, on_input: bool) -> torch.Tensor:
    """(IA)^3 (Liu et al. 2022): W scaled per output channel (or input channel, `on_input`) by w: the change
    W ⊙ w, as LyCORIS' IA3Module and the webui merge it."""
    axis = 1 if on_input else 0
    shape = [1] * weight.dim()
    shape[axis] = weight.shape[axis]
    return weight.float() * w.float().reshape(shape)


def dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: the change that makes V = W + delta have the magnitude `m` (dora_scale): m · V / ‖V‖ - W;
    ‖V‖ per output row when m is (out, 1, ...), per input column when m is (1, in, ...) (see above)."""
    v = weight.float() + delta
    m, out, inp = magnitude.float(), v.shape[0], v.shape[1]
    per_input = m.dim() >= 2 and m.shape[0] == 1 and m.shape[1] == inp and m.numel() == inp and out != 1
    if not per_input and m.numel() == out and (m.dim() < 2 or m.shape[0] == out):  # (out, 1, ...) or PEFT's (out,)
        m = m.reshape(out, *[1] * (v.dim() - 1))
        norm = v.reshape(out, -1).norm(dim=1).reshape(m.shape)
    elif m.numel() == inp:  # (1, in, ...): over the outputs and kernel taps of each input channel
        m = m.reshape(1, inp, *[1] * (v.dim() - 2))
        norm = v.transpose(0, 1).reshape(inp, -1).norm(dim=1).reshape(m.shape)
    else:
        raise LycorisError(f"has a dora_scale of {tuple(magnitude.shape)}, which fits neither the {v.shape[0]} outputs "
                           f"nor the {v.shape[1]} inputs of the layer")
    return v * (m / (norm + torch.finfo(torch.float32).eps)) - weight.float()


# ---- one module -> the change of one parameter -------------------------------------------------------
def params(parts: dict) -> tuple[str, ...]:
    """The parameters of the layer a module changes: ("weight",), ("bias",) or both."""
    kind = kind_of(parts)
    bias = "diff_b" in parts or "b_norm" in parts
    weight = not (kind == "full diff" and "diff" not in parts or kind == "norm diff" and "w_norm" not in parts)
    return ("weight",) * weight + ("bias",) * bias


def weight_delta(parts: dict, weight: torch.Tensor) -> torch.Tensor:
    """The fp32 change of `weight` (the layer's original weight, its shape) a module makes at weight 1;
    LycorisError (or torch's RuntimeError) when its tensors do not make that shape. With `weight` and the
    module's non-scalar tensors on `meta` it checks the shapes only."""
    kind = kind_of(parts)
    p = parts.get
    if kind == "LoCon":
        d = locon(p("lora_up.weight"), p("lora_down.weight"), p("lora_mid.weight"))
    elif kind == "LoHa":
        d = loha(p("hada_w1_a"), p("hada_w1_b"), p("hada_w2_a"), p("hada_w2_b"), p("hada_t1"), p("hada_t2"))
    elif kind == "LoKr":
        d = lokr(p("lokr_w1"), p("lokr_w1_a"), p("lokr_w1_b"), p("lokr_w2"), p("lokr_w2_a"), p("lokr_w2_b"),
                 p("lokr_t2"))
    elif kind == "(IA)^3":
        d = ia3(weight, p("weight"), bool(float(p("on_input"))))
    else:
        d = (p("diff") if kind == "full diff" else p("w_norm")).float()
    _fits(d, weight.shape, "the product")
    d = d.reshape(weight.shape)
    if "bias" in parts:  # the webui's dense `bias`: added to the product, then scaled
        _fits(parts["bias"], weight.shape, "bias")
        d = d + parts["bias"].float().reshape(weight.shape)
    d = d * scale(parts, kind)
    if "dora_scale" in parts:
        d = dora(weight, d, parts["dora_scale"])
    return d


def bias_delta(parts: dict, bias: torch.Tensor) -> torch.Tensor:
    """The fp32 change of the layer's bias (`diff_b`, `b_norm`) at weight 1."""
    d = parts["diff_b" if "diff_b" in parts else "b_norm"].float()
    _fits(d, bias.shape, "the bias change")
    return d.reshape(bias.shape)  # no alpha / rank: the webui scales only the weight's change


def _fits(d: torch.Tensor, shape, what: str) -> None:
    if tuple(d.shape) != tuple(shape) and (d.numel() != math.prod(shape) or (d.dim() and d.shape[0] != shape[0])):
        raise LycorisError(f"makes {what} {tuple(d.shape)}, which does not fit the layer's {tuple(shape)}")
