"""Benchmark memory modes and sizes: seconds per image and per step, peak device memory per phase,
host->device bytes per step, host RAM peak, planning time. Each configuration is a full txt2img run
(images are not saved), after its plan (`choose_plan` and `predict` for each batch size of the run)
is timed on its own (`plan_seconds`; the planner's one-time setup, imports and the model built on
meta, is timed before the first row: `planner setup`).

    python optimizedSD/bench.py --device meta --sizes 512 768 1024 2048          # planned, full-size model
    python optimizedSD/bench.py --device cpu --config configs/tiny.yaml --ckpt t.ckpt --sizes 64
    python optimizedSD/bench.py --device cuda --configs lowvram default vram=2G vram=4G turbo --json
    python optimizedSD/bench.py --load sd-v1-4-fp32.safetensors   # host RAM of loading fp16 fragments
    python optimizedSD/bench.py --vs-diffusers full-fp32.safetensors --runs 3   # CPU, whole process vs diffusers
    python optimizedSD/bench.py --lora film_grain.safetensors     # time and host RAM of a LoRA patch
    python optimizedSD/bench.py --device meta --explain-peak --configs lowvram [--fp8]   # what sets each peak
    python optimizedSD/bench.py --profile-ops --ckpt full-v1.safetensors --precision bf16   # a warm CPU image, op by op
    python optimizedSD/bench.py --attention                          # SD's attention: torch's CPU kernel and ours

On `meta` no checkpoint is read and the figures are the planner's; on CPU nothing moves between
devices, so only the timings mean something.
"""
import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # import this folder as the package

from optimizedSD.fronts.cli import UsageError, build_parser, generate  # noqa: E402
from optimizedSD.engine.pipeline import PRECISIONS  # noqa: E402

CONFIGS = ("lowvram", "default", "vram=2G", "vram=4G", "turbo")


def config_flags(name: str) -> list[str]:
    if name in ("lowvram", "turbo"):
        return [f"--{name}"]
    if name == "default":
        return []
    if name.startswith("vram="):
        return ["--vram", name[len("vram="):]]
    raise UsageError(f"unknown configuration {name!r}; use lowvram, default, turbo or vram=SIZE")


def host_ram_peak() -> int:
    """Peak resident set of this process so far, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"any of lowvram, default, turbo, vram=SIZE (default: {' '.join(CONFIGS)})")
    p.add_argument("--sizes", nargs="+", type=int, default=[512], help="square image sizes in pixels")
    p.add_argument("--device", default=None, help="cuda, cpu, mps, or meta to plan a CUDA run")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: 2 on meta, where a DDIM run peaks as any longer one; else 20)")
    p.add_argument("--n_samples", type=int, default=1)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--precision", default="autocast", choices=list(PRECISIONS))
    p.add_argument("--fp8", nargs="?", const="unet", default=None, metavar="unet|all",
                   help="the UNet's (all: and the text encoder's) Linear/Conv2d weights stored in fp8, as the commands' --fp8")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of a table")
    p.add_argument("--explain-peak", action="store_true",
                   help="instead: (--device meta) for each of --configs and --sizes, the largest tensors live on the "
                        "device at each phase's planned peak (--n_samples images; --rows of them per phase)")
    p.add_argument("--rows", type=int, default=8, help="--explain-peak: entries per phase; --profile-ops: ops in the table (default 8)")
    p.add_argument("--load", metavar="CKPT", default=None,
                   help="instead: load CKPT into fp16 fragments and report this process's host RAM peak "
                        "against the torch baseline and the fp16 weights (run it in a fresh process)")
    p.add_argument("--vs-diffusers", metavar="CKPT", default=None,
                   help="instead: time whole CPU runs of this tool against diffusers' StableDiffusionPipeline on "
                        "CKPT's weights (original layout), in alternating processes: the first of --sizes, "
                        "--steps (default 4) DDIM steps, --precision; needs diffusers (requirements-dev.txt)")
    p.add_argument("--runs", type=int, default=2, help="--vs-diffusers: pairs of runs (default 2)")
    p.add_argument("--vs-sdcpp", action="store_true",
                   help="instead: whole CPU runs of this tool against stable-diffusion.cpp (stable-diffusion-cpp-python; "
                        "f32, f16, q8_0) on --ckpt (original layout), euler, the first of --sizes, --steps (default 4); "
                        "skipped with one line when not installed (tools/bench_peers.py)")
    p.add_argument("--vs-openvino", action="store_true",
                   help="instead: the same against OpenVINO (optimum-intel in the venv of --openvino-python; its default "
                        "precision and f32)")
    p.add_argument("--openvino-python", default="/tmp/ov-venv/bin/python",
                   help="--vs-openvino: the Python of the separate venv holding optimum-intel (default /tmp/ov-venv/bin/python)")
    p.add_argument("--images", type=int, default=3, help="--vs-sdcpp/--vs-openvino: images of the warm process (default 3)")
    p.add_argument("--only", metavar="TOOL:PRECISION", action="append", default=None,
                   help="--vs-sdcpp/--vs-openvino: measure only these rows (repeatable, e.g. --only sdcpp:q8_0 "
                        "--only ours:bf16); TOOL is ours, sdcpp or openvino; default: every precision of each tool")
    p.add_argument("--random-ckpt", metavar="PATH", default=None,
                   help="--vs-sdcpp/--vs-openvino: first write a full-size random SD v1 checkpoint (original layout) to PATH")
    p.add_argument("--lora", metavar="FILE", default=None,
                   help="instead: read the LoRA FILE, patch the fp16 host weights of the model (--config; "
                        "uninitialised, no checkpoint read) and undo; report the seconds and the host RAM the "
                        "originals of the patched layers hold")
    p.add_argument("--profile-ops", action="store_true",
                   help="instead: the torch profiler's op table of one warm CPU image of --ckpt (--config, "
                        "--precision, --sizes' first, --steps, default 4; --rows ops, every op with --json); "
                        "with --vs-openvino, OpenVINO's per-node profile of its UNet and VAE decoder too")
    p.add_argument("--attention", action="store_true",
                   help="instead: one image's worth of SD v1 attention calls (--sizes' first, --steps, default 4) "
                        "timed in bf16 and fp32 on torch's CPU kernel and on ours (model/cpu_attention.py)")
    args = p.parse_args(argv)
    if args.attention:
        from optimizedSD.tools import bench_attention

        if (args.steps or 4) < 1:
            p.error("--steps must be at least 1")
        return bench_attention.main(args.sizes[0], args.steps or 4, args.json)
    if args.profile_ops:
        from optimizedSD.tools import profile_ops

        if (args.steps or 4) < 1:
            p.error("--steps must be at least 1")
        return profile_ops.main(args.ckpt, args.config, args.precision, args.sizes[0], args.steps or 4, args.rows,
                                args.json, args.vs_openvino, args.openvino_python)
    if args.vs_sdcpp or args.vs_openvino:
        from optimizedSD.tools import bench_peers

        if args.images < 1 or (args.steps or 4) < 1:
            p.error("--images and --steps must be at least 1")
        tools = [t for t, on in (("sdcpp", args.vs_sdcpp), ("openvino", args.vs_openvino)) if on]
        only = None
        if args.only:
            only = [tuple(o.split(":", 1)) for o in args.only]
            bad = [o for o, t in zip(args.only, only) if len(t) != 2 or t[1] not in bench_peers.PEERS.get(t[0], ())]
            if bad:
                p.error(f"--only {bad[0]}: not a TOOL:PRECISION of " + ", ".join(
                    f"{t}:{q}" for t, qs in bench_peers.PEERS.items() for q in qs))
        return bench_peers.main(args.ckpt, tools, args.sizes[0], args.steps or 4, args.images, args.openvino_python,
                                args.random_ckpt, args.json, config=args.config, only=only)
    if args.vs_diffusers:
        from optimizedSD.tools import bench_vs_diffusers

        if args.runs < 1 or (args.steps or 4) < 1:
            p.error("--runs and --steps must be at least 1")
        return bench_vs_diffusers.main(args.vs_diffusers, args.config, args.sizes[0], args.steps or 4, args.runs,
                                       args.precision, args.json)
    if args.load:
        return bench_load(args.load, args.config, args.json)
    if args.lora:
        return bench_lora(args.lora, args.config, args.json)
    if args.explain_peak:
        return explain_peaks(args)
    steps = args.steps or (2 if args.device == "meta" else 20)
    rows = []
    setup = plan_setup_seconds(args.config, args.precision)
    print(f"planner setup (imports, model built on meta): {setup:.2f} s", file=sys.stderr if args.json else sys.stdout)
    with tempfile.TemporaryDirectory() as out:
        for size in args.sizes:
            for name in args.configs:
                argv = ["--prompt", "a photograph of an astronaut riding a horse", "--H", str(size), "--W", str(size),
                        "--n_samples", str(args.n_samples), "--ddim_steps", str(steps), "--sampler", "ddim",
                        "--seed", "0", "--skip_save", "--skip_grid", "--outdir", out, "--precision", args.precision,
                        *config_flags(name), *(["--fp8", args.fp8] if args.fp8 else [])]
                for flag in ("device", "ckpt", "config"):
                    if getattr(args, flag):
                        argv += [f"--{flag}", getattr(args, flag)]
                run = build_parser("txt2img").parse_args(argv)
                run.json = True  # logs to stderr
                try:
                    planning = plan_seconds(run)
                    figures = generate(run)
                except UsageError as e:
                    planning, figures = None, {"error": str(e)}
                rows.append(dict(config=name, size=size, host_ram_peak_bytes=host_ram_peak(), plan_seconds=planning,
                                 **figures))
                if not args.json:
                    print(format_row(rows[-1], first=len(rows) == 1), flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0


def plan_setup_seconds(config: str | None, precision: str) -> float:
    """Seconds to import the planner and build the model on meta (once per process)."""
    import time

    start = time.perf_counter()
    import torch

    from optimizedSD.model.config import SDConfig
    from optimizedSD.engine.pipeline import weight_dtype
    from optimizedSD.engine.planner import _meta_fragments

    _meta_fragments(SDConfig.from_yaml(config) if config else SDConfig(), weight_dtype(torch.device("meta"), precision))
    return time.perf_counter() - start


def plan_seconds(run) -> float:
    """Seconds to plan `run` on meta as `--device meta` does (the engine: `choose_plan`, with the
    --vram search if any, then `predict` once per batch size of the run)."""
    import time

    from optimizedSD.fronts.cli import check_flags, requests_of
    from optimizedSD.engine.engine import Engine
    from optimizedSD.engine.spec import resolve_model

    check_flags(run)
    spec = resolve_model(None, run.config, demo=run.demo, device="meta", precision=run.precision, fp8=run.fp8)
    request = requests_of(run, spec, lambda *a: None)[0]
    start = time.perf_counter()
    list(Engine(spec).render(request))
    return time.perf_counter() - start


def explain_peaks(args) -> int:
    """`--explain-peak`: each configuration's plan (`choose_plan`, as a run makes it) at each size, then
    what is live on the device at each phase's planned peak (`planner.explain_peak`: the same run on
    meta with nothing replayed, every storage named), as a Markdown table per configuration."""
    import torch

    from optimizedSD.engine.planner import GiB, choose_plan, explain_peak, parse_size
    from optimizedSD.engine.pipeline import weight_dtype
    from optimizedSD.engine.spec import check_fp8
    from optimizedSD.model.config import SDConfig

    check_fp8(args.fp8)
    cfg = SDConfig.from_yaml(args.config) if args.config else SDConfig()
    dtype = weight_dtype(torch.device("meta"), args.precision)
    rows = []
    for size in args.sizes:
        for name in args.configs:
            config_flags(name)  # a bad name: one line
            vram = parse_size(name[len("vram="):]) if name.startswith("vram=") else None
            plan = choose_plan(cfg, dtype, turbo=name == "turbo", lowvram=name == "lowvram", vram=vram, unet_bs=1,
                               height=size, width=size, n_samples=args.n_samples, guided=True,
                               precision=args.precision, fp8=args.fp8)
            batch = plan.batch or args.n_samples
            phases = explain_peak(cfg, dtype, plan, size, size, batch, precision=args.precision, fp8=args.fp8)
            top = max(phases, key=lambda ph: phases[ph][0])
            rows.append(dict(config=name, size=size, images=batch, fp8=args.fp8, peak_phase=top,
                             peaks={ph: peak for ph, (peak, _) in phases.items()},
                             live={ph: [dict(bytes=b, count=n, what=w) for b, n, w in live[:args.rows]]
                                   for ph, (_, live) in phases.items()}))
            if args.json:
                continue
            figures = ", ".join(f"{ph} {peak / GiB:.3f}" for ph, (peak, _) in phases.items())
            print(f"\n{name}, {size}², {batch} image(s) at once, {args.precision}{', fp8 ' + args.fp8 if args.fp8 else ''}: "
                  f"planned peak {phases[top][0] / GiB:.3f} GiB in {top} ({figures} GiB)\n")
            print("| phase | MiB | tensors | what (weights of a unit, or: module, op, shape, dtype) |\n|---|---|---|---|")
            for ph, (peak, live) in phases.items():
                for b, n, w in live[:args.rows]:
                    print(f"| {ph}{' (peak)' if ph == top else ''} | {b / 2**20:.1f} | {n} | {w} |")
                rest = sum(b for b, _, _ in live[args.rows:])
                print(f"| {ph} | {rest / 2**20:.1f} | {sum(n for _, n, _ in live[args.rows:])} | the rest |")
    if args.json:
        print(json.dumps(rows))
    return 0


def bench_load(ckpt: str, config: str | None, as_json: bool) -> int:
    """Host RAM of loading a checkpoint into the fp16 fragments a CUDA autocast run keeps on the host.

    The baseline is this process's peak resident set before the load (Python, torch and this
    package imported); the peak is after it. Both are ru_maxrss, so file pages mapped while reading
    count too."""
    import time

    import torch

    from optimizedSD.model.checkpoint import load_fragments
    from optimizedSD.model.config import SDConfig

    cfg = SDConfig.from_yaml(config) if config else SDConfig()
    baseline = host_ram_peak()
    start = time.perf_counter()
    fragments = load_fragments(ckpt, cfg, dtype=torch.float16)
    seconds = time.perf_counter() - start
    peak = host_ram_peak()
    weights = sum(t.numel() * t.element_size() for m in fragments.values() for t in m.state_dict().values())
    row = dict(checkpoint=ckpt, seconds=round(seconds, 2), baseline_bytes=baseline, peak_bytes=peak,
               fp16_weights_bytes=weights, peak_over_baseline_per_weights=round((peak - baseline) / weights, 3))
    if as_json:
        print(json.dumps(row))
    else:
        print(f"loaded {ckpt} into fp16 fragments in {seconds:.1f} s: host RAM peak {peak / 2**30:.2f} GiB = "
              f"torch baseline {baseline / 2**30:.2f} GiB + {(peak - baseline) / 2**30:.2f} GiB, "
              f"{row['peak_over_baseline_per_weights']:.3f}x the fp16 weights ({weights / 2**30:.2f} GiB)")
    return 0


def bench_lora(path: str, config: str | None, as_json: bool) -> int:
    """Wall and CPU seconds of reading a LoRA, patching the host masters of fp16 fragments (what a CUDA
    autocast run keeps on the host) and undoing it, with the bytes of the layers it touched (the host
    RAM the patch holds as originals). CPU seconds add up over threads."""
    import time

    import torch

    from optimizedSD.model.checkpoint import empty_fragments
    from optimizedSD.model.config import SDConfig
    from optimizedSD.custom.lora import apply_loras, read_lora

    cfg = SDConfig.from_yaml(config) if config else SDConfig()
    fragments = empty_fragments(cfg, dtype=torch.float16)
    for module in fragments.values():  # touch every page once, as a loaded checkpoint would have
        for t in module.parameters():
            t.detach().zero_()
    times = []
    clock = lambda: (time.perf_counter(), time.process_time())  # noqa: E731
    start = clock()
    lora = read_lora(path, cfg)
    times.append(clock())
    patch = apply_loras(fragments, [(lora, 1.0)])
    times.append(clock())
    held = sum(original.numel() * original.element_size() for _, original in patch._originals)
    patch.undo()
    times.append(clock())
    (r_wall, r_cpu), (p_wall, p_cpu), (u_wall, u_cpu) = [(b[0] - a[0], b[1] - a[1]) for a, b in
                                                         zip([start] + times[:-1], times)]
    row = dict(lora=path, layers=len(lora.layers), patched_bytes=held, read_seconds=round(r_wall, 2),
               patch_seconds=round(p_wall, 2), undo_seconds=round(u_wall, 2), read_cpu_seconds=round(r_cpu, 2),
               patch_cpu_seconds=round(p_cpu, 2), undo_cpu_seconds=round(u_cpu, 2))
    if as_json:
        print(json.dumps(row))
    else:
        print(f"{path}: {len(lora.layers)} layers, {held / 2**20:.0f} MiB of fp16 weights patched (held as originals); "
              f"read {r_wall:.2f} s, patch {p_wall:.2f} s ({p_cpu:.2f} s CPU), undo {u_wall:.2f} s ({u_cpu:.2f} s CPU)")
    return 0


def format_row(row: dict, first: bool) -> str:
    gib = lambda n: f"{n / 2**30:.2f}" if n is not None else "-"  # noqa: E731
    head = ("| config | size | n | s/image | s/step | text GiB | sample GiB | decode GiB | H2D GiB/step | images at once "
            "| unet_bs | resident blocks | tiled | plan s | host RAM GiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    if "error" in row:
        line = f"| {row['config']} | {row['size']} | {row['error']} |"
    else:
        peaks = row["peak_bytes"]
        line = (f"| {row['config']} | {row['size']}² | {row['images']} | {row['seconds_per_image']:.2f} | "
                f"{row['seconds_per_step']:.3f} | {gib(peaks.get('text'))} | {gib(peaks.get('sample'))} | "
                f"{gib(peaks.get('decode'))} | {gib(row['host_to_device_bytes_per_step'])} | {row['images_at_once']} | "
                f"{row['unet_bs']} | {row['resident_blocks'] if row['mode'] == 'stream' else row['mode']} | "
                f"{'yes' if row['tiled_vae'] else 'no'} | {row['plan_seconds']:.2f} | {gib(row['host_ram_peak_bytes'])} |")
    return (head if first else "") + line


if __name__ == "__main__":
    sys.exit(main())
