"""webui.py's flags: every mistake is one line `error: ...` and exit status 2, found before the checkpoint
is read or a port is taken (the page itself is tested in a browser: test_webui.py)."""
import socket

import pytest

from optimizedSD import webui


def run(capsys, *argv) -> tuple[int, str]:
    try:
        code = webui.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return code, err.strip()


@pytest.mark.parametrize("argv, message", [
    (["--auth", "alice"], "error: --auth takes USER:PASS, both non-empty"),
    (["--turbo", "--lowvram"], "error: argument --lowvram: not allowed with argument --turbo; see webui.py --help"),
    (["--demo", "--vram", "2X"], "error: --vram: cannot read '2X' as a memory size; write e.g. 2G, 1536M or 0.75G "
                                 "(or one of default, lowvram, turbo)"),
    (["--demo", "--device", "meta"], "error: --device meta plans without drawing; the web UI needs cuda, mps or cpu"),
    (["--ckpt", "nowhere.safetensors"], "error: checkpoint not found: nowhere.safetensors; check the --ckpt path"),
])
def test_flag_errors_are_one_line(capsys, argv, message):
    assert run(capsys, *argv) == (2, message)


def test_a_taken_port_is_refused_before_the_checkpoint_is_read(capsys, monkeypatch, tmp_path):
    from optimizedSD.engine.engine import Engine

    monkeypatch.setattr(Engine, "load", lambda self: pytest.fail("the checkpoint was read"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run(capsys, "--demo", "--device", "cpu", "--port", port, "--outdir", tmp_path) == (
            2, f"error: cannot listen on 127.0.0.1:{port} (in use, or not an address of this machine); "
               "choose another --port or --host")


def test_an_outdir_that_is_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, err = run(capsys, "--demo", "--device", "cpu", "--outdir", tmp_path / "file" / "out")
    assert code == 2 and err.endswith("is a file; choose another --outdir")


def test_a_controlnet_dir_that_is_missing_is_refused(capsys, monkeypatch, tmp_path):
    from optimizedSD.engine.engine import Engine

    monkeypatch.setattr(Engine, "load", lambda self: pytest.fail("the checkpoint was read"))
    assert run(capsys, "--demo", "--device", "cpu", "--outdir", tmp_path, "--controlnet_dir", tmp_path / "nope") == (
        2, f"error: ControlNet folder not found: {tmp_path / 'nope'}; pass an existing folder with --controlnet_dir")


def test_controlnet_dir_takes_both_spellings_repeatably():
    """Ours and the webui ControlNet extension's `--controlnet-dir`, into one list, in order."""
    args = webui.build_parser().parse_args(["--controlnet_dir", "a", "--controlnet-dir", "b"])
    assert args.controlnet_dir == ["a", "b"]
    assert webui.build_parser().parse_args([]).controlnet_dir == []
