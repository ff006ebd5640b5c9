"""Where a warm CPU image spends its time, op by op: the torch profiler's table
(`python optimizedSD/bench.py --profile-ops --ckpt CKPT --precision bf16 [--json]`).

The engine loads once and renders one image (the warm-up: first-call allocations and oneDNN's kernel
choices), then renders the same request again under `torch.profiler`: the prompt, seed, sampler (euler)
and guidance of the peer benchmark (tools/bench_peers.py), at `--sizes`' first size and `--steps`. Each
row is one ATen op: its calls and its self CPU seconds (time in the op itself, not in the ops it calls),
largest first; `--rows` of them in the table, every op in `--json`. The figure a warm process's
per-image time is made of, for comparing with a peer's.
"""
from __future__ import annotations

import json
import sys

from .bench_peers import ours_engine, ours_image_seconds


def profile_image(ckpt: str, config: str | None, precision: str, size: int, steps: int) -> dict:
    """{"image_s": the profiled image's seconds, "warmup_s", "ops": [{"op", "calls", "self_s"}, ...] largest first}."""
    from torch.profiler import ProfilerActivity, profile

    engine = ours_engine(ckpt, precision, config)
    warmup = ours_image_seconds(engine, size, steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = ours_image_seconds(engine, size, steps)
    ops = [dict(op=e.key, calls=e.count, self_s=round(e.self_cpu_time_total / 1e6, 4)) for e in prof.key_averages()]
    ops.sort(key=lambda r: -r["self_s"])
    return dict(precision=precision, size=size, steps=steps, warmup_s=round(warmup, 2), image_s=round(seconds, 2),
                ops=ops)


def format_table(result: dict, rows: int) -> str:
    total = sum(r["self_s"] for r in result["ops"]) or 1.0
    lines = [f"one warm {result['size']}² image, {result['steps']} euler step{'s' * (result['steps'] != 1)}, --precision {result['precision']}: "
             f"{result['image_s']:.2f} s (profiled; warm-up image {result['warmup_s']:.2f} s)",
             f"{'op':50s} {'calls':>6s} {'self s':>8s} {'share':>6s}"]
    for r in result["ops"][:rows]:
        lines.append(f"{r['op'][:50]:50s} {r['calls']:6d} {r['self_s']:8.3f} {100 * r['self_s'] / total:5.1f}%")
    return "\n".join(lines)


def main(ckpt: str | None, config: str | None, precision: str, size: int, steps: int, rows: int, as_json: bool) -> int:
    from ..engine.request import RequestError

    try:
        if not ckpt:
            raise RequestError("--profile-ops needs --ckpt CKPT")
        result = profile_image(ckpt, config, precision, size, steps)
    except RequestError as e:  # a missing or unreadable checkpoint, a precision this CPU refuses
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if as_json else format_table(result, rows))
    return 0
