"""--safety_checker: a small random instance of diffusers' StableDiffusionSafetyChecker (its own
save_pretrained layout, and the published transformers-4 key names) flags the same images through
our loader, preprocessing and flag rule as diffusers' own forward on transformers' image processor."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from optimizedSD.custom.safety_file import SafetyError, load_safety_checker, safety_config
from optimizedSD.fronts.cli import main
from optimizedSD.model.safety import flags, pixel_values

StableDiffusionSafetyChecker = pytest.importorskip(
    "diffusers.pipelines.stable_diffusion.safety_checker").StableDiffusionSafetyChecker
SIZE = 32  # the tiny tower's image size


def tiny_reference(hidden: int = 32, heads: int = 2, concepts: int = 4, special: int = 2, seed: int = 0):
    from transformers import CLIPConfig

    torch.manual_seed(seed)
    config = CLIPConfig(vision_config=dict(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=heads, image_size=SIZE, patch_size=8),
                        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2), projection_dim=16)
    ref = StableDiffusionSafetyChecker(config).eval()
    ref.concept_embeds = torch.nn.Parameter(torch.randn(concepts, 16), requires_grad=False)
    ref.special_care_embeds = torch.nn.Parameter(torch.randn(special, 16), requires_grad=False)
    ref.concept_embeds_weights = torch.nn.Parameter(torch.full((concepts,), 0.5), requires_grad=False)
    ref.special_care_embeds_weights = torch.nn.Parameter(torch.full((special,), 0.5), requires_grad=False)
    return ref


def reference_inputs(images):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return processor(images=images, return_tensors="pt").pixel_values


def reference_scores(ref, clip_input):
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    with torch.no_grad():
        embeds = ref.visual_projection(ref.vision_model(clip_input)[1])
        return cosine_distance(embeds, ref.special_care_embeds), cosine_distance(embeds, ref.concept_embeds)


def set_thresholds(ref, images, special_q=0.6, concept_q=0.8):
    """Thresholds at quantiles of the images' own scores, so that some images are flagged and some not."""
    special, cos = reference_scores(ref, reference_inputs(images))
    ref.special_care_embeds_weights = torch.nn.Parameter(torch.quantile(special, special_q, dim=0), requires_grad=False)
    ref.concept_embeds_weights = torch.nn.Parameter(torch.quantile(cos, concept_q, dim=0), requires_grad=False)


def reference_flags(ref, images) -> list[bool]:
    _, flagged = ref(clip_input=reference_inputs(images), images=np.zeros((len(images), 4, 4, 3)))
    return list(flagged)


def dozen_images():
    rs = np.random.RandomState(3)
    out = []
    for i in range(12):
        size = [(48, 40), (40, 56), (64, 64)][i % 3]  # not square: resize and centre crop
        base = rs.randint(0, 256, (1, 1, 3)) * np.ones((size[1], size[0], 3))
        noise = rs.normal(0, 20 + 10 * i, base.shape)
        out.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).filter(ImageFilter.BLUR))
    return out


def test_pixel_values_are_the_image_processors():
    images = dozen_images()
    assert torch.allclose(pixel_values(images, SIZE), reference_inputs(images), atol=1e-5)


def test_same_flags_as_diffusers_on_a_dozen_images(tmp_path):
    images = dozen_images()
    ref = tiny_reference()
    set_thresholds(ref, images)
    want = reference_flags(ref, images)
    assert 0 < sum(want) < len(want), want
    ref.save_pretrained(tmp_path / "checker")  # config.json + model.safetensors
    # the published layout: transformers 4 key names (vision_model.vision_model.*) and position_ids, a .bin
    old = {("vision_model.vision_model." + k[len("vision_model."):] if k.startswith("vision_model.") else k): v
           for k, v in ref.state_dict().items()}
    old["vision_model.vision_model.embeddings.position_ids"] = torch.arange((SIZE // 8) ** 2 + 1)[None]
    (tmp_path / "published").mkdir()
    torch.save(old, tmp_path / "published" / "pytorch_model.bin")
    (tmp_path / "published" / "config.json").write_text((tmp_path / "checker" / "config.json").read_text())
    for path in (tmp_path / "checker", tmp_path / "published", tmp_path / "published" / "pytorch_model.bin"):
        ours = load_safety_checker(path)
        special, cos = ours(pixel_values(images, SIZE))
        got = flags(special, cos, ours.special_care_embeds_weights.tolist(), ours.concept_embeds_weights.tolist())
        assert got == want, path


def test_single_file_without_config(tmp_path):
    """A lone .safetensors: the tower's shapes from its weights (64-wide heads, as CLIP's)."""
    from safetensors.torch import save_file

    images = dozen_images()
    ref = tiny_reference(hidden=64, heads=1)
    set_thresholds(ref, images)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "checker.safetensors")
    ours = load_safety_checker(tmp_path / "checker.safetensors")
    special, cos = ours(pixel_values(images, SIZE))
    assert flags(special, cos, ours.special_care_embeds_weights.tolist(),
                 ours.concept_embeds_weights.tolist()) == reference_flags(ref, images)


def tiny_args(tiny_model, outdir, *extra):
    ckpt, yaml, *_ = tiny_model
    return [str(a) for a in ["--ckpt", ckpt, "--config", yaml, "--H", 64, "--W", 64, "--ddim_steps", 1,
                             "--sampler", "ddim", "--device", "cpu", "--n_samples", 3, "--seed", 20,
                             "--prompt", "a fox", "--outdir", outdir, *extra]]


def test_cli_replaces_what_diffusers_flags(tiny_model, tmp_path, capsys):
    assert main(tiny_args(tiny_model, tmp_path / "plain", "--skip_grid")) == 0
    names = sorted(os.listdir(tmp_path / "plain" / "a_fox"))
    plain = [Image.open(tmp_path / "plain" / "a_fox" / n).convert("RGB") for n in names]
    ref = tiny_reference(concepts=1, special=1, seed=1)
    special, cos = reference_scores(ref, reference_inputs(plain))
    low, high = cos[:, 0].sort().values[1:3]  # between the 2nd and 3rd score: two flagged, one or two not
    assert high - low > 0.004  # clear of the 3-decimal rounding
    ref.concept_embeds_weights = torch.nn.Parameter(((low + high) / 2)[None], requires_grad=False)
    ref.special_care_embeds_weights = torch.nn.Parameter(special.max(0).values - 0.002, requires_grad=False)
    want = reference_flags(ref, plain)
    assert 0 < sum(want) < len(want), want
    ref.save_pretrained(tmp_path / "checker")
    capsys.readouterr()
    for blur in (False, True):
        out = tmp_path / f"checked{blur}"
        assert main(tiny_args(tiny_model, out, "--skip_grid", "--safety_checker", str(tmp_path / "checker"),
                              *(["--safety_blur"] if blur else []))) == 0
        err = capsys.readouterr().err
        seeds = [20 + i for i, f in enumerate(want) if f]
        assert f"safety checker: seed(s) {', '.join(map(str, seeds))} flagged" in err
        for name, image, flagged in zip(names, plain, want):
            saved = Image.open(out / "a_fox" / name)
            expected = (image.filter(ImageFilter.GaussianBlur(64 / 8)) if blur else Image.new("RGB", image.size)) \
                if flagged else image
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(expected)), name
            assert saved.text["Safety check"] == (f"flagged, {'blurred' if blur else 'black'}" if flagged else "passed")
            assert saved.text["Safety checker"] == f"checker ({'blur' if blur else 'black'})"
            assert "Safety checker: checker" in saved.text["parameters"]


def test_planner_counts_the_checker(tmp_path, capsys):
    from optimizedSD.model.config import tiny_config
    from reference import write_yaml_config

    yaml = write_yaml_config(tiny_config(), tmp_path / "tiny.yaml")
    tiny_reference().save_pretrained(tmp_path / "checker")
    checker_bytes = sum(v.numel() * 2 for v in load_safety_checker(tmp_path / "checker").state_dict().values())
    base = ["--config", str(yaml), "--device", "meta", "--H", "64", "--W", "64", "--n_samples", "2", "--json"]
    for mode in ([], ["--lowvram"], ["--vram", "1G"]):
        assert main(base + mode) == 0
        without = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["peak_bytes"]
        assert main(base + mode + ["--safety_checker", str(tmp_path / "checker")]) == 0
        peaks = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["peak_bytes"]
        assert "safety" not in without and peaks["safety"] > checker_bytes, (mode, peaks)  # fp16 weights + activations
        assert {k: v for k, v in peaks.items() if k != "safety"} == without  # the other phases as before


def bad(tiny_model, tmp_path, capsys, *extra) -> str:
    out = tmp_path / "out"
    code = main(tiny_args(tiny_model, out, *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not out.exists(), err
    return err


def test_bad_checkers_one_line_nothing_written(tiny_model, tmp_path, capsys):
    from safetensors.torch import save_file

    assert "safety checker not found" in bad(tiny_model, tmp_path, capsys, "--safety_checker", tmp_path / "nope")
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "vae.safetensors")
    err = bad(tiny_model, tmp_path, capsys, "--safety_checker", tmp_path / "vae.safetensors")
    assert "is not a Stable Diffusion safety checker: no vision_model.*" in err
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot read safety checker" in bad(tiny_model, tmp_path, capsys, "--safety_checker",
                                               tmp_path / "broken.safetensors")
    (tmp_path / "empty").mkdir()
    assert "has neither model.safetensors nor pytorch_model.bin" in bad(tiny_model, tmp_path, capsys,
                                                                         "--safety_checker", tmp_path / "empty")
    state = {k: v for k, v in tiny_reference().state_dict().items() if k != "concept_embeds_weights"}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "partial.safetensors")
    err = bad(tiny_model, tmp_path, capsys, "--safety_checker", tmp_path / "partial.safetensors")
    assert "no concept_embeds_weights" in err
    assert "--safety_blur goes with --safety_checker" in bad(tiny_model, tmp_path, capsys, "--safety_blur")
    with pytest.raises(SafetyError):
        safety_config(tmp_path / "vae.safetensors")
