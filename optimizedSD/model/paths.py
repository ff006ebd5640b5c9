"""Where the tool looks for files: the checkout it runs from and the default folders under it.

Every default location is relative and looked for under the working directory first, then under
`ROOT` (this repository, or the CompVis `stable-diffusion` checkout `optimizedSD/` was copied into).
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # optimizedSD/model/paths.py -> the checkout
COMPVIS_CKPT = Path("models/ldm/stable-diffusion-v1/model.ckpt")
DEMO_CKPT, DEMO_CONFIG = Path("weights/demo.safetensors"), Path("configs/demo.yaml")  # tools/train_demo.py
CKPT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")
DEFAULT_LORA_DIRS = (Path("models/Lora"), Path("weights/lora"))  # where <lora:NAME:WEIGHT> looks, in order
DEFAULT_EMBEDDINGS_DIR = Path("embeddings")


def bases() -> list[Path]:
    """The folders default locations are looked for under: the working directory, then `ROOT`."""
    return list(dict.fromkeys([Path.cwd(), ROOT]))
