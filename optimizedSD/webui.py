"""Browser UI for txt2img, img2img and inpainting: one engine, loaded once, shared by every page.

Run from the repo root:
    python optimizedSD/webui.py --demo            # then open http://127.0.0.1:7860
    python optimizedSD/webui.py --ckpt weights/sd-v1-4.ckpt --lowvram
`--help` lists every flag. The page is `ui.py`; this file reads the flags, loads the checkpoint once
and serves the page on 127.0.0.1 (`--host` to listen elsewhere, with `--auth`). Nothing is fetched
from the internet: no share link, gradio's analytics and version check off.
"""
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import this folder as the package `optimizedSD` (see optimized_txt2img.py)
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
# gradio reads these when imported and when launching: no usage analytics, no version check, no telemetry.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from optimizedSD.fronts.cli import (KINDS, Parser, UsageError, add_custom_flags, add_watermark_flag, custom_args,  # noqa: E402
                                    memory_mode)
from optimizedSD.outputs.images import OutputError, check_outdir  # noqa: E402
from optimizedSD.engine.spec import COMPVIS_CKPT, DEMO_CKPT, resolve_model  # noqa: E402
from optimizedSD.engine.request import check_memory  # noqa: E402
from optimizedSD.fronts.api import add_flags as add_api_flags, ckpt_dir_of, first_checkpoint, parse_credentials  # noqa: E402
from optimizedSD.fronts.api import prepare as prepare_api, serve_args as serve_api  # noqa: E402

DEFAULT_PORT = 7860


def build_parser() -> Parser:
    p = Parser(prog="webui.py", description="Browser UI for Stable Diffusion v1 on little VRAM: txt2img, img2img, "
               "inpainting and PNG info; one engine, loaded once, renders every page's requests in turn.")
    a = p.add_argument
    a("--ckpt", type=str, default=None,
      help=f"checkpoint (.ckpt or .safetensors); default: {COMPVIS_CKPT} if present, else the one file in weights/")
    a("--config", type=str, default=None, help="CompVis-style model YAML; default: SD v1's built-in config")
    a("--demo", action="store_true", help=f"use the bundled demo model ({DEMO_CKPT}): 64x64 coloured shapes, "
      "seconds per image on a CPU")
    a("--device", type=str, default=None, help="cuda, cuda:N, mps or cpu (default: cuda if available, else mps, else cpu)")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--lowvram", action="store_true", help="default Memory mode: lowvram (the least device memory)")
    modes.add_argument("--turbo", action="store_true", help="default Memory mode: turbo (faster, more device memory)")
    modes.add_argument("--vram", type=str, default=None, metavar="SIZE",
                       help="default Memory mode: a device-memory budget such as 2G or 1536M")
    add_custom_flags(a, lora_files=False)
    a("--controlnet_dir", "--controlnet-dir", dest="controlnet_dir", action="append", default=[], metavar="DIR",
      help="a folder of ControlNet files: the ControlNet panel's Model list and the API's models (repeatable; "
           "models/ControlNet is always looked in; --controlnet-dir is the webui extension's spelling)")
    a("--taesd", type=str, default=None, metavar="PATH",
      help="live previews with this TAESD decoder (taesd_decoder.safetensors/.pth); default: a latent approximation")
    a("--outdir", type=str, default=None,
      help="images go to OUTDIR/<prompt>/seed_<seed>_<NNNNN>.png as the CLI writes them (default: the CLI's "
           "folder per kind: " + ", ".join(KINDS[k][2] for k in KINDS) + ")")
    a("--host", type=str, default="127.0.0.1",
      help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network, use --auth)")
    a("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    a("--auth", type=str, default=None, metavar="USER:PASS", help="ask for this user name and password (gradio's login)")
    add_watermark_flag(a, server=True)
    add_api_flags(a)  # --api, --nowebui, --listen, --ckpt_dir, --api-auth, --gradio-auth, ... (fronts/api.py)
    return p


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not (sep and user and password):
        raise UsageError("--auth takes USER:PASS, both non-empty")
    return user, password


def cannot_listen(host: str, port: int) -> str:
    return f"cannot listen on {host}:{port} (in use, or not an address of this machine); choose another --port or --host"


def check_port(host: str, port: int) -> None:
    import socket

    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(info[0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(info[4])
    except OSError:
        raise UsageError(cannot_listen(host, port)) from None


def serve(args) -> None:
    from optimizedSD.engine.engine import Engine
    from optimizedSD.fronts.ui import Studio, build

    if args.listen:
        args.host = "0.0.0.0"
    auth = parse_auth(args.auth)
    auth = ([auth] if auth else []) + parse_credentials(args.gradio_auth, "--gradio-auth") or None
    api_settings = prepare_api(args) if args.api or args.nowebui else None
    if args.host not in ("127.0.0.1", "localhost", "::1") and auth is None and not args.nowebui:
        print(f"note: listening on {args.host} without --auth: anyone who can reach port {args.port} can use "
              "this server and its device", file=sys.stderr, flush=True)
    if args.vram is not None:
        check_memory(args.vram, "--vram")
    check_port(args.host, args.port)  # before the checkpoint is read, which can take a minute
    outdirs = {kind: args.outdir or KINDS[kind][2] for kind in KINDS}
    for outdir in set(outdirs.values()):
        check_outdir(outdir)
    for folder in args.controlnet_dir:
        if not Path(folder).is_dir():
            raise UsageError(f"ControlNet folder not found: {folder}; pass an existing folder with --controlnet_dir")
    ckpt = args.ckpt or (None if args.demo else first_checkpoint(ckpt_dir_of(args.ckpt_dir)))
    spec = resolve_model(ckpt, args.config, demo=args.demo, device=args.device, **custom_args(args))
    if spec.planning:
        raise UsageError("--device meta plans without drawing; the web UI needs cuda, mps or cpu")
    engine = Engine(spec, notify=lambda message: print(message, file=sys.stderr, flush=True), taesd=args.taesd)
    print(f"loading {spec.ckpt} on {spec.device} ...", flush=True)
    engine.load()
    studio = Studio(engine, outdirs, memory_mode(args), controlnet_dirs=args.controlnet_dir, watermark=args.watermark)
    if api_settings is not None:  # one server: the API (and the UI), one engine, one queue
        return serve_api(args, studio, None if args.nowebui else build(studio), api_settings, gradio_auth=auth,
                         model_args=dict(config=args.config, device=args.device, **custom_args(args)))
    page = build(studio)
    page.queue()
    try:  # the port may have been taken since check_port
        page.launch(server_name=args.host, server_port=args.port, auth=auth, share=False, ssr_mode=False,
                    mcp_server=False, pwa=False, enable_monitoring=False, show_error=False, footer_links=[],
                    quiet=True, prevent_thread_lock=True)
    except OSError:
        raise UsageError(cannot_listen(args.host, args.port)) from None
    print(f"serving on {page.local_url}{' (login required)' if auth else ''}; Ctrl-C stops", flush=True)
    page.block_thread()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        serve(args)
    except (UsageError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
