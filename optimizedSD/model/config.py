"""One config object for Stable Diffusion v1: frozen dataclasses whose defaults are SD v1's.

`SDConfig.from_yaml` reads a CompVis-style `v1-inference.yaml`: it takes the `params` blocks and
ignores every `target:` (nothing is imported by path). The checkpoint loader compares the config
with the tensor shapes a checkpoint holds and names the first mismatch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

LATENT_SCALE = 0.18215  # SD v1 `scale_factor`: latents are VAE means times this
TEXT_ACTIVATIONS = ("quick_gelu", "gelu")  # the text encoder's `hidden_act`s clip.py computes


class ConfigError(ValueError):
    """A config file or a config/checkpoint mismatch the user must fix."""


# The adapters of Xiang et al. 2023, "A Closer Look at Parameter-Efficient Tuning in Diffusion Models"
# (arXiv 2303.18181; code: Xiang-cd/unet-finetune). Positions along a transformer block's data path, in
# order: its input (attn1i), the self-attention output (attn1o), the cross-attention input (attn2i),
# its output (attn2o), the feed-forward input (ffni), its output (ffno), the block output (transo);
# attn2c is the cross-attention context. A ResBlock's are its input (resi) and output (reso).
ADAPTER_INPUTS = ("attn1i", "attn1o", "attn2i", "attn2o", "ffni", "ffno", "transo", "attn2c")
ADAPTER_OUTPUTS = ("attn1i", "attn2i", "ffni", "transo", "attn2c")
RESBLOCK_POSITIONS = ("resi", "reso")
ADAPTER_METHODS = ("relu", "sig", "silu", "ident", "default")  # the activation; default = relu


@dataclass(frozen=True)
class AdapterSpec:
    """One `{type: inout, din, dout, mid_dim, method, scale}` entry of that project's `adapter_config`:
    an adapter reads the hidden state at `din` and adds `scale` times its output at `dout`."""
    din: str
    dout: str
    mid_dim: int
    method: str = "default"
    scale: float = 1.0


@dataclass(frozen=True)
class AdapterConfig:
    """`unet_config.params.adapter_config`: one adapter in every BasicTransformerBlock
    (`transformer_adp_config`) and/or one in every ResBlock (`resblock_adp_config`)."""
    transformer: AdapterSpec | None = None
    resblock: AdapterSpec | None = None

    def with_scale(self, scale: float) -> "AdapterConfig":
        """Every adapter at `scale` (--adapter_scale)."""
        return AdapterConfig(*(None if s is None else replace(s, scale=float(scale))
                               for s in (self.transformer, self.resblock)))

    def describe(self) -> str:
        return ", ".join(f"{s.din}->{s.dout} (mid {s.mid_dim}, {s.method}, scale {s.scale:g})"
                         for s in (self.transformer, self.resblock) if s is not None)


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    num_head_channels: int = -1  # -1: heads fixed by num_heads; else heads = channels // this
    transformer_depth: int = 1
    context_dim: int = 768
    adapters: AdapterConfig | None = None  # arXiv 2303.18181's adapters; weights from --adapter_path


@dataclass(frozen=True)
class VAEConfig:
    embed_dim: int = 4
    z_channels: int = 4
    double_z: bool = True
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextConfig:
    """transformers `CLIPTextConfig` fields; defaults are CLIP ViT-L/14's text tower."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class SDConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    linear_start: float = 0.00085
    linear_end: float = 0.0120
    timesteps: int = 1000
    scale_factor: float = LATENT_SCALE
    channels: int = 4  # latent channels

    def __post_init__(self):
        if self.unet.context_dim != self.text.hidden_size:
            raise ConfigError(
                f"config: unet context_dim {self.unet.context_dim} != text encoder hidden_size "
                f"{self.text.hidden_size}; they must match")
        if self.text.hidden_act not in TEXT_ACTIVATIONS:
            raise ConfigError(f"config: text encoder hidden_act {self.text.hidden_act!r} is not supported; "
                              f"use one of {', '.join(TEXT_ACTIVATIONS)}")

    @property
    def downsample_factor(self) -> int:
        return self.vae.downsample_factor

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SDConfig":
        from omegaconf import OmegaConf  # only needed for --config

        try:
            raw = OmegaConf.to_container(OmegaConf.load(str(path)), resolve=True)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except Exception as e:  # omegaconf raises many types for bad YAML
            raise ConfigError(f"cannot read config {path}: {e}".splitlines()[0]) from None
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"config {path} is empty or not a YAML mapping; see configs/v1-inference.yaml")
        params = (raw.get("model") or {}).get("params") if "model" in raw else raw.get("params", raw)
        if not isinstance(params, dict):
            raise ConfigError(f"config {path}: no model.params section")

        def section(name: str) -> dict:
            return ((params.get(name) or {}).get("params")) or {}

        unet_params = dict(section("unet_config"))
        adapters = unet_params.pop("adapter_config", None)
        unet = _pick(UNetConfig, unet_params)
        if adapters:
            unet = replace(unet, adapters=adapter_config(adapters, path))
        vae_params = dict(section("first_stage_config"))
        vae = _pick(VAEConfig, {**vae_params.get("ddconfig", {}), "embed_dim": vae_params.get("embed_dim", 4)})
        text = _pick(TextConfig, section("cond_stage_config").get("text_config", {}))
        top = {k: params[k] for k in ("linear_start", "linear_end", "timesteps", "scale_factor", "channels")
               if k in params}
        try:
            return cls(unet=unet, vae=vae, text=text, **top)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_compvis(self) -> dict:
        """This config as the dict a CompVis-style `v1-inference.yaml` parses to (`from_yaml` reads it
        back; diffusers' single-file converters read it too). The `target`s name the CompVis classes."""
        u, v = self.unet, self.vae
        return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
            "linear_start": self.linear_start, "linear_end": self.linear_end, "timesteps": self.timesteps,
            "scale_factor": self.scale_factor, "channels": self.channels,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "image_size": 32, "in_channels": u.in_channels, "out_channels": u.out_channels,
                "model_channels": u.model_channels, "attention_resolutions": list(u.attention_resolutions),
                "num_res_blocks": u.num_res_blocks, "channel_mult": list(u.channel_mult),
                "num_heads": u.num_heads, "use_spatial_transformer": True,
                "transformer_depth": u.transformer_depth, "context_dim": u.context_dim,
                "use_checkpoint": True, "legacy": False,
                **({"num_head_channels": u.num_head_channels} if u.num_head_channels != -1 else {}),
                **({"adapter_config": _compvis_adapters(u.adapters)} if u.adapters else {})}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": v.embed_dim, "ddconfig": {
                    "double_z": v.double_z, "z_channels": v.z_channels, "resolution": v.resolution,
                    "in_channels": v.in_channels, "out_ch": v.out_ch, "ch": v.ch, "ch_mult": list(v.ch_mult),
                    "num_res_blocks": v.num_res_blocks, "attn_resolutions": list(v.attn_resolutions),
                    "dropout": 0.0}}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                  "params": {"text_config": asdict(self.text)}},
        }}}

    def save_yaml(self, path: str | Path, header: str = "") -> None:
        """Write `to_compvis()` as YAML to `path`, after `header` (comment lines)."""
        from omegaconf import OmegaConf

        Path(path).write_text(header + OmegaConf.to_yaml(OmegaConf.create(self.to_compvis())), encoding="utf-8")

    def with_text(self, **changes) -> "SDConfig":
        return replace(self, text=replace(self.text, **changes))

    def with_adapters(self, adapters: AdapterConfig | None) -> "SDConfig":
        """This config with `adapters` (None: the plain SD v1 UNet, which is what checkpoints hold)."""
        return replace(self, unet=replace(self.unet, adapters=adapters))


def adapter_config(raw: dict, source: str | Path = "config") -> AdapterConfig:
    """Read that project's `adapter_config` mapping, checking what its code asserts and what its data
    path can run: an adapter must add its output at or after the position it reads (else its output
    does not exist yet), and the context adapter (attn2c) only feeds the context."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: adapter_config must be a mapping with transformer_adp_config and/or "
                          f"resblock_adp_config")
    unknown = set(raw) - {"transformer_adp_config", "resblock_adp_config"}
    if unknown:
        raise ConfigError(f"{source}: adapter_config has unknown entries {sorted(unknown)}; expected "
                          f"transformer_adp_config and/or resblock_adp_config")
    specs = {}
    for key, inputs, outputs in (("transformer_adp_config", ADAPTER_INPUTS, ADAPTER_OUTPUTS),
                                 ("resblock_adp_config", RESBLOCK_POSITIONS, RESBLOCK_POSITIONS)):
        entries = raw.get(key)
        if entries is None:
            continue
        entries = entries if isinstance(entries, list) else [entries]
        if len(entries) != 1:
            raise ConfigError(f"{source}: {key} lists {len(entries)} adapters; that project builds one per "
                              f"block (it keeps only the last), so give exactly one")
        specs[key] = _adapter_spec(entries[0], inputs, outputs, f"{source}: {key}")
    if not specs:
        raise ConfigError(f"{source}: adapter_config names no adapter")
    return AdapterConfig(specs.get("transformer_adp_config"), specs.get("resblock_adp_config"))


def _compvis_adapters(adapters: AdapterConfig) -> dict:
    """`adapters` as that project's YAML writes them (`adapter_config` reads it back)."""
    def entry(s: AdapterSpec) -> dict:
        return {"type": "inout", "din": s.din, "dout": s.dout, "mid_dim": s.mid_dim, "method": s.method,
                "scale": s.scale}
    out = {}
    if adapters.transformer:
        out["transformer_adp_config"] = [entry(adapters.transformer)]
    if adapters.resblock:
        out["resblock_adp_config"] = entry(adapters.resblock)
    return out


def _adapter_spec(entry, inputs, outputs, where: str) -> AdapterSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each adapter is a mapping {{type: inout, din, dout, mid_dim, method, scale}}")
    if entry.get("type", "inout") != "inout":
        raise ConfigError(f"{where}: type {entry.get('type')!r} is not supported; inout is the only type")
    din, dout, method = entry.get("din"), entry.get("dout"), entry.get("method", "default")
    if din not in inputs:
        raise ConfigError(f"{where}: din {din!r} must be one of {', '.join(inputs)}")
    if dout not in outputs:
        raise ConfigError(f"{where}: dout {dout!r} must be one of {', '.join(outputs)}")
    if method not in ADAPTER_METHODS:
        raise ConfigError(f"{where}: method {method!r} must be one of {', '.join(ADAPTER_METHODS)}")
    if (din == "attn2c") != (dout == "attn2c"):
        raise ConfigError(f"{where}: attn2c (the cross-attention context) pairs only with itself: "
                          f"din attn2c, dout attn2c")
    if din != "attn2c" and inputs.index(dout) < inputs.index(din):
        raise ConfigError(f"{where}: dout {dout} comes before din {din} on the block's data path; the "
                          f"adapter's output must go at or after the place it reads")
    mid, scale = entry.get("mid_dim"), entry.get("scale", 1.0)
    if isinstance(mid, bool) or not isinstance(mid, int) or mid < 1:
        raise ConfigError(f"{where}: mid_dim must be a positive integer, got {mid!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ConfigError(f"{where}: scale must be a number, got {scale!r}")
    return AdapterSpec(din, dout, mid, method, float(scale))


def _pick(kind, values: dict):
    """Build dataclass `kind` from the keys of `values` it knows; lists become tuples."""
    known = {f.name: f for f in fields(kind)}
    kwargs = {}
    for key, value in values.items():
        if key in known:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return kind(**kwargs)


def tiny_config() -> SDConfig:
    """A few-MB SD v1 model (same code paths, f=8) for tests and shape checks on CPU."""
    return SDConfig(
        unet=UNetConfig(model_channels=32, attention_resolutions=(2, 1), channel_mult=(1, 2),
                        num_heads=2, context_dim=32),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
        text=TextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2),
    )
