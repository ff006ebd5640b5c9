"""Train the demo model: a tiny SD v1 (same code, smaller widths) on `demo_data`'s synthetic scenes.

    python -m optimizedSD.tools.train_demo            # writes weights/demo.safetensors and configs/demo.yaml

Seeded and CPU-only. Two stages, as latent diffusion is trained:
1. the KL autoencoder (f=8) on 64x64 scenes: MSE + L1 reconstruction plus a 1e-6-weighted KL term;
   the latent scale is then set to 1 / std of the encoded training set (SD v1's 0.18215 was found so);
2. the UNet and the CLIP text transformer together, from scratch, on those latents: the DDPM
   eps-prediction loss with SD v1's schedule, the caption dropped (empty prompt) 10% of the time so
   classifier-free guidance works, and an EMA of the weights, which is what is saved.
   Half of each batch is drawn at t >= 850 and scored by its x0 error instead (weight 0.1). Below
   t ~ 700 the layout is visible in x_t, so only the noisiest steps need the caption's position; the
   eps loss weighs the x0 error there by a/(1-a) < 0.03, and a model trained on it alone ignores
   the position words. The x0 term makes them pay (the prediction is still eps).
The weights are written in the original checkpoint layout (fp16 safetensors), so the ordinary
loader reads them; the config as a CompVis-style YAML.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: import this folder as the package `optimizedSD`
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import numpy as np
import torch
import torch.nn.functional as F

from optimizedSD.model.config import SDConfig, TextConfig, UNetConfig, VAEConfig
from optimizedSD.tools.demo_data import all_scenes, render
from optimizedSD.model.fragments import TEXT_ENCODER, UNET_IN, UNET_OUT, VAE, build_fragments, checkpoint_key
from optimizedSD.sampling.samplers import Schedule
from optimizedSD.model.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[2]  # the checkout
DEMO_CONFIG = SDConfig(
    unet=UNetConfig(model_channels=64, attention_resolutions=(1, 2, 4), num_res_blocks=1, channel_mult=(1, 1, 2),
                    num_heads=4, context_dim=64),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
    text=TextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
)
HEADER = ("# The demo model's config, written by optimizedSD/tools/train_demo.py (same architecture family as SD v1,\n"
          "# smaller widths and depths). Use with weights/demo.safetensors, or simply --demo.\n")


def dataset(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n jittered scenes, (n, 3, 64, 64) in [-1, 1], and their captions."""
    rng = random.Random(seed)
    scenes = all_scenes()
    picked = [rng.choice(scenes) for _ in range(n)]
    pixels = np.stack([np.asarray(render(s, rng)) for s in picked])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1, [s.caption for s in picked]


def warmup_cosine(opt, steps: int):
    """Linear warm-up over the first 5% of the steps, then cosine decay to 0."""
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def train_vae(vae, images, steps: int, batch: int, log) -> None:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,))]
        mean, logvar = vae.encode(x)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        recon = vae.decode(z)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}, kl {kl.item():.1f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, images, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for x in images.split(batch):
        mean, logvar = vae.encode(x)
        means.append(mean)
        stds.append((0.5 * logvar).exp())
    return torch.cat(means), torch.cat(stds)


HIGH_T = 850  # the noisiest steps, where only the caption tells where the shape goes
X0_WEIGHT = 0.1  # of the x0 loss on the half of each batch drawn at t >= HIGH_T


def train_diffusion(frags, means, stds, tokens, steps: int, batch: int, scale: float, log) -> dict:
    """Returns the EMA weights of the UNet halves and the text encoder, by fragment."""
    names = (TEXT_ENCODER, UNET_IN, UNET_OUT)
    params = [p for n in names for p in frags[n].parameters()]
    for n in names:
        frags[n].train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = warmup_cosine(opt, steps)
    ema = {n: {k: v.detach().clone() for k, v in frags[n].state_dict().items()} for n in names}
    alphas = Schedule().alphas_cumprod.float()
    empty = tokens[-1]  # the last row is the empty prompt
    for step in range(steps):
        i = torch.randint(len(means), (batch,))
        z = (means[i] + stds[i] * torch.randn_like(means[i])) * scale
        half = batch // 2
        t = torch.cat([torch.randint(0, len(alphas), (half,)), torch.randint(HIGH_T, len(alphas), (batch - half,))])
        a = alphas[t].reshape(-1, 1, 1, 1)
        noise = torch.randn_like(z)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        rows = tokens[i]
        drop = torch.rand(batch) < 0.1
        rows[drop] = empty
        context = frags[TEXT_ENCODER](rows)
        eps = frags[UNET_OUT](*frags[UNET_IN](x_t, t.float(), context), context)
        x0 = (x_t[half:] - (1 - a[half:]).sqrt() * eps[half:]) / a[half:].sqrt()
        loss = F.mse_loss(eps[:half], noise[:half]) + X0_WEIGHT * F.mse_loss(x0, z[half:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for n in names:
                for k, v in frags[n].state_dict().items():
                    if v.is_floating_point():
                        ema[n][k].lerp_(v, 1 - decay)
        if step % 250 == 0 or step == steps - 1:
            log(f"diffusion step {step}: loss {loss.item():.4f}")
    return ema


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train_demo.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "weights" / "demo.safetensors"), help="weights file to write")
    p.add_argument("--config-out", default=str(ROOT / "configs" / "demo.yaml"), help="config file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=12000, help="training scenes (jittered)")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=6000, help="UNet + text encoder steps")
    p.add_argument("--batch", type=int, default=32, help="UNet + text encoder batch (the VAE takes 16)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the runtime in the README is for 2)")
    args = p.parse_args(argv)

    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = DEMO_CONFIG
    images, captions = dataset(args.images, args.seed)
    log(f"{len(images)} scenes rendered")
    frags = build_fragments(cfg)
    train_vae(frags[VAE], images, args.vae_steps, 16, log)
    means, stds = encode_all(frags[VAE], images)
    scale = float(1 / (means + stds * torch.randn_like(means)).std())
    log(f"latent scale {scale:.5f}")
    cfg = SDConfig(unet=cfg.unet, vae=cfg.vae, text=cfg.text, scale_factor=round(scale, 5))

    texts = sorted(set(captions)) + [""]
    table = get_tokenizer()(texts)
    index = {text: j for j, text in enumerate(texts)}
    tokens = torch.cat([table[[index[c] for c in captions]], table[-1:]])  # rows per scene, then ""
    ema = train_diffusion(frags, means, stds, tokens, args.steps, args.batch, cfg.scale_factor, log)

    state = {checkpoint_key(VAE, k): v for k, v in frags[VAE].state_dict().items()}
    for name, weights in ema.items():
        state.update({checkpoint_key(name, k): v for k, v in weights.items()})
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    from safetensors.torch import save_file

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, args.out)
    cfg.save_yaml(args.config_out, HEADER)
    size = Path(args.out).stat().st_size
    log(f"wrote {args.out} ({size / 2 ** 20:.1f} MiB, {sum(v.numel() for v in state.values()):,} values) "
        f"and {args.config_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
