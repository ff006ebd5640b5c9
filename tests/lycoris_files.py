"""Test helper: LyCORIS files in the kohya layout (`lora_unet_<diffusers module, . as _>.<tensor>`,
`lora_te_text_model_...`) with random tensors shaped from diffusers' / transformers' modules of a tiny
checkpoint, and the reference: the lycoris-lora package's own modules built from the same tensors
(`lycoris.modules.get_module` + `make_module`, the path its `create_lycoris_from_weights` takes) and
merged into those diffusers modules.

Written from LyCORIS' layouts (its modules' `weight_list` and constructors), not from the code under test.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

RANK, ALPHA = 4, 2.0  # alpha != rank: the scale alpha / rank is exercised


def _factor(n: int) -> int:
    from lycoris.functional.general import factorization

    return factorization(n, -1)[0]


def module_tensors(kind: str, layer: nn.Module, g: torch.Generator, rank: int = RANK, alpha: float = ALPHA) -> dict:
    """Random tensors of one module of `kind` for `layer` (a diffusers/transformers Linear, Conv2d or norm)."""
    def rnd(*shape, std=1.0):
        return torch.randn(shape, generator=g) * std

    w = layer.weight
    out, inp, k = w.shape[0], (w.shape[1] if w.dim() > 1 else 0), tuple(w.shape[2:])
    taps = int(torch.tensor(k).prod()) if k else 1
    a = torch.tensor(alpha)
    if kind in ("locon", "dora_out", "dora_in"):  # lora_up ~ changes W by ~30 %
        t = {"lora_down.weight": rnd(rank, inp, *k, std=(inp * taps) ** -0.5),
             "lora_up.weight": rnd(out, rank, *(1,) * len(k), std=0.3 * w.std().item() * (rank / alpha) * rank ** -0.5 * 2),
             "alpha": a}
        if kind == "dora_out":  # LyCORIS >= 3: the magnitude per output row, (out, 1[, 1, 1])
            t["dora_scale"] = w.detach().reshape(out, -1).norm(dim=1).reshape(out, *[1] * (w.dim() - 1)) * (
                1 + 0.3 * rnd(out, *[1] * (w.dim() - 1)))
        elif kind == "dora_in":  # LyCORIS 2 / the webui: per input column, (1, in[, 1, 1])
            t["dora_scale"] = w.detach().transpose(0, 1).reshape(inp, -1).norm(dim=1).reshape(1, inp, *[1] * len(k)) * (
                1 + 0.3 * rnd(1, inp, *[1] * len(k)))
        return t
    if kind == "locon_cp":  # 1x1 down, (r, r, kh, kw) mid, 1x1 up
        return {"lora_down.weight": rnd(rank, inp, 1, 1, std=inp ** -0.5), "lora_mid.weight": rnd(rank, rank, *k, std=(rank * taps) ** -0.5),
                "lora_up.weight": rnd(out, rank, 1, 1, std=3 * w.std().item() * rank ** -0.5 * rank / alpha), "alpha": a}
    s = (0.3 * w.std().item() * rank / alpha) ** 0.5  # each Hadamard factor ~ sqrt of the change
    if kind == "loha":
        return {"hada_w1_a": rnd(out, rank, std=s * rank ** -0.5), "hada_w1_b": rnd(rank, inp * taps),
                "hada_w2_a": rnd(out, rank, std=s * rank ** -0.5), "hada_w2_b": rnd(rank, inp * taps), "alpha": a}
    if kind == "loha_cp":
        return {"hada_t1": rnd(rank, rank, *k, std=rank ** -1), "hada_w1_a": rnd(rank, out, std=s), "hada_w1_b": rnd(rank, inp),
                "hada_t2": rnd(rank, rank, *k, std=rank ** -1), "hada_w2_a": rnd(rank, out, std=s), "hada_w2_b": rnd(rank, inp),
                "alpha": a}
    if kind in ("lokr", "lokr_w1ab", "lokr_cp"):
        rank = 2  # below half of w2's sides (8 in the tiny model), else LyCORIS lays LoKr out as a full w2
        p, q = _factor(out), _factor(inp)
        c, d = out // p, inp // q
        t = {"alpha": a}
        if kind == "lokr_w1ab":  # both halves low rank (LyCORIS' decompose_both; rank 1 so that w1 is split)
            rank = 1
            t.update({"lokr_w1_a": rnd(p, rank), "lokr_w1_b": rnd(rank, q),
                      "lokr_w2_a": rnd(c, rank), "lokr_w2_b": rnd(rank, d * taps, std=0.3 * w.std().item() * rank / alpha)})
        else:
            t["lokr_w1"] = rnd(p, q)
            if kind == "lokr":  # (c, r) @ (r, d·kh·kw)
                t.update({"lokr_w2_a": rnd(c, rank, std=rank ** -0.5),
                          "lokr_w2_b": rnd(rank, d * taps, std=0.3 * w.std().item() * rank / alpha)})
            else:  # CP: t2 (r, r, kh, kw), w2_a (r, c), w2_b (r, d)
                t.update({"lokr_t2": rnd(rank, rank, *k, std=rank ** -1), "lokr_w2_a": rnd(rank, c),
                          "lokr_w2_b": rnd(rank, d, std=0.3 * w.std().item() * rank / alpha)})
        return t
    if kind in ("ia3_out", "ia3_in"):
        on_input = kind == "ia3_in"
        n = inp if on_input else out
        shape = (1, n, 1, 1) if w.dim() == 4 else (n,)  # IA3Module's parameter shapes
        return {"weight": rnd(*shape, std=0.3), "on_input": torch.tensor(int(on_input))}
    if kind == "full":
        t = {"diff": rnd(*w.shape, std=0.3 * w.std().item())}
        if layer.bias is not None:
            t["diff_b"] = rnd(out, std=0.3 * layer.bias.std().item())
        return t
    if kind == "norm":
        return {"w_norm": rnd(out, std=0.3), "b_norm": rnd(out, std=0.3)}
    raise ValueError(kind)


def lycoris_state(unet, text, plan, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya-layout state dict: `plan` is [(prefix "unet"/"te", diffusers module name, kind)]."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, name, kind in plan:
        layer = _layer(unet, text, prefix, name)
        for part, t in module_tensors(kind, layer, g).items():
            out[f"lora_{prefix}_{name.replace('.', '_')}.{part}"] = t.contiguous()
    return out


def _layer(unet, text, prefix: str, name: str) -> nn.Module:
    """The module `name` (kohya's `text_model.` path for the text encoder, which transformers >= 5 drops)."""
    if prefix == "unet":
        return unet.get_submodule(name)
    try:
        return text.get_submodule(name)
    except AttributeError:
        return text.get_submodule(name.removeprefix("text_model."))


def write(path: Path, state: dict) -> Path:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return path


def lycoris_merge(unet, text, plan, state: dict, weight: float) -> None:
    """Merge `state` (from `lycoris_state(..., plan)`) into the diffusers UNet / CLIP text model in place,
    with the lycoris-lora package's modules:
    - LoCon (with lora_mid), (IA)^3: `merge_to(weight)`;
    - LoHa, LoKr: W + weight · `get_weight(shape)` (the rebuild their forward uses: alpha / rank once;
      their `get_diff_weight`, hence `merge_to`, applies it twice, see optimizedSD/custom/lycoris.py);
    - DoRA: `merge_to(1)` gives W1, then W + weight · (W1 - W) (LyCORIS puts the weight inside the
      magnitude, the webui and ComfyUI scale the change: both equal at 1);
    - full, norm: W + `get_diff_weight(weight)` (and the bias).
    The per-input DoRA (a (1, in, ...) dora_scale) is a LyCORIS module with `wd_on_out=False`."""
    from lycoris.modules import LohaModule, LokrModule, get_module, make_module

    with torch.no_grad():
        for prefix, name, kind in plan:
            layer = _layer(unet, text, prefix, name)
            lora_name = f"lora_{prefix}_{name.replace('.', '_')}"
            parts = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == lora_name}
            dora = parts.pop("dora_scale", None)
            sub = {f"{lora_name}.{k}": v for k, v in parts.items()}
            cls, params = get_module(sub, lora_name)
            if kind == "lokr_cp":  # make_module_from_state_dict takes w2_a's 2nd dim as the rank: build it by hand
                m = _lokr_cp(lora_name, layer, parts)
            elif kind.startswith("ia3"):  # its make_module_from_state_dict takes no on_input (extract gives it)
                m = cls(lora_name, layer, 1.0, train_on_input=bool(parts["on_input"]))
                m.weight.data.copy_(parts["weight"])
            else:
                m = make_module(cls, params, lora_name, layer)
            w0 = layer.weight.detach().clone()
            if dora is not None:
                m.wd, m.wd_on_out = True, kind == "dora_out"
                m.dora_scale = nn.Parameter(dora.clone())
                m.merge_to(1.0)
                layer.weight.copy_(w0 + weight * (layer.weight - w0))
            elif isinstance(m, (LohaModule, LokrModule)):
                layer.weight.copy_(w0 + weight * m.get_weight(m.shape).reshape(w0.shape))
            elif kind in ("full", "norm"):
                dw, db = m.get_diff_weight(weight)
                layer.weight.copy_(w0 + dw.reshape(w0.shape))
                if db is not None:
                    layer.bias.copy_(layer.bias + db)
            else:
                m.merge_to(weight)


def _lokr_cp(name, layer, parts):
    """LyCORIS' LokrModule with a CP-decomposed w2 (use_tucker), its tensors copied in."""
    from lycoris.modules import LokrModule

    rank = parts["lokr_t2"].shape[0]
    p, q = parts["lokr_w1"].shape
    m = LokrModule(name, layer, 1.0, rank, float(parts["alpha"]), use_tucker=True, factor=max(p, q))
    assert m.tucker and m.use_w1 and not m.use_w2, "LyCORIS laid it out otherwise"
    for part in ("lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"):
        getattr(m, part).data.copy_(parts[part])
    return m


def demo_file(path: Path, seed: int = 0) -> Path:
    """A file for the demo model (weights/demo.safetensors) mixing kinds module by module: LoHa on the first
    self-attention query and the text encoder's first query, LoKr on the first ResBlock's conv1, DoRA on the
    first cross-attention key; of visible effect at weight 0.8."""
    from reference import diffusers_unet, transformers_clip
    from safetensors.torch import load_file

    from optimizedSD.model.config import SDConfig

    root = Path(__file__).resolve().parent.parent
    cfg = SDConfig.from_yaml(root / "configs" / "demo.yaml")
    state = load_file(str(root / "weights" / "demo.safetensors"))
    unet, text = diffusers_unet(cfg, state), transformers_clip(cfg, state)
    names = [n for n, _ in unet.named_modules()]
    first = lambda end: next(n for n in names if n.endswith(end))  # noqa: E731
    plan = [("unet", first("attn1.to_q"), "loha"), ("unet", first("resnets.0.conv1"), "lokr"),
            ("unet", first("attn2.to_k"), "dora_out"), ("te", "text_model.encoder.layers.0.self_attn.q_proj", "loha")]
    return write(path, lycoris_state(unet, text, plan, seed))
