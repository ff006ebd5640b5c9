"""Live previews (engine/previews.py, model/taesd.py): our TAESD decoder, built from a file, against
diffusers' AutoencoderTiny with the same random small weights (in both file layouts); the linear
approximation against ComfyUI's SD 1.x factors applied by hand; the engine's callback and the CLI's
`--preview_every` files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny

from optimizedSD.engine.previews import Previewer, approx_rgb
from optimizedSD.model.taesd import TaesdError, load_taesd

WIDTH = 8  # channels of the small random decoder (the released files have 64)


def random_tiny_autoencoder() -> AutoencoderTiny:
    torch.manual_seed(0)
    model = AutoencoderTiny(encoder_block_out_channels=(WIDTH,) * 4, decoder_block_out_channels=(WIDTH,) * 4)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))
    return model.eval()


def released_layout(model: AutoencoderTiny) -> dict:
    """The decoder's weights under madebyollin/taesd's `taesd_decoder.pth` keys: one index higher
    (its Sequential starts with the Clamp)."""
    out = {}
    for k, v in model.decoder.state_dict().items():
        i, rest = k[len("layers."):].split(".", 1)
        out[f"{int(i) + 1}.{rest}"] = v.clone()
    return out


@pytest.mark.parametrize("layout, suffix", [("released", ".pth"), ("released", ".safetensors"),
                                            ("diffusers", ".safetensors")])
def test_taesd_equals_diffusers_autoencoder_tiny(tmp_path, layout, suffix):
    model = random_tiny_autoencoder()
    state = released_layout(model) if layout == "released" else {
        k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"taesd_decoder{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    ours = load_taesd(path)
    z = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        a = ours(z)
        b = model.decode(z).sample
    assert a.shape == (2, 3, 48, 40)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_not_a_taesd_file_is_one_line(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"foo.weight": torch.zeros(1)}, path)
    with pytest.raises(TaesdError) as e:
        load_taesd(path)
    assert "x.pth is not a TAESD decoder" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TaesdError, match="not found"):
        load_taesd(tmp_path / "missing.pth")


def test_approximation_is_comfyuis_sd15_factors():
    z = torch.randn(1, 4, 3, 2)
    rgb = approx_rgb(z)
    # ComfyUI's SD15 latent_rgb_factors (comfy/latent_formats.py), written out again
    f = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
    expected = sum(z[0, c, :, :, None] * torch.tensor(f[c]) for c in range(4)).permute(2, 0, 1)
    assert torch.allclose(rgb[0], expected, atol=1e-6)


def test_previewer_every_n_steps():
    seen = []
    p = Previewer(seen.append, every=3)
    p.seeds = [4, 5]
    for done in range(1, 8):
        p.step(done, 7, dict(denoised=torch.zeros(2, 4, 8, 8)))
    assert [x.step for x in seen] == [3, 6, 7] and seen[0].seeds == [4, 5] and seen[0].images[0].size == (8, 8)
    assert {x.method for x in seen} == {"approx"}
    with pytest.raises(ValueError):
        Previewer(seen.append, every=0)


def test_cli_writes_previews_and_the_taesd_one(tmp_path):
    from optimizedSD.fronts.cli import main

    model = random_tiny_autoencoder()
    taesd = tmp_path / "taesd_decoder.pth"
    torch.save(released_layout(model), taesd)
    out = tmp_path / "out"
    code = main(["--demo", "--device", "cpu", "--n_samples", "1", "--ddim_steps", "4", "--seed", "2", "--skip_grid",
                 "--outdir", str(out), "--preview_every", "2", "--taesd", str(taesd), "--prompt", "a red circle"])
    assert code == 0
    previews = sorted(p.name for p in out.glob("*/previews/*.png"))
    assert previews == ["seed_2_step_0002.png", "seed_2_step_0004.png"]
    from PIL import Image

    with Image.open(next(out.glob("*/previews/seed_2_step_0004.png"))) as im:
        assert im.size == (64, 64)  # TAESD: full size (the approximation would be 8x8)
        assert np.asarray(im).std() > 0
    code = main(["--demo", "--device", "cpu", "--outdir", str(tmp_path / "bad"), "--taesd", str(tmp_path / "no.pth")])
    assert code == 2 and not (tmp_path / "bad").exists()


def test_ui_hires_section_and_live_preview(tmp_path):
    """The txt2img tab's Hires. fix widgets make the CLI's request, and a render leaves its newest
    preview for the page's timer (no browser: the Studio as the page calls it)."""
    import gradio as gr

    from optimizedSD.engine.engine import Engine
    from optimizedSD.engine.request import Request, with_defaults
    from optimizedSD.engine.spec import resolve_model
    from optimizedSD.fronts.ui import Studio, controls, results

    spec = resolve_model(None, None, demo=True, device="cpu")
    studio = Studio(Engine(spec), {k: str(tmp_path / k) for k in ("txt2img", "img2img", "inpaint")})
    with gr.Blocks():
        c = controls("txt2img", with_defaults(Request("", kind="txt2img"), True), "default")
        results(c)
    v = {w: w.value for w in c.inputs()}
    v.update({c.prompt: "a red circle", c.seed: 4, c.steps: 4, c.n_samples: 1, c.preview_every: 2,
              c.hires["enable"]: True, c.hires["hr_scale"]: 1.5, c.hires["hr_steps"]: 4.0})
    r = studio.request(c, v)
    assert (r.hr_scale, r.hr_steps, r.hr_upscaler, r.hr_denoise) == (1.5, 4, "latent", 0.7)
    gallery, saved, status = studio.generate(c, v, "page", lambda *a, **k: None)
    from PIL import Image

    with Image.open(saved[0]) as im:
        assert im.size == (96, 96) and "Hires upscale: 1.5" in im.info["parameters"]
    latest = studio.latest_preview("page")
    assert isinstance(latest, Image.Image) and latest.size == (12, 12)  # the approximation: latent size
    assert not isinstance(studio.latest_preview("page"), Image.Image)  # shown once
