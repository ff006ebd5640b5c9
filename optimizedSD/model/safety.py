"""The Stable Diffusion safety checker (CompVis `scripts/txt2img.py`'s `check_safety`), as a fragment.

The network is diffusers' `StableDiffusionSafetyChecker` in its published layout
(`CompVis/stable-diffusion-safety-checker`): a CLIP vision tower (transformers' `CLIPVisionModel`,
ViT-L/14 there, built here from its config, never downloaded) under `vision_model.*`, its pooled
output projected by `visual_projection` (no bias), and the embeddings of the concepts it looks for,
`concept_embeds` (17 x 768 there) and `special_care_embeds` (3 x 768), with one threshold each
(`concept_embeds_weights`, `special_care_embeds_weights`). Attribute names are the file's keys, so
loading is `load_state_dict(strict=True)` (`custom/safety_file.py`).

An image is flagged as diffusers' `StableDiffusionSafetyChecker.forward` flags it (`flags`): the cosine
similarities ("cosine distance" there) of its embedding to each concept, minus the concept's
threshold, rounded to 3 decimals, any above 0; once a special-care concept scores above 0, 0.01 is
added to every later score of that image (the "special-care adjustment"). `pixel_values` prepares
images as the checker's `CLIPImageProcessor` (`preprocessor_config.json` of the published checker:
shortest edge resized to the tower's image size, bicubic; centre crop; CLIP's mean and std).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

SAFETY = "safety_checker"  # the fragment's name (engine/offload.py: one unit, on the device only in its phase)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, as the checker's image processor
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_CARE_ADJUSTMENT = 0.01  # diffusers' `adjustment` once a special-care concept is found
HEAD_DIM = 64  # every published CLIP vision tower's; a file without config.json has heads = hidden / 64


@dataclass(frozen=True)
class SafetyConfig:
    """The shapes of a safety checker: its CLIP vision tower (a `CLIPVisionConfig`, kept as JSON so
    the config hashes: the planner caches on it), the projection's width, the number of concepts."""
    vision_json: str
    projection_dim: int
    concepts: int
    special: int

    def vision(self):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig.from_dict(json.loads(self.vision_json))

    @property
    def image_size(self) -> int:
        return int(json.loads(self.vision_json)["image_size"])

    @classmethod
    def of(cls, vision, projection_dim: int, concepts: int, special: int) -> "SafetyConfig":
        """From a `CLIPVisionConfig` (the tower's) and the other shapes."""
        return cls(json.dumps(vision.to_dict(), sort_keys=True, default=str), int(projection_dim), int(concepts),
                   int(special))


class SafetyChecker(nn.Module):
    """Image embeddings of the checker's CLIP vision tower; `flags` tells which images to replace."""

    def __init__(self, config: SafetyConfig):
        super().__init__()
        from transformers import CLIPVisionModel

        vision = config.vision()
        self.config = config
        self.vision_model = CLIPVisionModel(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, config.projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(config.concepts, config.projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(config.special, config.projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(config.concepts), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(config.special), requires_grad=False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) `pixel_values` -> (cosine similarities to the special-care concepts (B, special),
        to the concepts (B, concepts)), fp32 on the input's device."""
        pooled = self.vision_model(pixel_values).pooler_output  # (B, hidden)
        embeds = self.visual_projection(pooled)  # (B, projection_dim)
        return _cosine(embeds, self.special_care_embeds).float(), _cosine(embeds, self.concept_embeds).float()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """diffusers' `cosine_distance` (a cosine similarity): (N, D), (M, D) -> (N, M)."""
    return torch.mm(nn.functional.normalize(a), nn.functional.normalize(b).t())


def flags(special_cos: torch.Tensor, cos: torch.Tensor, special_thresholds, thresholds) -> list[bool]:
    """Which images the checker flags, computed as diffusers' `StableDiffusionSafetyChecker.forward`
    does, number for number: fp32 similarities minus each threshold (a Python float), plus the
    adjustment, rounded to 3 decimals (Python's `round` of a numpy fp32), compared with 0."""
    special_cos, cos = special_cos.cpu().float().numpy(), cos.cpu().float().numpy()
    special_thresholds = [float(t) for t in special_thresholds]
    thresholds = [float(t) for t in thresholds]
    out = []
    for i in range(cos.shape[0]):
        adjustment = 0.0
        for k, threshold in enumerate(special_thresholds):
            if round(special_cos[i][k] - threshold + adjustment, 3) > 0:
                adjustment = SPECIAL_CARE_ADJUSTMENT  # raises the scores after it, the later special ones too
        out.append(any(round(cos[i][k] - threshold + adjustment, 3) > 0 for k, threshold in enumerate(thresholds)))
    return out


def pixel_values(images: list[Image.Image], size: int) -> torch.Tensor:
    """(B, 3, size, size) fp32 CPU: each RGB image's shortest edge resized to `size` (bicubic, the
    other edge `int(size * long / short)`), centre-cropped to `size` x `size`, scaled to [0, 1] and
    normalised with CLIP's mean and std (transformers' `CLIPImageProcessor` with that size)."""
    out = []
    mean, std = np.array(CLIP_MEAN, dtype=np.float32), np.array(CLIP_STD, dtype=np.float32)
    for image in images:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new = (size, new_long) if w <= h else (new_long, size)  # (width, height)
        if new != (w, h):
            image = image.convert("RGB").resize(new, Image.BICUBIC)
        x = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        top, left = (x.shape[0] - size) // 2, (x.shape[1] - size) // 2
        x = x[top:top + size, left:left + size]
        x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append(torch.from_numpy(((x - mean) / std).transpose(2, 0, 1).copy()))
    return torch.stack(out)


def replacement(image: Image.Image, blur: bool = False) -> Image.Image:
    """What a flagged image becomes: black (diffusers'), or with `blur` a Gaussian blur of radius an
    eighth of its longer side, which leaves colours and no shapes."""
    if blur:
        return image.filter(ImageFilter.GaussianBlur(radius=max(image.size) / 8))
    return Image.new("RGB", image.size)
