"""Reading the init image and the mask: modes, sizes, binarisation, paste-back."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from optimizedSD.engine.inputs import (InputError, default_size, image_tensor, load_mask, mask_tensor, open_image,
                                paste_back, to_rgb)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200               # red ...
    rgba[:2, :, 3] = 255             # ... opaque in the top half
    rgba[2:, :, 3] = 0               # fully transparent below
    rgba[3, 0, 3] = 128              # half transparent
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))).astype(int)
    assert (out[:2] == [200, 0, 0]).all()
    assert (out[2, :] == 255).all()
    # alpha 128/255 over white: c = a * fg + (1 - a) * 255
    expected = np.round(128 / 255 * np.array([200, 0, 0]) + (1 - 128 / 255) * 255)
    assert np.abs(out[3, 0] - expected).max() <= 1


def test_grayscale_palette_and_transparent_palette_become_rgb():
    gray = Image.fromarray(np.full((3, 5), 77, np.uint8), "L")
    assert np.asarray(to_rgb(gray)).tolist() == [[[77] * 3] * 5] * 3
    palette = gray.convert("P")
    assert to_rgb(palette).mode == "RGB" and np.asarray(to_rgb(palette))[0, 0].tolist() == [77] * 3
    p = Image.new("P", (2, 1))
    p.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 1       # colour 1 is transparent: white after compositing
    assert np.asarray(to_rgb(p)).tolist() == [[[10, 20, 30], [255, 255, 255]]]


@pytest.mark.parametrize("size, expected", [((512, 512), (512, 512)), ((513, 770), (512, 768)), ((7, 9), (8, 8))])
def test_default_size_rounds_down_to_a_multiple_of_8(size, expected):
    assert default_size(Image.new("RGB", size)) == expected


def test_image_tensor_is_pixels_over_255_times_2_minus_1():
    a = np.array([[[0, 255, 51]]], np.uint8)
    t = image_tensor(Image.fromarray(a))
    assert t.shape == (1, 3, 1, 1)
    assert t.flatten().tolist() == pytest.approx([-1.0, 1.0, 51 / 255 * 2 - 1])


def test_mask_binarised_at_128_any_mode_and_resized(tmp_path):
    values = np.array([[0, 127, 128, 255]], np.uint8)
    Image.fromarray(np.stack([values] * 3, -1)).save(tmp_path / "rgb.png")
    mask, resized = load_mask(tmp_path / "rgb.png", (4, 1))
    assert not resized and np.asarray(mask).tolist() == [[0, 0, 255, 255]]
    assert mask_tensor(mask).flatten().tolist() == [0, 0, 1, 1]
    Image.fromarray(np.kron(values, np.ones((2, 2), np.uint8))).save(tmp_path / "big.png")  # 8x2, mode L
    mask, resized = load_mask(tmp_path / "big.png", (4, 1))
    assert resized and mask.size == (4, 1) and set(np.unique(np.asarray(mask))) <= {0, 255}


def test_paste_back_keeps_every_unmasked_pixel():
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    generated = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 3:7] = 255
    out = np.asarray(paste_back(generated, original, Image.fromarray(m)))
    assert np.array_equal(out[m == 0], np.asarray(original)[m == 0])
    assert np.array_equal(out[m == 255], np.asarray(generated)[m == 255])


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match=r"init image not found: .*nothere\.png; check the path"):
        open_image(tmp_path / "nothere.png", "init image")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InputError, match=r"is not an image PIL can read; use a png, jpg or webp"):
        open_image(tmp_path / "notes.png", "init image")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cannot read init image .*cut\.png: .*truncated or corrupt"):
        open_image(tmp_path / "cut.png", "init image")
