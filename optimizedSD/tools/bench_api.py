"""Load on the HTTP API: N clients at once, each sending M txt2img requests, on the demo model.

    python -m optimizedSD.tools.bench_api                    # 8 clients x 4 requests, CPU, 64x64, 20 steps
    python -m optimizedSD.tools.bench_api --clients 4 --requests 2 --steps 10 --device cuda

Starts `webui.py --demo --nowebui` in a subprocess, sends the requests with the published `webuiapi`
client (every client its own thread and connection), then replays every request alone, one after
another, and checks each concurrent image equals its replay pixel for pixel (no request lost or mixed
up). Prints requests/minute under load and alone, and the server's peak RSS (VmHWM from /proc), as one
JSON object.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..model.paths import ROOT

PROMPT = "a red circle on a blue background, top left"


def peak_rss(pid: int) -> int | None:
    """The process's peak resident set size in bytes (Linux VmHWM), or None where /proc has none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main(argv=None) -> int:
    import requests
    import webuiapi

    p = argparse.ArgumentParser(prog="python -m optimizedSD.tools.bench_api", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--sampler", default="Euler a", help="a webui sampler label")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "optimizedSD" / "webui.py"), "--demo", "--nowebui",
                               "--device", args.device, "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/sdapi/v1/progress", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {server.stderr.read() if server.poll() is not None else ''}")
            time.sleep(0.5)
        settings = dict(prompt=PROMPT, sampler_name=args.sampler, steps=args.steps, cfg_scale=3,
                        width=args.size, height=args.size)
        seeds = {(c, k): 1000 + c * args.requests + k for c in range(args.clients) for k in range(args.requests)}
        images, errors = {}, []

        def client(c):
            api = webuiapi.WebUIApi(port=port)
            for k in range(args.requests):
                try:
                    images[c, k] = np.asarray(api.txt2img(seed=seeds[c, k], **settings).image.convert("RGB"))
                except Exception as e:  # noqa: BLE001 - counted as lost
                    errors.append(f"client {c} request {k}: {e}")
        rss_before = peak_rss(server.pid)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        loaded = time.perf_counter() - t0
        rss_peak = peak_rss(server.pid)
        api = webuiapi.WebUIApi(port=port)
        t0 = time.perf_counter()
        mismatched = [key for key, seed in seeds.items() if key in images and not np.array_equal(
            images[key], np.asarray(api.txt2img(seed=seed, **settings).image.convert("RGB")))]
        alone = time.perf_counter() - t0
        n = len(seeds)
        figures = dict(clients=args.clients, requests_per_client=args.requests, requests=n, answered=len(images),
                       lost=n - len(images), errors=errors[:3], equal_to_replay=len(images) - len(mismatched),
                       mismatched=len(mismatched), device=args.device, size=f"{args.size}x{args.size}",
                       steps=args.steps, sampler=args.sampler, seconds_under_load=round(loaded, 2),
                       requests_per_minute=round(n / loaded * 60, 1),
                       requests_per_minute_sequential=round(n / alone * 60, 1),
                       server_peak_rss_mib=round(rss_peak / 2 ** 20) if rss_peak else None,
                       server_peak_rss_mib_at_start=round(rss_before / 2 ** 20) if rss_before else None)
        print(json.dumps(figures))
        return 0 if not errors and not mismatched and len(images) == n else 1
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
