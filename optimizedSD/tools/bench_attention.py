"""SD v1's attention calls, one image's worth, on torch's CPU kernel and on ours
(`python optimizedSD/bench.py --attention [--sizes 512] [--steps 4] [--json]`).

The shapes are those of an SD v1 image of `--sizes`' first size on the CPU (`attention_calls`): the
UNet's self- and cross-attention at each level (the guided pair in one batch of 2, 8 heads, a 77-token
prompt) `steps` times, and the VAE decoder's single-head attention once. Each shape is timed, median of
`REPEATS` calls after one, in bf16 and in fp32: torch's `scaled_dot_product_attention` and our kernels
(model/cpu_attention.py), built here if this CPU has AVX512-BF16 (where the engine keeps torch's
kernel, e.g. bf16 on AMX CPUs, the figure is printed all the same). `max_diff`: the largest difference
between the two outputs. The per-image totals are each shape's milliseconds times its calls.
"""
from __future__ import annotations

import json
import sys
import time

REPEATS = 5
PROMPT_TOKENS = 77


def attention_calls(cfg, size: int, steps: int) -> list[dict]:
    """[{"where", "b", "heads", "n", "m", "d", "calls"}]: every attention of one txt2img image, by shape."""
    unet, latent = cfg.unet, size // 8
    rows: dict[tuple, dict] = {}

    def add(where, b, heads, n, m, d, calls):
        row = rows.setdefault((b, heads, n, m, d), dict(where=where, b=b, heads=heads, n=n, m=m, d=d, calls=0))
        row["calls"] += calls

    def heads_of(channels):
        return unet.num_heads if unet.num_head_channels == -1 else channels // unet.num_head_channels

    levels = [(2 ** i, unet.model_channels * mult) for i, mult in enumerate(unet.channel_mult)]
    for ds, channels in levels:
        if ds in unet.attention_resolutions:
            tokens, h = (latent // ds) ** 2, heads_of(channels)
            transformers = unet.transformer_depth * (2 * unet.num_res_blocks + 1)  # input blocks, output blocks
            add(f"UNet self {latent // ds}²", 2, h, tokens, tokens, channels // h, steps * transformers)
            add(f"UNet cross {latent // ds}²", 2, h, tokens, PROMPT_TOKENS, channels // h, steps * transformers)
    ds, channels = levels[-1]
    tokens, h = (latent // ds) ** 2, heads_of(channels)
    add(f"UNet self {latent // ds}² (middle)", 2, h, tokens, tokens, channels // h, steps * unet.transformer_depth)
    add(f"UNet cross {latent // ds}² (middle)", 2, h, tokens, PROMPT_TOKENS, channels // h, steps * unet.transformer_depth)
    vae_channels = cfg.vae.ch * cfg.vae.ch_mult[-1]
    add(f"VAE decoder {latent}²", 1, 1, latent ** 2, latent ** 2, vae_channels, 1)
    return list(rows.values())


def _median_ms(fn) -> float:
    fn()
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return 1000 * sorted(seconds)[len(seconds) // 2]


def measure(size: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from ..model import cpu_attention
    from ..model.config import SDConfig

    names = cpu_attention.NAMES  # dtype -> "bf16" | "fp32"
    kernels, why = {}, None
    if not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        why = "this CPU has no AVX512-BF16"
    else:
        try:
            kernels = {name: cpu_attention.load_kernel(dtype) for dtype, name in names.items()}
        except OSError as e:
            why = f"the kernel could not be built: {e}"
    g = torch.Generator().manual_seed(0)
    rows = attention_calls(SDConfig(), size, steps)
    for row in rows:
        b, h, n, m, d = (row[k] for k in ("b", "heads", "n", "m", "d"))
        base = [torch.randn(b, tokens, h, d, generator=g) for tokens in (n, m, m)]
        for dtype, name in names.items():
            q, k, v = (t.to(dtype).transpose(1, 2) for t in base)
            figures = row[name] = {}
            with torch.no_grad():
                figures["torch_ms"] = round(_median_ms(lambda: F.scaled_dot_product_attention(q, k, v)), 2)
                if name in kernels:
                    fn = kernels[name]
                    figures["ours_ms"] = round(_median_ms(lambda: cpu_attention.attention(q, k, v, kernel=fn)), 2)
                    diff = cpu_attention.attention(q, k, v, kernel=fn).float() - F.scaled_dot_product_attention(q, k, v).float()
                    figures["max_diff"] = float(f"{diff.abs().max().item():.2e}")
    per_image = {}
    for name in names.values():
        per_image[name] = {"torch_s": round(sum(r[name]["torch_ms"] * r["calls"] for r in rows) / 1000, 3)}
        if name in kernels:
            per_image[name]["ours_s"] = round(sum(r[name]["ours_ms"] * r["calls"] for r in rows) / 1000, 3)
    return dict(size=size, steps=steps, threads=torch.get_num_threads(), engine_uses=cpu_attention.status(),
                kernel_unavailable=why, rows=rows, per_image=per_image)


def format_table(result: dict) -> str:
    names = list(result["per_image"])
    steps = result["steps"]
    lines = [f"SD v1 attention of one {result['size']}² image ({steps} step{'s' * (steps != 1)}, "
             f"{result['threads']} threads); the engine here: {result['engine_uses']}"]
    if result["kernel_unavailable"]:
        lines.append(f"our kernels: not measured ({result['kernel_unavailable']})")
    head = "".join(f" {name + ' torch':>11s} {name + ' ours':>10s} {'diff':>8s}" for name in names)
    lines.append(f"{'call':26s} {'(b, heads, n, m, d)':24s} {'calls':>5s}{head}")
    for r in result["rows"]:
        shape = f"({r['b']}, {r['heads']}, {r['n']}, {r['m']}, {r['d']})"
        cells = ""
        for name in names:
            f = r[name]
            ours = f"{f['ours_ms']:10.2f} {f['max_diff']:8.1e}" if "ours_ms" in f else f"{'-':>10s} {'-':>8s}"
            cells += f" {f['torch_ms']:11.2f} {ours}"
        lines.append(f"{r['where']:26s} {shape:24s} {r['calls']:5d}{cells}")
    totals = []
    for name, t in result["per_image"].items():
        totals.append(f"{name} torch {t['torch_s']:.2f} s" + (f", ours {t['ours_s']:.2f} s" if "ours_s" in t else ""))
    lines.append("per image: " + "; ".join(totals))
    return "\n".join(lines)


def main(size: int, steps: int, as_json: bool) -> int:
    result = measure(size, steps)
    print(json.dumps(result) if as_json else format_table(result))
    sys.stdout.flush()
    return 0
