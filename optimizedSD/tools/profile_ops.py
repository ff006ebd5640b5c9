"""Where a warm CPU image spends its time, op by op: the torch profiler's table
(`python optimizedSD/bench.py --profile-ops --ckpt CKPT --precision bf16 [--json]`).

The engine loads once and renders one image (the warm-up: first-call allocations and oneDNN's kernel
choices), then renders the same request again under `torch.profiler`: the prompt, seed, sampler (euler)
and guidance of the peer benchmark (tools/bench_peers.py), at `--sizes`' first size and `--steps`. Each
row is one ATen op: its calls and its self CPU seconds (time in the op itself, not in the ops it calls),
largest first; `--rows` of them in the table, every op in `--json`. The figure a warm process's
per-image time is made of, for comparing with a peer's. Above the table, the image's phases (the
pipeline's `optimizedSD::text`, `::unet` (one row per UNet evaluation) and `::decode` scopes): calls and
seconds, everything inside them included.

With `--vs-openvino` (OpenVINO's Python as `bench_peers` finds it), the same for OpenVINO: the checkpoint
exported once (not timed), its UNet (the guided pair at the image's latent size) and VAE decoder compiled
with `PERF_COUNT`, each called `OPENVINO_CALLS` times; their seconds, and the last call's per-node times
summed by node type and kernel (e.g. `Convolution (brgconv_avx512_bf16)`).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .bench_peers import OPENVINO_PYTHON, last_json, missing, openvino_ir, ours_engine, ours_image_seconds
from .bench_vs_diffusers import BenchError, run_child

PHASES = ("optimizedSD::text", "optimizedSD::unet", "optimizedSD::decode")
OPENVINO_CALLS = 3


def profile_image(ckpt: str, config: str | None, precision: str, size: int, steps: int) -> dict:
    """{"image_s": the profiled image's seconds, "warmup_s", "ops": [{"op", "calls", "self_s"}, ...] largest first}."""
    from torch.profiler import ProfilerActivity, profile

    engine = ours_engine(ckpt, precision, config)
    warmup = ours_image_seconds(engine, size, steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = ours_image_seconds(engine, size, steps)
    events = prof.key_averages()
    ops = [dict(op=e.key, calls=e.count, self_s=round(e.self_cpu_time_total / 1e6, 4)) for e in events
           if e.key not in PHASES]
    ops.sort(key=lambda r: -r["self_s"])
    phases = [dict(phase=e.key.split("::")[1], calls=e.count, total_s=round(e.cpu_time_total / 1e6, 3))
              for e in events if e.key in PHASES]
    return dict(precision=precision, size=size, steps=steps, warmup_s=round(warmup, 2), image_s=round(seconds, 2),
                phases=sorted(phases, key=lambda r: PHASES.index("optimizedSD::" + r["phase"])), ops=ops)


OPENVINO_PROFILE = """
import collections, json, sys, time
import numpy as np, openvino as ov
folder, latent, calls = sys.argv[1], int(sys.argv[2]) // 8, int(sys.argv[3])
core, rng, result = ov.Core(), np.random.default_rng(0), {}
inputs = {"sample": (2, 4, latent, latent), "encoder_hidden_states": (2, 77, 768), "latent_sample": (1, 4, latent, latent)}
for name in ("unet", "vae_decoder"):
    model = core.read_model(f"{folder}/{name}/openvino_model.xml")
    compiled = core.compile_model(model, "CPU", {"PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    feeds = {p.get_any_name(): np.array([500], dtype=np.int64) if p.get_any_name() == "timestep"
             else rng.standard_normal(inputs[p.get_any_name()]).astype(np.float32) for p in model.inputs}
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        request.infer(feeds)
        seconds.append(round(time.perf_counter() - start, 3))
    ops = collections.defaultdict(lambda: [0, 0.0])
    for info in request.profiling_info:
        row = ops[f"{info.node_type} ({info.exec_type})"]
        row[0] += 1
        row[1] += info.real_time.total_seconds()
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    result[name] = {"precision": getattr(hint, "get_type_name", lambda: str(hint))(), "seconds": seconds,
                    "ops": sorted(({"op": k, "calls": v[0], "self_s": round(v[1], 4)} for k, v in ops.items()),
                                  key=lambda r: -r["self_s"])}
print(json.dumps(result))
"""


def profile_openvino(ckpt: str, size: int, openvino_python: str = OPENVINO_PYTHON) -> dict:
    """{"unet": {"precision", "seconds": each call's, "ops": the last call's by node type}, "vae_decoder": ...}."""
    with tempfile.TemporaryDirectory(prefix="profile-openvino-") as work:
        work = Path(work)
        folder = openvino_ir(str(Path(ckpt).resolve()), work, openvino_python,
                             log=lambda *a: print(*a, file=sys.stderr, flush=True))
        run_child([openvino_python, "-c", OPENVINO_PROFILE, str(folder), str(size), str(OPENVINO_CALLS)],
                  work / "profile.log")
        return last_json(work / "profile.log")


def _op_lines(ops: list[dict], rows: int) -> list[str]:
    total = sum(r["self_s"] for r in ops) or 1.0
    return [f"{'op':50s} {'calls':>6s} {'self s':>8s} {'share':>6s}",
            *(f"{r['op'][:50]:50s} {r['calls']:6d} {r['self_s']:8.3f} {100 * r['self_s'] / total:5.1f}%" for r in ops[:rows])]


def format_table(result: dict, rows: int) -> str:
    steps = result["steps"]
    lines = [f"one warm {result['size']}² image, {steps} euler step{'s' * (steps != 1)}, --precision {result['precision']}: "
             f"{result['image_s']:.2f} s (profiled; warm-up image {result['warmup_s']:.2f} s)"]
    for p in result["phases"]:
        each = f" ({p['total_s'] / p['calls']:.2f} s each)" if p["calls"] > 1 else ""
        lines.append(f"  {p['phase']}: {p['calls']} call{'s' * (p['calls'] != 1)}, {p['total_s']:.2f} s{each}")
    lines += _op_lines(result["ops"], rows)
    for name, model in result.get("openvino", {}).items():
        seconds = ", ".join(f"{x:.2f}" for x in model["seconds"])
        lines += [f"OpenVINO {name} ({model['precision']}), {len(model['seconds'])} calls: {seconds} s; the last, by node:",
                  *_op_lines(model["ops"], rows)]
    return "\n".join(lines)


def main(ckpt: str | None, config: str | None, precision: str, size: int, steps: int, rows: int, as_json: bool,
         vs_openvino: bool = False, openvino_python: str = OPENVINO_PYTHON) -> int:
    from ..engine.request import RequestError

    try:
        if not ckpt:
            raise RequestError("--profile-ops needs --ckpt CKPT")
        result = profile_image(ckpt, config, precision, size, steps)
        if vs_openvino:
            why = missing("openvino", openvino_python)
            if why:
                print(why, file=sys.stderr)
            else:
                result["openvino"] = profile_openvino(ckpt, size, openvino_python)
    except (RequestError, BenchError) as e:  # a missing or unreadable checkpoint, a precision this CPU refuses
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if as_json else format_table(result, rows))
    return 0
