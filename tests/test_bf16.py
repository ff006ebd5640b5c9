"""--precision bf16 on the CPU: bf16 weights, computed under torch.autocast("cpu", bf16), against
diffusers' fp32 StableDiffusionPipeline (the reference) on the tiny random model; and the rule that it
is asked for explicitly and runs on the CPU only.

bf16 keeps 8 bits of mantissa (a relative step of 2^-8 = 0.4%), so the image is not the fp32 one: the
bounds below are for an image that follows the reference everywhere with bf16 rounding, not for an
exact one (a wrong layer, or fp32 silently used, moves them by far more or to zero).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from reference import PROMPT, NEGATIVE, diffusers_images, random_tiny_model, sd_v1_scheduler_config

from optimizedSD.model.checkpoint import load_fragments
from optimizedSD.fronts.cli import main
from optimizedSD.engine.inputs import to_pil
from optimizedSD.engine.offload import Offloader
from optimizedSD.engine.pipeline import Pipeline, SampleSettings, weight_dtype


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_tiny_model(tmp_path_factory)


def _bf16_images(model, seed, size):
    cfg, path, _, _ = model
    fragments = load_fragments(path, cfg, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for m in fragments.values() for p in m.parameters())
    seen = []  # the dtype every convolution and linear layer computed in
    for m in fragments.values():
        for layer in m.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                layer.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    pipe = Pipeline(cfg, Offloader(fragments, torch.device("cpu")), dtype=torch.bfloat16, unet_bs=2)
    x = pipe.txt2img(PROMPT, NEGATIVE, [seed], size, size, SampleSettings("ddim", 10, 7.5))
    assert x.dtype == torch.float32 and set(seen) == {torch.bfloat16}
    return np.stack([np.asarray(im) for im in to_pil(x)]).astype(np.int16)


def test_bf16_image_follows_diffusers_fp32(model):
    scheduler = DDIMScheduler(**{k: v for k, v in sd_v1_scheduler_config().items() if k != "skip_prk_steps"})
    ref = diffusers_images(model, 7, 64, 64, scheduler)
    ours = _bf16_images(model, 7, 64)
    diff = np.abs(ours - ref)
    print(f"bf16 vs diffusers fp32: max {diff.max()}/255, mean {diff.mean():.2f}/255, "
          f"over 8/255: {(diff > 8).mean():.3f}")
    assert ref.std() > 10  # a real image, not a flat one
    assert 0 < diff.mean() <= 3 and (diff > 16).mean() <= 0.01


def test_weight_dtype_rule():
    cpu, cuda, meta = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
    assert weight_dtype(cpu, "autocast") == torch.float32  # the CPU default stays exact fp32
    assert weight_dtype(cpu, "full") == torch.float32
    assert weight_dtype(cpu, "bf16") == torch.bfloat16
    assert weight_dtype(cuda, "autocast") == weight_dtype(meta, "autocast") == torch.float16
    for device in (cuda, meta, torch.device("mps")):
        with pytest.raises(ValueError, match="CPU only"):
            weight_dtype(device, "bf16")


def test_bf16_off_the_cpu_is_one_line(tiny_model, tmp_path, capsys):
    ckpt, yaml, *_ = tiny_model
    code = main(["--ckpt", str(ckpt), "--config", str(yaml), "--device", "meta", "--precision", "bf16",
                 "--H", "64", "--W", "64", "--n_samples", "1", "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("error: --precision bf16 runs on the CPU only, not on --device meta; "
                                 "use --precision autocast (fp16) or full there")


@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (1, 640, 17, 9), (3, 64, 8, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_unet_groupnorm_on_bf16_is_the_fp32_norm_rounded_once(shape, channels_last):
    """GroupNorm32 on a bf16 CPU tensor (ATen's mixed kernel, no copies) gives the reference's fp32
    GroupNorm (torch.nn.GroupNorm on the fp32 input) rounded to bf16: every value the same or one bf16
    step away (the statistics are summed in another order), at most 1 in 1000 of them."""
    from optimizedSD.model.unet import GroupNorm32

    g = torch.Generator().manual_seed(sum(shape))
    norm = GroupNorm32(32, shape[1])
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[1], generator=g))
        norm.bias.copy_(torch.randn(shape[1], generator=g))
    x = (torch.randn(shape, generator=g) * 4 + 2).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    reference = torch.nn.GroupNorm(32, shape[1])
    reference.load_state_dict(norm.state_dict())
    with torch.no_grad():
        want = reference(x.float()).bfloat16()
        got = norm(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_autocast = norm(x)
    for out in (got, got_autocast):
        assert out.dtype == torch.bfloat16 and out.shape == want.shape
        steps = (out.contiguous().view(torch.int16).int() - want.contiguous().view(torch.int16).int()).abs()
        assert steps.max() <= 1 and (steps > 0).float().mean() <= 1e-3, (steps.max(), (steps > 0).float().mean())
