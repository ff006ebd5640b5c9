"""Seconds per sampling step on the CPU with and without one ControlNet, and the planned device
memory of a full-size SD v1 run with one ControlNet at 512x512 (--lowvram, default, --turbo).

    python -m optimizedSD.tools.bench_controlnet [--size 64] [--steps 6] [--repeats 3]

The CPU figure uses the demo model's architecture (configs/ demo YAML) with random weights and a
random ControlNet of the same UNet (full-size random weights are too slow here); the memory figures
are the planner's (engine/planner.py) on the full-size meta model with a full-size ControlNet.
"""
from __future__ import annotations

import argparse
import time

import torch


def cpu_seconds_per_step(size: int, steps: int, repeats: int) -> tuple[float, float]:
    from ..engine.control import ActiveNet, Control, ControlUnit
    from ..engine.offload import Offloader
    from ..engine.pipeline import Pipeline, SampleSettings
    from ..model import paths
    from ..model.config import SDConfig
    from ..model.controlnet import ControlNet
    from ..model.fragments import build_fragments

    cfg = SDConfig.from_yaml(paths.ROOT / paths.DEMO_CONFIG)
    torch.manual_seed(0)
    fragments = build_fragments(cfg)
    net = ControlNet(cfg.unet).eval().requires_grad_(False)
    out = []
    for with_net in (False, True):
        frags = dict(fragments, **({"controlnet0": net} if with_net else {}))
        engine = Offloader(frags, torch.device("cpu"))
        pipe = Pipeline(cfg, engine, unet_bs=2)
        if with_net:
            pipe.control = Control([ActiveNet("controlnet0", net, torch.rand(1, 3, size, size), ControlUnit("bench"))],
                                   engine)
        settings = SampleSettings("ddim", steps, 3.0)
        best = float("inf")
        for _ in range(repeats):
            cond = pipe.conditioning(["a photo", ""])
            noise = torch.randn(1, cfg.channels, size // 8, size // 8)
            t = time.perf_counter()
            with torch.inference_mode():
                pipe.sample(cond[:1], cond[1:], noise, [torch.Generator().manual_seed(0)], settings)
            best = min(best, (time.perf_counter() - t) / steps)
        out.append(best)
    return out[0], out[1]


def planned(size: int = 512):
    from ..engine.planner import choose_plan, gib, predict
    from ..model.config import SDConfig

    cfg = SDConfig()
    rows = []
    for controls in (0, 1):
        for mode in ("lowvram", "default", "turbo"):
            plan = choose_plan(cfg, torch.float16, turbo=mode == "turbo", lowvram=mode == "lowvram", vram=None,
                               unet_bs=1, height=size, width=size, n_samples=1, guided=True, controls=controls)
            peaks, moved = predict(cfg, torch.float16, plan, size, size, 1, True, controls=controls)
            rows.append((controls, mode, max(peaks.values()), peaks["sample"], moved))
    for controls, mode, peak, sample, moved in rows:
        print(f"| {controls} | {mode} | {gib(peak)} | {gib(sample)} | {gib(moved)} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_plan", action="store_true")
    args = p.parse_args(argv)
    plain, control = cpu_seconds_per_step(args.size, args.steps, args.repeats)
    print(f"CPU, demo model at {args.size}x{args.size}, DDIM, CFG batched: {plain * 1000:.1f} ms/step plain UNet, "
          f"{control * 1000:.1f} ms/step with one ControlNet ({control / plain:.2f}x)")
    if not args.skip_plan:
        print("| ControlNets | mode | planned peak | sample phase | host->device per step |")
        print("|---|---|---|---|---|")
        planned()


if __name__ == "__main__":
    main()
