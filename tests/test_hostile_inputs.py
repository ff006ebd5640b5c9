"""Names and files a prompt, a request or a flag brings from outside: a `<lora:NAME>` stays inside
the LoRA folders, an image past the pixel limit is refused from its header, and a prompt file's run
shows how far through it is. Each refusal is one line, exit 2, nothing written."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from lora_files import write_random_kohya
from test_cli import run_cli, tiny_args

from optimizedSD.engine.inputs import MAX_INPUT_PIXELS
from optimizedSD.model.config import SDConfig


@pytest.fixture(scope="module")
def lora_setup(tiny_model, tmp_path_factory):
    """A LoRA folder with one LoRA in it, a LoRA file beside it (outside), and a link out of it."""
    root = tmp_path_factory.mktemp("loras")
    cfg = SDConfig.from_yaml(tiny_model[1])
    folder = root / "models" / "Lora"
    folder.mkdir(parents=True)
    write_random_kohya(folder / "inside.safetensors", cfg, rank=2)
    secret = write_random_kohya(root / "secret.safetensors", cfg, rank=2, seed=1)
    (folder / "link.safetensors").symlink_to(secret)
    return folder, secret


def refused(code, err, words, outdir: Path):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not outdir.exists()


@pytest.mark.parametrize("tag,words", [
    ("<lora:../secret:0.5>", "LoRA name '../secret' climbs out of its folder with '..'"),
    ("<lora:sub/../../secret:0.5>", "climbs out of its folder"),
    ("<lora:/etc/secret:0.5>", "LoRA name '/etc/secret' is an absolute path"),
    ("<lora:link:0.5>", "is a link to"),
])
def test_a_prompt_names_loras_only_inside_the_lora_folders(tag, words, lora_setup, tiny_model, tmp_path, capsys):
    folder, secret = lora_setup
    code, _, err = run_cli(tiny_args(tiny_model, tmp_path / "out", "--prompt", f"a fox {tag}", "--lora_dir", folder,
                                     "--n_samples", 1, "--seed", 1), capsys)
    refused(code, err, words, tmp_path / "out")
    assert "pass --lora PATH" in err


def test_the_lora_flag_may_still_name_any_file(lora_setup, tiny_model, tmp_path, capsys):
    folder, secret = lora_setup
    code, _, err = run_cli(tiny_args(tiny_model, tmp_path / "out", "--prompt", "a fox <lora:inside:0.5>",
                                     "--lora_dir", folder, "--lora", f"{secret}:0.5", "--n_samples", 1, "--seed", 1),
                           capsys)
    assert code == 0, err
    assert len(list((tmp_path / "out").rglob("seed_1_*.png"))) == 1


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` in its header (its pixel data is never reached)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [20000, 9000])  # past PIL's own bomb guard, and past ours only
def test_an_image_past_the_pixel_limit_is_refused_before_decoding(side, tiny_model, tmp_path, capsys):
    assert side * side > MAX_INPUT_PIXELS
    image = tmp_path / "huge.png"
    image.write_bytes(png_header(side, side))
    code, _, err = run_cli(tiny_args(tiny_model, tmp_path / "out", "--init-img", image, "--prompt", "p",
                                     "--n_samples", 1, "--seed", 1), capsys, kind="img2img")
    refused(code, err, f"pixels ({int(MAX_INPUT_PIXELS ** 0.5)}x", tmp_path / "out")
    assert "scale it down first" in err


def test_a_prompt_file_run_shows_its_overall_progress(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue jay\na green frog\n")
    code, _, err = run_cli(tiny_args(tiny_model, tmp_path / "out", "--from-file", prompts, "--n_samples", 1,
                                     "--n_iter", 2, "--seed", 1), capsys)
    assert code == 0, err
    bars = err.replace("\r", "\n")
    assert "prompt 3/3" in bars and "6/6" in bars  # prompts, and images done of the whole file
    assert "sampling seeds 5-6" in bars  # the current batch's steps beneath it
