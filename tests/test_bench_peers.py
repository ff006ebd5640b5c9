"""bench.py --vs-sdcpp --vs-openvino on the demo model: a peer that is not installed is skipped with one
line saying so; ours is still measured (whole process and warm); the random checkpoint's layout."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from optimizedSD.model.paths import DEMO_CKPT, DEMO_CONFIG, ROOT


def test_missing_peers_are_skipped_with_one_line_each(capsys, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "optimizedSD"))
    import bench

    if importlib.util.find_spec("stable_diffusion_cpp") is not None:
        pytest.skip("stable-diffusion-cpp-python is installed here")
    assert bench.main(["--vs-sdcpp", "--vs-openvino", "--ckpt", str(ROOT / DEMO_CKPT), "--config", str(ROOT / DEMO_CONFIG),
                       "--sizes", "64", "--steps", "2", "--images", "2", "--openvino-python", str(tmp_path / "none"),
                       "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    skipped = [line for line in captured.err.splitlines() if "skipped" in line]
    assert len(skipped) == 2 and result["skipped"] == skipped
    assert skipped[0].startswith("stable-diffusion.cpp: skipped, stable-diffusion-cpp-python is not installed")
    assert skipped[1].startswith(f"OpenVINO: skipped, no Python at {tmp_path / 'none'}")
    assert [(r["tool"], r["precision"]) for r in result["rows"]] == [("ours", "full"), ("ours", "bf16"),
                                                                    ("ours", "bf16+fp8")]
    for row in result["rows"]:
        assert row["one_image_wall_s"] > 0 and row["one_image_peak_rss_bytes"] > 0 and row["warm_seconds_per_image"] > 0


def test_random_checkpoint_is_in_the_original_layout(tmp_path, monkeypatch):
    """The layout on a tiny config (the full-size one is 2 GB): CLIP under text_model, our loader reads it."""
    import torch

    from optimizedSD.model.checkpoint import load_fragments
    from optimizedSD.model.config import tiny_config
    from optimizedSD.tools import bench_peers

    cfg = tiny_config()
    monkeypatch.setattr("optimizedSD.model.config.SDConfig", lambda: cfg)
    path = bench_peers.write_random_checkpoint(tmp_path / "r.safetensors")
    from safetensors.torch import load_file

    keys = load_file(str(path)).keys()
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in keys
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.0.") for k in keys)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    fragments = load_fragments(path, cfg, dtype=torch.float16)
    assert set(fragments) == {"text_encoder", "unet_in", "unet_out", "vae"}


def test_only_measures_the_rows_asked_for(capsys):
    sys.path.insert(0, str(ROOT / "optimizedSD"))
    import bench

    assert bench.main(["--vs-openvino", "--ckpt", str(ROOT / DEMO_CKPT), "--config", str(ROOT / DEMO_CONFIG),
                       "--sizes", "64", "--steps", "1", "--images", "1", "--only", "ours:bf16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["tool"], r["precision"]) for r in result["rows"]] == [("ours", "bf16")] and result["skipped"] == []
    with pytest.raises(SystemExit) as e:
        bench.main(["--vs-sdcpp", "--ckpt", str(ROOT / DEMO_CKPT), "--only", "sdcpp:q4_0"])
    assert e.value.code == 2
    assert "--only sdcpp:q4_0: not a TOOL:PRECISION of ours:full" in capsys.readouterr().err
