"""Independent reference implementations for the tests: diffusers and transformers models built from
our original-layout checkpoints by diffusers' own single-file converters, and a diffusers
StableDiffusionPipeline around them. Test-only; nothing here touches the network.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing below may touch the network
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from transformers import CLIPTextConfig, CLIPTextModel

from optimizedSD.model.config import SDConfig
from optimizedSD.model.fragments import build_fragments, checkpoint_key


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter a distinct random value.

    Default inits leave all norm weights at 1 and biases at 0, which would let a swapped
    norm1/norm2 or a dropped bias go unnoticed; embeddings from transformers' init are tiny.
    Matrices get std fan_in^-1/2 (activations stay O(1)); vectors get +-0.1 noise.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.add_(0.1 * noise)
            else:
                p.copy_(noise * p[0].numel() ** -0.5)


def tiny_fragments(cfg: SDConfig, seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    frags = build_fragments(cfg)
    for i, frag in enumerate(frags.values()):
        randomize(frag, seed * 10 + i)
    return frags


def checkpoint(frags: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The original CompVis-layout state dict the fragments would be loaded from."""
    ckpt = {}
    for name, frag in frags.items():
        for key, value in frag.state_dict().items():
            full = checkpoint_key(name, key)
            assert full not in ckpt, f"two fragments claim {full}"
            ckpt[full] = value
    return ckpt


def ldm_config(cfg: SDConfig) -> dict:
    """`cfg` written out as the dict CompVis' v1-inference.yaml parses to (the converters read it)."""
    return cfg.to_compvis()


def diffusers_unet(cfg: SDConfig, ckpt: dict) -> UNet2DConditionModel:
    config = create_unet_diffusers_config_from_ldm(ldm_config(cfg), ckpt)
    model = UNet2DConditionModel(**config)
    model.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True, assign=True)
    return model.eval()


def diffusers_vae(cfg: SDConfig, ckpt: dict) -> DiffusersAutoencoderKL:
    config = create_vae_diffusers_config_from_ldm(ldm_config(cfg), ckpt)
    model = DiffusersAutoencoderKL(**config)
    model.load_state_dict(convert_ldm_vae_checkpoint(ckpt, config), strict=True, assign=True)
    return model.eval()


def transformers_clip(cfg: SDConfig, ckpt: dict) -> CLIPTextModel:
    config = CLIPTextConfig(**asdict(cfg.text))
    model = CLIPTextModel(config)
    state = convert_ldm_clip_checkpoint(ckpt)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel (as diffusers does)
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # buffer, rebuilt
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # position_ids is a non-persistent buffer in some transformers versions, persistent in others
    assert [k for k in missing if not k.endswith("position_ids")] == [] and unexpected == []
    return model.eval()


def openai_simple_tokenizer():
    """OpenAI's own SimpleTokenizer from the openai-clip package, loaded by path (`import clip`
    needs pkg_resources); the oracle for our tokenizer."""
    import importlib.util

    spec = importlib.util.find_spec("clip")
    if spec is None:
        import pytest
        pytest.skip("openai-clip not installed")
    folder = list(spec.submodule_search_locations)[0]
    file_spec = importlib.util.spec_from_file_location("openai_clip_simple_tokenizer",
                                                       os.path.join(folder, "simple_tokenizer.py"))
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def clip_tokenizer(workdir: Path):
    """transformers' CLIPTokenizer built offline from the BPE file openai-clip ships (as SD v1's
    openai/clip-vit-large-patch14 tokenizer: pad with <|endoftext|>)."""
    from transformers import CLIPTokenizer

    oracle = openai_simple_tokenizer()
    merges = sorted(oracle.bpe_ranks, key=oracle.bpe_ranks.get)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "vocab.json").write_text(json.dumps(oracle.encoder), encoding="utf-8")
    (workdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                        encoding="utf-8")
    return CLIPTokenizer(str(workdir / "vocab.json"), str(workdir / "merges.txt"),
                         pad_token="<|endoftext|>", model_max_length=77)


def sd_pipeline(cfg: SDConfig, ckpt: dict, scheduler, workdir: Path, kind: str = "StableDiffusionPipeline"):
    """diffusers' StableDiffusionPipeline (or another SD v1 pipeline class of diffusers, by name:
    StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline) around the reference models
    converted from `ckpt`."""
    import diffusers

    pipe = getattr(diffusers, kind)(
        vae=diffusers_vae(cfg, ckpt), text_encoder=transformers_clip(cfg, ckpt),
        tokenizer=clip_tokenizer(workdir), unet=diffusers_unet(cfg, ckpt), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_v1_scheduler_config() -> dict:
    """The SD v1 DDPM schedule in diffusers' terms (what its SD v1 model cards ship)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True,
                timestep_spacing="leading")


def ddim_scheduler():
    """diffusers' DDIMScheduler configured as SD v1 (CompVis' DDIM)."""
    from diffusers import DDIMScheduler

    cfg = sd_v1_scheduler_config()
    cfg.pop("skip_prk_steps")
    return DDIMScheduler(**cfg)


def write_yaml_config(cfg: SDConfig, path: Path) -> Path:
    """`cfg` as a CompVis-style YAML file, for `--config`."""
    cfg.save_yaml(path)
    return path


# --- end to end: our Pipeline and diffusers' StableDiffusionPipeline on one random tiny checkpoint -----

PROMPT, NEGATIVE = "a red fox sitting in the snow, oil painting", "blurry, low quality"
MAX_DIFF = 2  # of 255, per pixel and channel


def random_tiny_model(tmp_path_factory, cfg: SDConfig | None = None):
    """A tiny model (default `tiny_config()`) whose every weight is random (norm scales and biases
    too), as a real .ckpt: (cfg, ckpt path, state dict, tokenizer workdir)."""
    from optimizedSD.model.config import tiny_config

    cfg = cfg or tiny_config()
    torch.manual_seed(1)
    frags = build_fragments(cfg)
    for i, frag in enumerate(frags.values()):
        randomize(frag, 100 + i)
    state = {checkpoint_key(name, k): v for name, frag in frags.items() for k, v in frag.state_dict().items()}
    path = tmp_path_factory.mktemp("e2e") / "tiny.ckpt"
    torch.save({"state_dict": state}, path)
    return cfg, path, state, tmp_path_factory.mktemp("tokenizer")


def our_images(model, seeds, height, width, sampler, steps=10, scale=7.5, mode="default", unet_bs=1,
               negative=NEGATIVE, karras=False, prompt=PROMPT, prepare=None) -> np.ndarray:
    """Our Pipeline's 8-bit images (B, H, W, 3) as int16, image i seeded `seeds[i]`. `prepare(fragments)`
    changes the loaded fragments before the pipeline is built and may return extra Pipeline arguments."""
    from optimizedSD.model.checkpoint import load_fragments
    from optimizedSD.engine.offload import Offloader
    from optimizedSD.engine.pipeline import Pipeline

    cfg, path, _, _ = model
    fragments = load_fragments(path, cfg)
    extra = (prepare(fragments) if prepare else None) or {}
    pipe = Pipeline(cfg, Offloader(fragments, torch.device("cpu"), mode=mode), unet_bs=unet_bs, **extra)
    return pipeline_images(pipe, seeds, height, width, sampler, steps, scale, negative, karras, prompt)


def pipeline_images(pipe, seeds, height, width, sampler, steps=10, scale=7.5, negative=NEGATIVE, karras=False,
                    prompt=PROMPT) -> np.ndarray:
    """8-bit images (B, H, W, 3) as int16 of an already built Pipeline of ours."""
    from optimizedSD.engine.inputs import to_pil
    from optimizedSD.engine.pipeline import SampleSettings

    x = pipe.txt2img(prompt, negative, seeds, height, width, SampleSettings(sampler, steps, scale, karras=karras))
    return np.stack([np.asarray(im) for im in to_pil(x)]).astype(np.int16)


def diffusers_images(model, seed, height, width, scheduler, steps=10, scale=7.5, negative=NEGATIVE,
                     latent_scale=1.0, prompt=PROMPT, prepare=None, **call_kwargs) -> np.ndarray:
    """diffusers' 8-bit image (1, H, W, 3) as int16 from the noise our Pipeline gives seed `seed`:
    latents are the first draw of `torch.Generator("cpu").manual_seed(seed)` (times `latent_scale`),
    and the same generator goes to the pipeline, so a scheduler that adds noise in its steps draws
    what our per-image noise_sampler draws next. `prepare(pipe)` changes the pipeline first (loads a
    LoRA, an embedding, a VAE...)."""
    cfg, _, state, workdir = model
    pipe = sd_pipeline(cfg, state, scheduler, workdir)
    if prepare:
        prepare(pipe)
    f = cfg.downsample_factor
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, cfg.channels, height // f, width // f), generator=generator) * latent_scale
    with torch.no_grad():
        out = pipe(prompt, negative_prompt=negative, height=height, width=width, num_inference_steps=steps,
                   guidance_scale=scale, latents=latents, generator=generator, output_type="np",
                   **call_kwargs).images
    return (out * 255).round().astype(np.int16)


def assert_same_image(a, b, max_diff=MAX_DIFF):
    """Equal 8-bit images within `max_diff` per pixel; returns the max difference."""
    assert a.shape == b.shape
    diff = np.abs(a - b)
    # The comparison must be about real pixels: most of them unclamped, and images not flat.
    assert ((b > 0) & (b < 255)).mean() > 0.5 and b.std() > 10
    print(f"max diff {diff.max()}/255, mean {diff.mean():.4f}, unclamped {((b > 0) & (b < 255)).mean():.2f}")
    assert diff.max() <= max_diff, f"max diff {diff.max()}/255, mean {diff.mean():.3f}"
    return int(diff.max())
