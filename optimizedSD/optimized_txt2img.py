"""Text to image with Stable Diffusion v1, split into four fragments for low VRAM.

Run from the repo root (or a CompVis stable-diffusion checkout this folder was copied into):
    python optimizedSD/optimized_txt2img.py --prompt "a red fox in the snow" --H 512 --W 512
`--help` lists every flag.
"""
import sys
from pathlib import Path

# Import this folder as the package `optimizedSD` from its parent, and keep the folder itself off
# sys.path so our module names (clip, config, ...) cannot shadow installed packages.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from optimizedSD.fronts.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(kind="txt2img"))
