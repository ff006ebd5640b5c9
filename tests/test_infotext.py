"""optimizedSD.outputs.infotext: `parameters` written the way AUTOMATIC1111's webui writes it, and read back from
ours (old and new) and the webui's. The webui's side is written out here from its source
(stable-diffusion-webui `modules/sd_samplers_kdiffusion.py`, `modules/sd_samplers.py`
`get_sampler_and_scheduler`, `modules/infotext_utils.py` docstring), not taken from the code under test."""
import io

import pytest
from PIL import Image

from optimizedSD.outputs.images import ImageWriter
from optimizedSD.outputs.infotext import parameters_text, parse, read_parameters, request_fields
from optimizedSD.sampling.ksamplers import KSAMPLERS
from optimizedSD.sampling.samplers import SAMPLERS

# The webui's sampler labels and the k-diffusion function each runs (samplers_k_diffusion), plus its
# CompVis samplers. Karras variants are these labels with " Karras", or `Schedule type: Karras`.
WEBUI_LABELS = {"Euler a": "sample_euler_ancestral", "Euler": "sample_euler", "LMS": "sample_lms",
                "Heun": "sample_heun", "DPM2": "sample_dpm_2", "DPM2 a": "sample_dpm_2_ancestral",
                "DPM++ 2S a": "sample_dpmpp_2s_ancestral", "DPM++ 2M": "sample_dpmpp_2m",
                "DPM++ SDE": "sample_dpmpp_sde", "DPM++ 2M SDE": "sample_dpmpp_2m_sde", "DPM fast": "sample_dpm_fast",
                "DPM adaptive": "sample_dpm_adaptive", "DDIM": "ddim", "PLMS": "plms"}
WEBUI_SCHEDULERS = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform")
# Which k-diffusion algorithm each of our samplers is (ksamplers.py docstrings).
OURS = {"euler_a": "sample_euler_ancestral", "euler": "sample_euler", "lms": "sample_lms", "heun": "sample_heun",
        "dpm2": "sample_dpm_2", "dpm2_a": "sample_dpm_2_ancestral", "dpmpp_2s_a": "sample_dpmpp_2s_ancestral",
        "dpmpp_2m": "sample_dpmpp_2m", "dpmpp_sde": "sample_dpmpp_sde", "ddim": "ddim", "plms": "plms"}


def webui_reads(sampler_value: str) -> tuple[str, str]:
    """(sampler label, schedule) as the webui's get_sampler_and_scheduler splits a `Sampler` value."""
    for scheduler in WEBUI_SCHEDULERS:
        if sampler_value.endswith(" " + scheduler):
            return sampler_value[:-len(scheduler) - 1], scheduler
    return sampler_value, "Automatic"


def sampler_field(text: str) -> str:
    last = text.splitlines()[-1]
    return next(pair.split(": ", 1)[1] for pair in last.split(", ") if pair.startswith("Sampler: "))


@pytest.mark.parametrize("sampler, karras", [(s, False) for s in sorted(SAMPLERS)] + [(s, True) for s in KSAMPLERS])
def test_sampler_names_are_the_webuis(sampler, karras):
    assert set(OURS) == set(SAMPLERS)
    name = sampler + (" karras" if karras else "")
    text = parameters_text({"prompt": "p", "sampler": name, "steps": 20, "scale": 7.5, "seed": 1, "size": "64x64"})
    label, schedule = webui_reads(sampler_field(text))
    assert WEBUI_LABELS[label] == OURS[sampler]
    assert schedule == ("Karras" if karras else "Automatic")
    fields, notes = request_fields(parse(text))
    assert (fields["sampler"], fields["karras"], notes) == (sampler, karras, [])


def test_parses_the_webuis_own_example():
    text = ("girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
            "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
            "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b")
    fields, notes = request_fields(parse(text))
    assert notes == []
    assert fields == {"prompt": text.splitlines()[0], "negative_prompt": text.splitlines()[1][len("Negative prompt: "):],
                      "sampler": "euler_a", "karras": False, "steps": 20, "scale": 7.0, "seed": 965400086,
                      "width": 512, "height": 512}


def test_parses_the_newer_webuis_schedule_type_and_quoted_values():
    text = ('a cat\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 7, Size: 768x512, '
            'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.4, '
            'Lora hashes: "a: 1, b: 2", Version: v1.10.1')
    parsed = parse(text)
    assert parsed["Lora hashes"] == "a: 1, b: 2" and parsed["Version"] == "v1.10.1"
    fields, notes = request_fields(parsed)
    assert notes == []
    assert (fields["sampler"], fields["karras"], fields["width"], fields["height"], fields["strength"]) == \
        ("dpmpp_2m", True, 768, 512, 0.4)


def test_parses_our_old_names_and_says_what_is_not_ours():
    old = "a red fox\nSteps: 2, Sampler: euler_a karras, CFG scale: 3.0, Seed: 43, Size: 64x64, Model: demo"
    fields, notes = request_fields(parse(old))
    assert (fields["sampler"], fields["karras"], fields["seed"], notes) == ("euler_a", True, 43, [])
    fields, notes = request_fields(parse("p\nSteps: 20, Sampler: UniPC, Schedule type: Exponential, Seed: 1"))
    assert "sampler" not in fields and fields["steps"] == 20
    assert notes == ["sampler 'UniPC' is not one of ours (Euler a, Euler, Heun, DPM2, DPM2 a, LMS, DPM++ 2M, "
                     "DPM++ 2S a, DPM++ SDE, DDIM, PLMS)",
                     "schedule type 'Exponential' is not one of ours (Automatic, Karras)"]


def test_a_prompt_without_parameters_is_all_prompt():
    assert parse("just a prompt, with: a colon") == {"Prompt": "just a prompt, with: a colon", "Negative prompt": ""}


def test_parameters_text_omits_missing_and_quotes_commas():
    assert parameters_text({"prompt": "p", "seed": 1}) == "p\nSeed: 1"
    assert parameters_text({"prompt": "p", "negative_prompt": "", "checkpoint": "a,b.ckpt"}) == 'p\nModel: "a,b"'
    assert parameters_text({"prompt": "p", "init_image": 'say "hi", x.png'}) == 'p\ninit_image: "say \\"hi\\", x.png"'


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_round_trip_through_a_written_file(tmp_path, fmt):
    prompt, negative = 'a fox, "red": bright\nsecond line', "blurry, dark"
    meta = {"negative_prompt": negative, "sampler": "dpm2_a karras", "steps": 12, "scale": 4.5,
            "checkpoint": "/w/my,model.safetensors", "checkpoint_hash": "abcd1234", "strength": 0.6}
    path = ImageWriter(tmp_path, prompt, fmt=fmt, metadata=meta).save(Image.new("RGB", (24, 16)), seed=99)
    with Image.open(path) as im:
        parsed = parse(read_parameters(im))
    fields, notes = request_fields(parsed)
    assert notes == []
    assert fields == {"prompt": prompt, "negative_prompt": negative, "sampler": "dpm2_a", "karras": True,
                      "steps": 12, "scale": 4.5, "seed": 99, "width": 24, "height": 16, "strength": 0.6}
    assert parsed["Model"] == "my,model"


def test_reads_the_webuis_exif_user_comment():
    """The webui's JPEG/WebP: piexif UserComment, "UNICODE\\0" then UTF-16 big-endian."""
    text = "a cat\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 8x8"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG", exif=exif.tobytes())
    with Image.open(buf) as im:
        assert read_parameters(im) == text
    assert read_parameters(Image.new("RGB", (8, 8))) is None
