"""`bench.py --attention` (tools/bench_attention.py): its list of one image's attention calls is checked
against the calls the full-size SD v1 model makes, recorded on `meta` (the UNet's halves for one
evaluation of the guided pair, the VAE's decode); and its table and JSON at a small size."""
from __future__ import annotations

import collections
import json
import sys

import pytest
import torch

from optimizedSD.model import unet as unet_module
from optimizedSD.model import vae as vae_module
from optimizedSD.model.config import SDConfig
from optimizedSD.model.fragments import UNET_IN, UNET_OUT, VAE, build_fragments
from optimizedSD.model.paths import ROOT
from optimizedSD.tools.bench_attention import attention_calls


def recorded_calls(monkeypatch, size: int) -> collections.Counter:
    """(where, b, heads, n, m, d) -> calls of one UNet evaluation and one VAE decode, full-size, on meta."""
    seen = collections.Counter()
    for module, where in ((unet_module, "unet"), (vae_module, "vae")):
        real = module.attention
        monkeypatch.setattr(module, "attention", lambda q, k, v, _real=real, _where=where:
                            seen.update([(_where, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3])])
                            or _real(q, k, v))
    with torch.device("meta"):
        frags = build_fragments(SDConfig(), names=(UNET_IN, UNET_OUT, VAE))
        latent = size // 8
        x, context = torch.empty(2, 4, latent, latent), torch.empty(2, 77, 768)
        with torch.no_grad():
            h, emb, skips = frags[UNET_IN](x, torch.tensor([500.0, 500.0]), context)
            frags[UNET_OUT](h, emb, skips, context)
            frags[VAE].decode(torch.empty(1, 4, latent, latent))
    return seen


@pytest.mark.parametrize("size", [512, 320])
def test_the_listed_calls_are_the_models(monkeypatch, size):
    steps = 3
    listed = collections.Counter()
    for r in attention_calls(SDConfig(), size, steps):
        where = "vae" if r["where"].startswith("VAE") else "unet"
        listed[(where, r["b"], r["heads"], r["n"], r["m"], r["d"])] += r["calls"]
    recorded = recorded_calls(monkeypatch, size)
    expected = collections.Counter({key: n * (steps if key[0] == "unet" else 1) for key, n in recorded.items()})
    assert listed == expected
    if size == 512:  # the figure docs/benchmarks.md quotes: 20 self-attention calls at 64² (d 40) an image of 4 steps
        calls = {(r["n"], r["m"], r["d"]): r["calls"] for r in attention_calls(SDConfig(), 512, 4)}
        assert calls[(4096, 4096, 40)] == 20


def test_table_and_json(capsys):
    sys.path.insert(0, str(ROOT / "optimizedSD"))
    import bench

    assert bench.main(["--attention", "--sizes", "64", "--steps", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["size"] == 64 and set(result["per_image"]) == {"bf16", "fp32"}
    for row in result["rows"]:
        for name, bound in (("bf16", 0.05), ("fp32", 1e-4)):
            figures = row[name]
            assert figures["torch_ms"] > 0
            if "ours_ms" in figures:  # where this CPU has AVX512-BF16: the two kernels agree within rounding
                assert figures["ours_ms"] > 0 and figures["max_diff"] <= bound
    assert bench.main(["--attention", "--sizes", "64", "--steps", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("SD v1 attention of one 64² image (1 step, ")
    assert lines[-1].startswith("per image: bf16 torch ") and "; fp32 torch " in lines[-1]
