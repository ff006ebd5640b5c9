"""Read the invisible watermark back from an image (`--watermark`, outputs/watermark.py).

    python -m optimizedSD.tools.check_watermark IMG [IMG ...] [--length BITS]

Decodes `BITS` bits with the invisible-watermark library's own decoder (`dwtDct`) and prints the
payload. Default length: the payload the image's metadata names (`Watermark: dwtDct TEXT`), else the
reference script's "StableDiffusionV1" (136 bits). Says whether what was read matches the metadata.
Exit 0 when every image holds the payload looked for, 1 when one does not, 2 on an error (one line).
"""
from __future__ import annotations

import argparse
import sys

from PIL import Image, UnidentifiedImageError

from ..engine.request import WATERMARK, WATERMARK_MIN_PIXELS, RequestError
from ..outputs.infotext import parse, read_parameters
from ..outputs.watermark import METADATA_KEY, decode, payload_in_metadata


def recorded_payload(image: Image.Image) -> str | None:
    """The payload the image's metadata says it holds, or None."""
    text = image.info.get(METADATA_KEY)
    if text is None:
        params = read_parameters(image)
        text = parse(params).get(METADATA_KEY) if params else None
    return payload_in_metadata(text)


def check(path: str, length: int | None) -> tuple[str, bool]:
    """(the line to print, whether the payload looked for was found) for one image."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as e:
        raise RequestError(f"cannot read image {path}: {e}") from None
    if image.width * image.height < WATERMARK_MIN_PIXELS:
        raise RequestError(f"{path} is {image.width}x{image.height}: dwtDct watermarks need at least 65536 pixels "
                           "(256x256), so it holds none")
    recorded = recorded_payload(image)
    expected = recorded if recorded is not None else WATERMARK
    bits = length if length is not None else 8 * len(expected.encode("utf-8"))
    found = decode(image, bits)
    try:
        shown = repr(found.decode("utf-8"))
    except UnicodeDecodeError:
        shown = repr(found)
    match = found == expected.encode("utf-8")
    if recorded is not None:
        verdict = "matches its metadata" if match else f"does not match its metadata ({recorded!r})"
    else:
        verdict = f"no watermark in its metadata; {'the' if match else 'not the'} reference payload {WATERMARK!r}"
    return f"{path}: dwtDct {bits} bits: {shown} ({verdict})", match


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m optimizedSD.tools.check_watermark",
                                description="Read the invisible watermark (dwtDct) of images back.")
    p.add_argument("images", nargs="+", metavar="IMG")
    p.add_argument("--length", type=int, default=None, metavar="BITS",
                   help="payload bits to read (default: the metadata's payload, else StableDiffusionV1: 136)")
    args = p.parse_args(argv)
    try:
        if args.length is not None and (args.length <= 0 or args.length % 8):
            raise RequestError(f"--length must be a positive multiple of 8 (bits of a byte payload), got {args.length}")
        results = [check(path, args.length) for path in args.images]
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line, _ in results:
        print(line)
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
