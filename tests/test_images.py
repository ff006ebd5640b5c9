"""optimizedSD.outputs.images: numbering that never overwrites, metadata round trips, tensor → uint8,
grids, slugs, the cheap checkpoint hash and the output pre-flight check. Expected values are
written out or computed independently here (hashlib, plain arithmetic), never taken from the code."""
import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from optimizedSD.outputs.images import ImageWriter, OutputError, ensure_writable, make_grid, slugify
from optimizedSD.model.hashes import file_hash
from optimizedSD.engine.inputs import to_pil

META = {"negative_prompt": "blurry", "sampler": "ddim", "steps": 10, "scale": 7.5,
        "checkpoint": "/weights/sd-v1-4.ckpt", "checkpoint_hash": "abcd1234"}


def img(color=(10, 20, 30), size=(8, 6)):
    return Image.new("RGB", size, color)


def names(d: Path):
    return sorted(p.name for p in d.iterdir())


# --- numbering -----------------------------------------------------------------------------------

def test_numbers_start_at_zero_and_run_on(tmp_path):
    w = ImageWriter(tmp_path, "a cat")
    paths = [w.save(img(), seed=42 + i) for i in range(3)]
    assert [p.name for p in paths] == ["seed_42_00000.png", "seed_43_00001.png", "seed_44_00002.png"]
    assert all(p.parent == tmp_path / "a_cat" for p in paths)


def test_numbering_continues_after_previous_run(tmp_path):
    d = tmp_path / "a_cat"
    d.mkdir()
    # a previous run: other seeds, other extensions, a gap; plus files that do not match the pattern
    for n in ["seed_1_00000.png", "seed_99_00007.jpg", "seed_5_00003.png", "notes.txt",
              "grid_0042.png", "seed_x_00050.png", "seed_2_00060"]:
        (d / n).write_bytes(b"old")
    p = ImageWriter(tmp_path, "a cat").save(img(), seed=3)
    assert p.name == "seed_3_00008.png"
    assert (d / "seed_99_00007.jpg").read_bytes() == b"old"


def test_second_writer_never_overwrites(tmp_path):
    a, b = ImageWriter(tmp_path, "x"), ImageWriter(tmp_path, "x", fmt="jpg")
    pa = a.save(img((255, 0, 0)), seed=1)
    pb = b.save(img((0, 255, 0)), seed=1)
    pa2 = a.save(img((0, 0, 255)), seed=1)
    assert [pa.name, pb.name, pa2.name] == ["seed_1_00000.png", "seed_1_00001.jpg",
                                           "seed_1_00002.png"]
    assert Image.open(pa).getpixel((0, 0)) == (255, 0, 0)


def test_existing_next_name_is_skipped(tmp_path, monkeypatch):
    w = ImageWriter(tmp_path, "x")
    w.save(img(), seed=7)  # seed_7_00000
    # Another process creates our next name after we scanned: hide it from the scan so that only
    # the exclusive create can catch it.
    (w.dir / "seed_7_00001.png").write_bytes(b"theirs")
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda d: [f for f in real_listdir(d) if "00001" not in f])
    p = w.save(img(), seed=7)
    assert p.name == "seed_7_00002.png"
    assert (w.dir / "seed_7_00001.png").read_bytes() == b"theirs"


def test_number_taken_under_other_name_meanwhile_backs_off(tmp_path, monkeypatch):
    w = ImageWriter(tmp_path, "x")
    w.save(img(), seed=7)  # seed_7_00000
    # A concurrent writer takes number 1 with another seed; our first scan misses it, the check
    # after our exclusive create sees it, so we give up number 1 and remove our attempt.
    (w.dir / "seed_9_00001.png").write_bytes(b"theirs")
    real_listdir, calls = os.listdir, []

    def listdir(d):
        calls.append(d)
        return [f for f in real_listdir(d) if len(calls) > 1 or "00001" not in f]

    monkeypatch.setattr(os, "listdir", listdir)
    p = w.save(img(), seed=7)
    assert p.name == "seed_7_00002.png"
    assert names(w.dir) == ["seed_7_00000.png", "seed_7_00002.png", "seed_9_00001.png"]


def test_concurrent_writers_get_distinct_files(tmp_path):
    def run():
        w = ImageWriter(tmp_path, "race")
        for i in range(5):
            w.save(img(), seed=i)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = names(tmp_path / "race")
    assert len(files) == 20
    # every number used once; a writer that lost a race may have left a gap
    assert len({int(f[-9:-4]) for f in files}) == 20


# --- metadata ------------------------------------------------------------------------------------

def test_png_metadata_round_trip(tmp_path):
    w = ImageWriter(tmp_path, "a café, 東京", metadata=META)
    p = w.save(img(size=(64, 32)), seed=42, extra_meta={"eta": 0.0})
    text = Image.open(p).text
    assert text["prompt"] == "a café, 東京"
    assert text["negative_prompt"] == "blurry"
    assert text["seed"] == "42"
    assert text["sampler"] == "ddim"  # our name; `parameters` has the webui's label
    assert text["steps"] == "10"
    assert text["scale"] == "7.5"
    assert text["size"] == "64x32"
    assert text["checkpoint"] == "sd-v1-4.ckpt"
    assert text["checkpoint_hash"] == "abcd1234"
    assert text["eta"] == "0.0"
    assert text["parameters"] == (
        "a café, 東京\nNegative prompt: blurry\n"
        "Steps: 10, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 64x32, Model: sd-v1-4, "
        "Model hash: abcd1234, eta: 0.0")


def test_jpeg_comment_round_trip(tmp_path):
    p = ImageWriter(tmp_path, "a cat", fmt="jpeg", metadata=META).save(img(), seed=5)
    assert p.suffix == ".jpg"
    with Image.open(p) as im:
        assert im.format == "JPEG"
        comment = im.info["comment"].decode("utf-8")
    assert comment.startswith("a cat\nNegative prompt: blurry\nSteps: 10, Sampler: DDIM, ")
    assert "Seed: 5, Size: 8x6, Model: sd-v1-4, Model hash: abcd1234" in comment


def test_bad_format_rejected(tmp_path):
    with pytest.raises(ValueError, match="format"):
        ImageWriter(tmp_path, "x", fmt="gif")


# --- to_pil --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_to_pil_values(dtype):
    # x → round(clamp((x+1)/2, 0, 1) * 255), written out by hand:
    # -1 → 0, 1 → 255, 0 → 127.5 → 128, 0.5 → 191.25 → 191, -0.5 → 63.75 → 64, ±3 clamp.
    vals = [-1.0, 1.0, 0.0, 0.5, -0.5, 3.0, -3.0]
    expected = [0, 255, 128, 191, 64, 255, 0]
    x = torch.tensor(vals, dtype=dtype).view(1, 1, 1, 7).expand(2, 3, 2, 7).clone()
    x[1] = -x[1]  # second image: negated values
    before = x.clone()
    ims = to_pil(x)
    assert torch.equal(x, before)  # caller's tensor untouched
    assert len(ims) == 2 and all(im.mode == "RGB" and im.size == (7, 2) for im in ims)
    assert [ims[0].getpixel((i, 1)) for i in range(7)] == [(e, e, e) for e in expected]
    neg = [255, 0, 128, 64, 191, 0, 255]
    assert [ims[1].getpixel((i, 0)) for i in range(7)] == [(e, e, e) for e in neg]


def test_to_pil_channel_order_and_layout():
    x = torch.full((1, 3, 2, 3), -1.0)
    x[0, 0, 0, 2] = 1.0  # red at row 0, column 2
    x[0, 2, 1, 0] = 1.0  # blue at row 1, column 0
    im = to_pil(x)[0]
    assert im.size == (3, 2)
    assert im.getpixel((2, 0)) == (255, 0, 0)
    assert im.getpixel((0, 1)) == (0, 0, 255)
    assert im.getpixel((1, 1)) == (0, 0, 0)


def test_to_pil_rejects_wrong_shape():
    with pytest.raises(ValueError, match="B, 3, H, W"):
        to_pil(torch.zeros(3, 4, 4))


# --- grid ----------------------------------------------------------------------------------------

def test_grid_three_images_in_rows_of_two(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    w = ImageWriter(tmp_path, "grid test", metadata=META)
    p = w.save_grid([img(c, size=(8, 6)) for c in colors], n_rows=2)
    assert p.name == "grid_0000.png"
    g = Image.open(p)
    assert g.size == (16, 12)
    assert g.getpixel((0, 0)) == colors[0]
    assert g.getpixel((8, 0)) == colors[1]
    assert g.getpixel((0, 6)) == colors[2]
    assert g.getpixel((8, 6)) == (0, 0, 0)  # empty cell
    assert "seed" not in g.text and g.text["size"] == "16x12"


def test_grid_numbering_and_default_one_row(tmp_path):
    w = ImageWriter(tmp_path, "g")
    (w.dir).mkdir()
    (w.dir / "grid_0004.jpg").write_bytes(b"old")
    (w.dir / "seed_1_00009.png").write_bytes(b"old")  # image numbers do not affect grid numbers
    p = w.save_grid([img(), img(), img()])
    assert p.name == "grid_0005.png"
    assert Image.open(p).size == (24, 6)
    assert w.save(img(), seed=1).name == "seed_1_00010.png"


def test_grid_rejects_mixed_sizes():
    with pytest.raises(ValueError):
        make_grid([img(size=(8, 8)), img(size=(4, 4))], 2)


# --- slugs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, slug", [
    ("a photo of  a cat\tin\nspace", "a_photo_of_a_cat_in_space"),
    ("../../etc", "etc"),
    ("..", "untitled"),
    ("", "untitled"),
    ("   ", "untitled"),
    ('/\\:*?"<>|', "untitled"),
    ("a/b\\c:d*e?f\"g<h>i|j", "abcdefghij"),
    ("x\x00y\x07z\x1b", "xyz"),
    ("wait... what?", "wait._what"),
    (".hidden", "hidden"),
    ("café 東京 🐱", "café_東京_🐱"),
    ("cafe\u0301", "café"),  # NFC
    ("con", "con_"),
    ("NUL.txt", "NUL.txt_"),
    ("a \u202e b", "a_b"),  # bidi override removed
])
def test_slug_cases(prompt, slug):
    assert slugify(prompt) == slug


def test_slug_length_limits():
    assert len(slugify("word " * 100)) <= 150
    assert slugify("a" * 300) == "a" * 150
    long_cjk = slugify("東" * 300)  # 3 bytes per char in UTF-8
    assert set(long_cjk) == {"東"} and len(long_cjk.encode()) <= 200


@pytest.mark.parametrize("prompt", ["../../etc", "..", "a/../../b", "/abs/path", "C:\\x", ""])
def test_slug_stays_inside_outdir(tmp_path, prompt):
    w = ImageWriter(tmp_path, prompt)
    assert w.dir.resolve().parent == tmp_path.resolve()
    p = w.save(img(), seed=0)
    assert p.resolve().parent.parent == tmp_path.resolve()


# --- file_hash -----------------------------------------------------------------------------------

def reference_hash(data: bytes, chunk: int) -> str:
    body = data if len(data) <= 2 * chunk else data[:chunk] + data[-chunk:]
    return hashlib.sha256(f"{len(data)}\n".encode() + body).hexdigest()[:8]


def test_file_hash_large_file(tmp_path):
    mib = 1 << 20
    data = bytes(range(256)) * (3 * mib // 256) + b"tail"  # 3 MiB + 4 bytes
    p = tmp_path / "model.ckpt"
    p.write_bytes(data)
    h = file_hash(p)
    assert h == reference_hash(data, mib) and len(h) == 8
    # the middle is not read; the ends and the size are
    p.write_bytes(data[:mib] + b"\xff" * mib + data[2 * mib:])
    assert file_hash(p) == h
    p.write_bytes(data[:-1] + b"X")
    assert file_hash(p) != h
    p.write_bytes(data + b"\0")
    assert file_hash(p) != h


@pytest.mark.parametrize("n", [0, 3, 8, 15, 16, 17, 40])
def test_file_hash_small_chunks(tmp_path, n):
    data = os.urandom(n)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert file_hash(p, chunk=8) == reference_hash(data, 8)


# --- ensure_writable -----------------------------------------------------------------------------

def test_ensure_writable_creates_nested(tmp_path):
    d = tmp_path / "a" / "b"
    assert ensure_writable(d) == d
    assert d.is_dir() and names(d) == []  # the probe file is gone


def test_ensure_writable_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for bad in (f, f / "sub"):
        with pytest.raises(OutputError) as e:
            ensure_writable(bad)
        msg = str(e.value)
        assert str(bad) in msg and "\n" not in msg and "output directory" in msg


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_ensure_writable_read_only_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot write"):
            ensure_writable(d)
        with pytest.raises(OutputError):
            ImageWriter(d, "x").save(img(), seed=1)
    finally:
        d.chmod(0o700)


def test_writer_raises_output_error_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="file"):
        ImageWriter(f, "x").save(img(), seed=1)
