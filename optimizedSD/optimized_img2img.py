"""Image to image (SDEdit) with Stable Diffusion v1, split into four fragments for low VRAM.

Run from the repo root (or a CompVis stable-diffusion checkout this folder was copied into):
    python optimizedSD/optimized_img2img.py --init-img sketch.png --strength 0.75 --prompt "a castle, oil painting"
`--help` lists every flag.
"""
import sys
from pathlib import Path

# Import this folder as the package `optimizedSD` from its parent, and keep the folder itself off
# sys.path so our module names (clip, config, ...) cannot shadow installed packages.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from optimizedSD.fronts.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(kind="img2img"))
