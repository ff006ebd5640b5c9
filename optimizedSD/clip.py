"""The text encoder fragment: transformers' CLIPTextModel built from a config (never downloaded).

The module path `transformer.text_model.*` equals the checkpoint keys under `cond_stage_model.`.
Its output is the final-layer-normed hidden states (B, 77, hidden), as the reference
`FrozenCLIPEmbedder` returns.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from .config import TextConfig


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        import transformers
        from transformers import CLIPTextConfig, CLIPTextModel

        transformers.logging.set_verbosity_error()
        config = CLIPTextConfig(**asdict(cfg), projection_dim=cfg.hidden_size,
                                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
        config._attn_implementation = "sdpa"
        model = CLIPTextModel(config)
        # transformers 4.x nests the text tower as `.text_model`; 5.x is the tower itself. Either way
        # the checkpoint's `transformer.text_model.*` path is rebuilt here.
        self.transformer = nn.Module()
        self.transformer.text_model = getattr(model, "text_model", model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, 77) -> hidden states (B, 77, hidden)."""
        return self.transformer.text_model(input_ids=tokens).last_hidden_state
