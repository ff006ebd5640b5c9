"""This tool's CPU runs against the CPU peers, stable-diffusion.cpp and OpenVINO, on the same weights
(`python optimizedSD/bench.py --vs-sdcpp --vs-openvino --ckpt CKPT --json`).

CKPT: an SD v1 checkpoint in the original layout, the text encoder under
`cond_stage_model.transformer.text_model.*` as real v1 files hold it (stable-diffusion.cpp does not
recognise the model otherwise); `--random-ckpt PATH` writes a full-size one with random weights
(fp16 safetensors, 2.1 GB) first. Every tool renders the same prompt at the same size, steps, sampler
(euler), guidance and seed; per tool and precision:
- one image per process: whole-process wall seconds (start to exit: imports, load, text, sampling,
  decode, PNG) and peak resident set, from the kernel's accounting of that child (`os.wait4`);
- a warm process: the seconds of each further image after the first (`--images` in all), as the UI,
  the API or a prompt file render them.

Tools and precisions (`PEERS`):
- ours: `--precision full` (fp32) and `bf16`, and `bf16` with `--fp8` (fp8 storage);
- stable-diffusion.cpp through `stable-diffusion-cpp-python` (PyPI; it compiles the C++ with cmake
  when installed, a benchmark-only dependency never required at run time): wtype f32, f16, q8_0;
- OpenVINO through `optimum-intel`, which brings its own torch: installed in a separate virtual
  environment (`--openvino-python`, default /tmp/ov-venv/bin/python; never in this one). The
  diffusers-layout copy of CKPT is written once (diffusers' own converters, `tests/reference.py`)
  and exported to OpenVINO IR once (not timed); timed runs load the IR: its default precision (bf16
  on AMX CPUs) and `INFERENCE_PRECISION_HINT=f32`.
A peer that is not installed is skipped with one line saying so and how to install it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench_vs_diffusers import ROOT, BenchError, run_child

PROMPT = "a photograph of an astronaut riding a horse"
SEED, SCALE = 0, 7.5
OPENVINO_PYTHON = "/tmp/ov-venv/bin/python"
# tool -> its precision classes ("f32" compares with "f32"; the others with each other)
PEERS = {"ours": ("full", "bf16", "bf16+fp8"), "sdcpp": ("f32", "f16", "q8_0"), "openvino": ("default", "f32")}


# ---- the checkpoint -------------------------------------------------------------------------------
def write_random_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """A full-size SD v1 checkpoint with random weights in the original layout (fp16 safetensors):
    the fragments' default initialisation, keys as real v1 files name them, CLIP under
    `cond_stage_model.transformer.text_model.` with its position ids."""
    import torch
    from safetensors.torch import save_file

    from ..model.config import SDConfig
    from ..model.fragments import build_fragments, checkpoint_key

    torch.manual_seed(seed)
    cfg = SDConfig()
    state = {checkpoint_key(name, k): v.detach().half().contiguous()
             for name, m in build_fragments(cfg).items() for k, v in m.state_dict().items()}
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in state)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(cfg.text.max_position_embeddings)[None]
    save_file(state, str(path))
    return Path(path)


# ---- what is installed ------------------------------------------------------------------------------
def missing(tool: str, openvino_python: str = OPENVINO_PYTHON) -> str | None:
    """Why `tool` cannot run here (one line), or None."""
    if tool == "sdcpp" and importlib.util.find_spec("stable_diffusion_cpp") is None:
        return ("stable-diffusion.cpp: skipped, stable-diffusion-cpp-python is not installed "
                "(pip install stable-diffusion-cpp-python; it compiles with cmake, several minutes)")
    if tool == "openvino":
        if not Path(openvino_python).is_file():
            return (f"OpenVINO: skipped, no Python at {openvino_python} (python -m venv /tmp/ov-venv && "
                    "/tmp/ov-venv/bin/pip install 'optimum-intel[openvino]' diffusers; it brings its own torch)")
        # the pipeline class itself: optimum.intel imports lazily, and a torchvision built for another torch
        # (pulled in beside the CPU torch file) breaks it only there ("operator torchvision::nms does not exist")
        probe = subprocess.run([openvino_python, "-c", "import openvino; from optimum.intel import OVStableDiffusionPipeline"],
                               capture_output=True)
        if probe.returncode:
            return (f"OpenVINO: skipped, {openvino_python} cannot import optimum.intel's OVStableDiffusionPipeline "
                    f"({openvino_python} -m pip install 'optimum-intel[openvino]' diffusers; if torchvision is there "
                    f"and does not match its torch: {openvino_python} -m pip uninstall -y torchvision)")
    return None


# ---- the children (each a process of its own) ---------------------------------------------------------
def ours_engine(ckpt: str, precision: str, config: str | None = None):
    """Our engine on the CPU, loaded: `precision` full, bf16 or bf16+fp8 (fp8 storage of the UNet)."""
    from ..engine.engine import Engine
    from ..engine.spec import resolve_model

    precision, _, fp8 = precision.partition("+")
    return Engine(resolve_model(ckpt, config, device="cpu", precision=precision, fp8="unet" if fp8 else None)).load()


def ours_image_seconds(engine, size: int, steps: int, image: int = 0) -> float:
    """The seconds our loaded `engine` takes to render the benchmark's request (PROMPT, seed SEED + `image`,
    euler, SCALE) at `size`² in `steps` steps."""
    from ..engine.request import Request

    request = engine.complete(Request(PROMPT, seed=SEED + image, n_samples=1, sampler="euler", steps=steps,
                                      scale=SCALE, width=size, height=size))
    start = time.perf_counter()
    for _ in engine.render(request):
        pass
    return time.perf_counter() - start


def ours_warm(ckpt: str, precision: str, size: int, steps: int, images: int, config: str | None = None) -> None:
    """(child) Our engine loaded once, `images` images one after another; prints each one's seconds."""
    engine = ours_engine(ckpt, precision, config)
    print(json.dumps({"image_seconds": [ours_image_seconds(engine, size, steps, i) for i in range(images)]}))


def sdcpp_run(ckpt: str, wtype: str, size: int, steps: int, images: int, out: str) -> None:
    """(child) stable-diffusion.cpp: the model loaded once (weights converted to `wtype`), `images`
    images; prints each one's seconds and writes the first to `out`."""
    from stable_diffusion_cpp import StableDiffusion

    sd = StableDiffusion(model_path=ckpt, wtype=wtype, n_threads=os.cpu_count(), verbose=False)
    generate = getattr(sd, "generate_image", None) or sd.txt_to_img  # newer and older bindings
    seconds = []
    for i in range(images):
        start = time.perf_counter()
        result = generate(prompt=PROMPT, width=size, height=size, sample_steps=steps, cfg_scale=SCALE,
                          seed=SEED + i, sample_method="euler")
        seconds.append(time.perf_counter() - start)
        if i == 0:
            result[0].save(out)
    print(json.dumps({"image_seconds": seconds}))


OPENVINO_CHILD = """
import json, sys, time
from optimum.intel import OVStableDiffusionPipeline
from diffusers import EulerDiscreteScheduler
folder, precision, size, steps, images, out = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6]
config = {{"INFERENCE_PRECISION_HINT": "f32"}} if precision == "f32" else {{}}
pipe = OVStableDiffusionPipeline.from_pretrained(folder, ov_config=config, compile=True)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
seconds = []
for i in range(images):
    import torch
    start = time.perf_counter()
    image = pipe({prompt!r}, height=size, width=size, num_inference_steps=steps, guidance_scale={scale},
                 generator=torch.Generator().manual_seed({seed} + i)).images[0]
    seconds.append(time.perf_counter() - start)
    if i == 0:
        image.save(out)
print(json.dumps({{"image_seconds": seconds}}))
""".format(prompt=PROMPT, scale=SCALE, seed=SEED)

OPENVINO_EXPORT = """
import sys
from optimum.intel import OVStableDiffusionPipeline
OVStableDiffusionPipeline.from_pretrained(sys.argv[1], export=True, compile=False).save_pretrained(sys.argv[2])
"""


def openvino_ir(ckpt: str, work: Path, openvino_python: str, log=print) -> Path:
    """OpenVINO IR of `ckpt` in `work` (not timed): diffusers' folder of it, exported by optimum-intel."""
    from .bench_vs_diffusers import _child

    folder, ov_folder = work / "diffusers", work / "openvino"
    log("converting the checkpoint into a diffusers folder and OpenVINO IR (not timed) ...")
    run_child(_child(f"write_diffusers_folder({ckpt!r}, None, {str(folder)!r})"), work / "convert.log")
    run_child([openvino_python, "-c", OPENVINO_EXPORT, str(folder), str(ov_folder)], work / "export.log")
    return ov_folder


def _python(call: str) -> list[str]:
    return [sys.executable, "-c", f"from optimizedSD.tools.bench_peers import *; {call}"]


def _ours_one(ckpt: str, precision: str, size: int, steps: int, outdir: str, config: str | None) -> list[str]:
    base, _, fp8 = precision.partition("+")
    return [sys.executable, str(ROOT / "optimizedSD" / "optimized_txt2img.py"), "--device", "cpu", "--ckpt", ckpt,
            "--prompt", PROMPT, "--seed", str(SEED), "--scale", str(SCALE), "--sampler", "euler", "--ddim_steps",
            str(steps), "--H", str(size), "--W", str(size), "--n_samples", "1", "--skip_grid", "--precision", base,
            "--outdir", outdir, *(["--fp8"] if fp8 else []), *(["--config", config] if config else [])]


def last_json(log: Path) -> dict:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"no figures in {log}")
    return json.loads(lines[-1])


def _warm(seconds: list[float]) -> float | None:
    later = seconds[1:]
    return round(sum(later) / len(later), 2) if later else None


# ---- the comparison ---------------------------------------------------------------------------------
def compare(ckpt: str, tools: list[str], size: int = 512, steps: int = 4, images: int = 3,
            openvino_python: str = OPENVINO_PYTHON, log=print, config: str | None = None, only=None) -> dict:
    """{"rows": one per tool and precision, "skipped": [one line per peer not installed]}. `config`:
    ours only (a non-v1 test model; the peers take SD v1 alone). `only`: (tool, precision) pairs to
    measure, the others left out (default: all of `PEERS`)."""
    if not Path(ckpt).is_file():
        raise BenchError(f"checkpoint not found: {ckpt}")
    ckpt = str(Path(ckpt).resolve())
    rows, skipped = [], []
    if only:
        tools = [t for t in tools if any(o[0] == t for o in only)]
    for tool in tools:
        why = missing(tool, openvino_python)
        if why:
            log(why)
            skipped.append(why)
    runnable = [t for t in tools if not any(s.startswith({"sdcpp": "stable-diffusion.cpp", "openvino": "OpenVINO"}
                                                          .get(t, "-")) for s in skipped)]
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as work:
        work = Path(work)
        ov_folder = None
        if "openvino" in runnable:
            ov_folder = openvino_ir(ckpt, work, openvino_python, log)
        for tool in runnable:
            for precision in PEERS[tool]:
                if only and (tool, precision) not in only:
                    continue
                tag = f"{tool}-{precision}"
                if tool == "ours":
                    one = _ours_one(ckpt, precision, size, steps, str(work / tag), config)
                    warm = _python(f"ours_warm({ckpt!r}, {precision!r}, {size}, {steps}, {images}, {config!r})")
                elif tool == "sdcpp":
                    png = str(work / f"{tag}.png")
                    one = _python(f"sdcpp_run({ckpt!r}, {precision!r}, {size}, {steps}, 1, {png!r})")
                    warm = _python(f"sdcpp_run({ckpt!r}, {precision!r}, {size}, {steps}, {images}, {png!r})")
                else:
                    args = [str(ov_folder), precision, str(size), str(steps)]
                    one = [openvino_python, "-c", OPENVINO_CHILD, *args, "1", str(work / f"{tag}.png")]
                    warm = [openvino_python, "-c", OPENVINO_CHILD, *args, str(images), str(work / f"{tag}.png")]
                single = run_child(one, work / f"{tag}-one.log")
                run_child(warm, work / f"{tag}-warm.log")
                seconds = last_json(work / f"{tag}-warm.log")["image_seconds"]
                rows.append(dict(tool=tool, precision=precision, size=size, steps=steps, sampler="euler",
                                 one_image_wall_s=single["wall_s"], one_image_peak_rss_bytes=single["peak_rss_bytes"],
                                 warm_first_image_s=round(seconds[0], 2), warm_seconds_per_image=_warm(seconds)))
                log(format_row(rows[-1]))
    return dict(rows=rows, skipped=skipped)


def format_row(row: dict) -> str:
    warm = row["warm_seconds_per_image"]
    return (f"{row['tool']:>9} {row['precision']:>9}: one image {row['one_image_wall_s']:7.1f} s whole process, "
            f"RSS {row['one_image_peak_rss_bytes'] / 2 ** 30:5.2f} GiB; warm {warm if warm is not None else '-'} s/image")


def main(ckpt: str | None, tools: list[str], size: int, steps: int, images: int, openvino_python: str,
         random_ckpt: str | None, as_json: bool, config: str | None = None, only=None) -> int:
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if as_json else print
    try:
        if random_ckpt:  # in a child: a parent grown by it would lend its peak RSS to every later child
            log(f"writing a full-size random checkpoint to {random_ckpt} ...")  # (Linux keeps ru_maxrss over fork)
            with tempfile.TemporaryDirectory(prefix="bench-peers-") as work:
                run_child(_python(f"write_random_checkpoint({random_ckpt!r})"), Path(work) / "write.log")
            ckpt = random_ckpt
        if not ckpt:
            raise BenchError("--vs-sdcpp/--vs-openvino need --ckpt CKPT (original layout) or --random-ckpt PATH")
        if config:
            config = str(Path(config).resolve())
        result = compare(ckpt, ["ours", *tools], size, steps, images, openvino_python, log, config, only)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(result))
    return 0
