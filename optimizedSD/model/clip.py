"""The text encoder fragment: CLIP's text transformer (Radford et al. 2021), as OpenAI's `clip/model.py`
and transformers' `CLIPTextModel` compute it, written here so that a run never imports transformers
(its import alone costs seconds of CPU time in every process).

Module paths `transformer.text_model.*` equal the checkpoint keys under `cond_stage_model.` and
transformers' names: `embeddings.{token,position}_embedding`, `encoder.layers.N.{self_attn.{q,k,v,out}_proj,
layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}`, `final_layer_norm`. Its output is the final-layer-normed
hidden states (B, 77, hidden), as the reference `FrozenCLIPEmbedder` returns; with a clip skip N
(`TextEncoder.forward`), the N-th hidden state from the end through the final layer norm.
Checked against transformers' `CLIPTextModel` in tests/test_components.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TEXT_ACTIVATIONS, TextConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}
assert set(ACTIVATIONS) == set(TEXT_ACTIVATIONS)


class Attention(nn.Module):
    """Causal multi-head self-attention: (B, N, hidden) -> (B, N, hidden)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.hidden_size, cfg.hidden_size)
                                                                for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        # (B, N, heads*dim) -> (B, heads, N, dim)
        q, k, v = (p(x).reshape(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # token i sees tokens 0..i
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.activation = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(ln1(x)), then + mlp(ln2(.))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.token_embedding(tokens) + self.position_embedding(positions)[None]


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x, skip: int = 1):
        """The hidden state `skip` from the end (1: the last layer's output); later layers never run."""
        for layer in self.layers[:len(self.layers) + 1 - skip]:
            x = layer(x)
        return x


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, tokens, skip: int = 1):
        return self.final_layer_norm(self.encoder(self.embeddings(tokens), skip))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.text_model = TextTransformer(cfg)
        self._init_weights(cfg)

    @torch.no_grad()
    def _init_weights(self, cfg: TextConfig) -> None:
        """transformers' CLIP initialisation (`CLIPPreTrainedModel._init_weights`, initializer_factor 1),
        which the demo model's training starts from: embeddings N(0, 0.02); q/k/v and fc2
        N(0, hidden^-1/2 (2 layers)^-1/2), out_proj N(0, hidden^-1/2), fc1 N(0, (2 hidden)^-1/2);
        biases 0; LayerNorms 1 and 0 (PyTorch's own)."""
        model = self.transformer.text_model
        in_std = cfg.hidden_size ** -0.5 * (2 * cfg.num_hidden_layers) ** -0.5
        stds = [(model.embeddings.token_embedding, 0.02), (model.embeddings.position_embedding, 0.02)]
        for layer in model.encoder.layers:
            a, mlp = layer.self_attn, layer.mlp
            stds += [(a.q_proj, in_std), (a.k_proj, in_std), (a.v_proj, in_std), (a.out_proj, cfg.hidden_size ** -0.5),
                     (mlp.fc1, (2 * cfg.hidden_size) ** -0.5), (mlp.fc2, in_std)]
        for module, std in stds:
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """Token ids (B, 77) -> hidden states (B, 77, hidden). `clip_skip` N (the webui's "Clip skip"):
        the output of layer `depth - N + 1`, i.e. transformers' `hidden_states[-N]`, through the final
        layer norm; the layers after it are not run. 1 is the last layer (`last_hidden_state`)."""
        depth = len(self.transformer.text_model.encoder.layers)
        if not 1 <= clip_skip <= depth:
            raise ValueError(f"clip skip must be from 1 to {depth} (the text encoder's layers), got {clip_skip}")
        return self.transformer.text_model(tokens, clip_skip)

    def skipped_layers(self, clip_skip: int) -> list[int]:
        """The encoder layers `clip_skip` leaves unrun (their weights need not be on the device)."""
        depth = len(self.transformer.text_model.encoder.layers)
        return list(range(depth + 1 - clip_skip, depth))
