"""The four fragments of an SD v1 model and the one pure function that places a checkpoint key.

Fragment modules carry the original attribute paths, so a fragment's state-dict key is the
checkpoint key minus the fragment's prefix (`model.diffusion_model.input_blocks.1.1.norm.weight`
-> `input_blocks.1.1.norm.weight` of `unet_in`).
"""
from __future__ import annotations

from torch import nn

from .config import SDConfig

TEXT_ENCODER, UNET_IN, UNET_OUT, VAE = "text_encoder", "unet_in", "unet_out", "vae"
FRAGMENTS = (TEXT_ENCODER, UNET_IN, UNET_OUT, VAE)  # also the order they first run in

UNET_PREFIX = "model.diffusion_model."
# (checkpoint key prefix, fragment, prefix stripped to give the fragment's own key)
_ROUTES = (
    (UNET_PREFIX + "time_embed.", UNET_IN, UNET_PREFIX),
    (UNET_PREFIX + "input_blocks.", UNET_IN, UNET_PREFIX),
    (UNET_PREFIX + "middle_block.", UNET_IN, UNET_PREFIX),
    (UNET_PREFIX + "output_blocks.", UNET_OUT, UNET_PREFIX),
    (UNET_PREFIX + "out.", UNET_OUT, UNET_PREFIX),
    ("first_stage_model.", VAE, "first_stage_model."),
    ("cond_stage_model.transformer.", TEXT_ENCODER, "cond_stage_model."),
)

# Keys real SD v1 checkpoints carry that no fragment needs: the training schedule's buffers
# (we recompute the schedule from the config), the EMA bookkeeping scalars, the loss log-variance,
# and the CLIP position ids buffer (positions are counted in `clip.Embeddings`).
SKIPPED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
    "model_ema.decay", "model_ema.num_updates",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.transformer.embeddings.position_ids",
})


def fragment_of(key: str) -> tuple[str, str] | None:
    """Map a checkpoint key to (fragment, key inside that fragment).

    Returns None for a key in SKIPPED_KEYS and raises KeyError for a key no fragment owns.
    """
    if key in SKIPPED_KEYS:
        return None
    for prefix, fragment, strip in _ROUTES:
        if key.startswith(prefix):
            return fragment, key[len(strip):]
    raise KeyError(key)


def build_fragment(name: str, cfg: SDConfig) -> nn.Module:
    """A randomly initialised fragment in eval mode (call under `torch.device("meta")` for shapes only)."""
    if name == TEXT_ENCODER:
        from .clip import TextEncoder
        module = TextEncoder(cfg.text)
    elif name == UNET_IN:
        from .unet import UNetInput
        module = UNetInput(cfg.unet)
    elif name == UNET_OUT:
        from .unet import UNetOutput
        module = UNetOutput(cfg.unet)
    elif name == VAE:
        from .vae import AutoencoderKL
        module = AutoencoderKL(cfg.vae)
    else:
        raise ValueError(f"unknown fragment {name!r}; expected one of {FRAGMENTS}")
    return module.eval().requires_grad_(False)


def build_fragments(cfg: SDConfig, names=FRAGMENTS) -> dict[str, nn.Module]:
    return {name: build_fragment(name, cfg) for name in names}


def checkpoint_key(fragment: str, local_key: str) -> str:
    """Inverse of `fragment_of` for a fragment's own key (the original checkpoint layout)."""
    prefix = {TEXT_ENCODER: "cond_stage_model.", VAE: "first_stage_model."}.get(fragment, UNET_PREFIX)
    return prefix + local_key
