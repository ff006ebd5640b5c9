"""--watermark: the CompVis reference script's invisible watermark, checked against the
invisible-watermark library itself (its encoder in the reference's own procedure, its decoder)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from optimizedSD.fronts.cli import main
from optimizedSD.outputs.images import ImageWriter

cv2 = pytest.importorskip("cv2")
imwatermark = pytest.importorskip("imwatermark")

REFERENCE_PAYLOAD = "StableDiffusionV1"


def put_watermark(img: Image.Image, payload: str = REFERENCE_PAYLOAD) -> Image.Image:
    """CompVis scripts/txt2img.py, verbatim but for the payload argument."""
    wm_encoder = imwatermark.WatermarkEncoder()
    wm_encoder.set_watermark("bytes", payload.encode("utf-8"))
    img = cv2.cvtColor(np.array(img), cv2.COLOR_RGB2BGR)
    img = wm_encoder.encode(img, "dwtDct")
    return Image.fromarray(img[:, :, ::-1])


def library_decode(path, bits: int) -> bytes:
    bgr = cv2.cvtColor(np.array(Image.open(path).convert("RGB")), cv2.COLOR_RGB2BGR)
    return imwatermark.WatermarkDecoder("bytes", bits).decode(bgr, "dwtDct")


def textured_picture(w: int = 320, h: int = 256) -> Image.Image:
    """Texture without clipped values (uniform noise in [40, 215]): the library's own dwtDct round trip
    is exact on it. It is not on every image: on smooth gradients, and on a few bits of the tiny
    random model's pictures, the largest coefficient of a block moves when the bit is written, and the
    decoder then reads another (docs/safety.md)."""
    return Image.fromarray(np.random.RandomState(1).randint(40, 215, (h, w, 3)).astype(np.uint8))


def test_library_decoder_reads_the_payload_of_our_png(tmp_path, capsys):
    writer = ImageWriter(tmp_path, "a picture", metadata={"Watermark": f"dwtDct {REFERENCE_PAYLOAD}"},
                         watermark=REFERENCE_PAYLOAD)
    path = writer.save(textured_picture(), 3)
    assert library_decode(path, 136) == REFERENCE_PAYLOAD.encode()
    from optimizedSD.tools.check_watermark import main as check

    assert check([str(path)]) == 0
    assert f"{REFERENCE_PAYLOAD!r} (matches its metadata)" in capsys.readouterr().out


def test_another_payload(tmp_path):
    """--watermark TEXT: the reference procedure with TEXT's bytes, pixel for pixel; the library's decoder
    reads it back but for the bits its round trip loses on this image (1 of 128 here)."""
    payload = "optimizedSD test"
    image = textured_picture()
    path = ImageWriter(tmp_path, "a picture", watermark=payload).save(image, 3)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(put_watermark(image, payload)))
    read = np.unpackbits(np.frombuffer(library_decode(path, 128), np.uint8))
    assert (read != np.unpackbits(np.frombuffer(payload.encode(), np.uint8))).sum() <= 2


def test_cli_watermark_is_the_reference_procedure_on_our_image(tiny_model, tmp_path, capsys):
    ckpt, yaml, *_ = tiny_model
    args = ["--ckpt", ckpt, "--config", yaml, "--H", 256, "--W", 256, "--ddim_steps", 1, "--sampler", "ddim",
            "--device", "cpu", "--n_samples", 1, "--seed", 11, "--prompt", "a fox"]
    args = [str(a) for a in args]
    assert main(args + ["--outdir", str(tmp_path / "plain")]) == 0
    assert main(args + ["--outdir", str(tmp_path / "marked"), "--watermark"]) == 0
    capsys.readouterr()
    for name in ("seed_11_00000.png", "grid_0000.png"):  # the reference watermarks its grid too
        plain = Image.open(tmp_path / "plain" / "a_fox" / name)
        marked = Image.open(tmp_path / "marked" / "a_fox" / name)
        assert "Watermark" not in plain.text and "Watermark:" not in plain.text["parameters"]
        assert marked.text["Watermark"] == "dwtDct StableDiffusionV1"
        assert "Watermark: dwtDct StableDiffusionV1" in marked.text["parameters"]
        assert np.array_equal(np.asarray(marked.convert("RGB")), np.asarray(put_watermark(plain.convert("RGB"))))


def cli_error(tiny_model, tmp_path, capsys, *extra) -> str:
    ckpt, yaml, *_ = tiny_model
    out = tmp_path / "out"
    code = main([str(a) for a in ["--ckpt", ckpt, "--config", yaml, "--ddim_steps", 1, "--sampler", "ddim",
                                  "--device", "cpu", "--n_samples", 1, "--outdir", out, *extra]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not out.exists(), err
    return err


def test_bad_watermarks_one_line_nothing_written(tiny_model, tmp_path, capsys, monkeypatch):
    err = cli_error(tiny_model, tmp_path, capsys, "--H", 256, "--W", 256, "--watermark", "x" * 129)
    assert "1032 bits, more than dwtDct can hold in a 256x256 image (1024 bits)" in err
    err = cli_error(tiny_model, tmp_path, capsys, "--H", 64, "--W", 64, "--watermark")
    assert "at least 65536 pixels (256x256), got 64x64" in err
    err = cli_error(tiny_model, tmp_path, capsys, "--H", 256, "--W", 256, "--watermark", "")
    assert "--watermark must be a non-empty text" in err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "imwatermark" else
                        real(name, *a, **k))
    err = cli_error(tiny_model, tmp_path, capsys, "--H", 256, "--W", 256, "--watermark")
    assert "pip install invisible-watermark" in err and "missing: imwatermark" in err


def test_check_watermark_errors(tmp_path, capsys):
    from optimizedSD.tools.check_watermark import main as check

    small = tmp_path / "small.png"
    Image.new("RGB", (64, 64)).save(small)
    assert check([str(small)]) == 2
    assert "holds none" in capsys.readouterr().err
    assert check([str(tmp_path / "missing.png")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read image")
    plain = tmp_path / "plain.png"
    textured_picture().save(plain)
    assert check([str(plain)]) == 1  # no watermark: not the reference payload
    assert "not the reference payload" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "out")
