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


def with_lycoris_siblings(dirs) -> tuple[Path, ...]:
    """`dirs`, each followed by the `LyCORIS` folder beside it where there is one (the webui reads
    `models/LyCORIS` next to `models/Lora`, where the LyCORIS extension kept its files), no repeats."""
    out = []
    for d in map(Path, dirs):
        out.append(d)
        if (d.parent / "LyCORIS").is_dir():
            out.append(d.parent / "LyCORIS")
    return tuple(dict.fromkeys(out))


def bases() -> list[Path]:
    """The folders default locations are looked for under: the working directory, then `ROOT`."""
    return list(dict.fromkeys([Path.cwd(), ROOT]))


def name_problem(name: str) -> str | None:
    """Why `name` (from a prompt or a request: `<lora:NAME>`, a model or VAE name) cannot name a file
    inside a configured folder, or None: it must be relative and must not climb out with `..`."""
    if not name or not name.strip():
        return "is empty"
    if Path(name).is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if any(part == ".." for part in Path(name.replace("\\", "/")).parts):
        return "climbs out of its folder with '..'"
    return None


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path`, symlinks followed, is within `folder` (symlinks followed too)."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False
