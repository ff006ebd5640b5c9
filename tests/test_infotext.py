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
                "DPM adaptive": "sample_dpm_adaptive", "DDIM": "ddim", "PLMS": "plms", "LCM": "sample_lcm"}
WEBUI_SCHEDULERS = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform")
# Which k-diffusion algorithm each of our samplers is (ksamplers.py docstrings).
OURS = {"euler_a": "sample_euler_ancestral", "euler": "sample_euler", "lms": "sample_lms", "heun": "sample_heun",
        "dpm2": "sample_dpm_2", "dpm2_a": "sample_dpm_2_ancestral", "dpmpp_2s_a": "sample_dpmpp_2s_ancestral",
        "dpmpp_2m": "sample_dpmpp_2m", "dpmpp_sde": "sample_dpmpp_sde", "ddim": "ddim", "plms": "plms",
        "lcm": "sample_lcm"}
# What a text without `Clip skip`, `Pad conds` or `Prompt syntax` means: the webui's defaults.
TEXT_DEFAULTS = {"clip_skip": 1, "pad_conds": False, "prompt_syntax": "webui"}


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
                      "width": 512, "height": 512, **TEXT_DEFAULTS}


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
                     "DPM++ 2S a, DPM++ SDE, DDIM, PLMS, LCM)",
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
                      "steps": 12, "scale": 4.5, "seed": 99, "width": 24, "height": 16, "strength": 0.6,
                      **TEXT_DEFAULTS}
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


# ---- the ControlNet extension's units (sd-webui-controlnet internal_controlnet/args.py) --------------
# Its `ControlNetUnit.parse`, written out from its source: "Field Name: value" items split at ",", each
# value "True"/"False", else an int, else a float, else text; display names are the fields' words capitalised.
EXTENSION_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # scripts/enums.py ResizeMode
EXTENSION_CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
EXTENSION_FIELDS = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                    "guidance_start", "guidance_end", "pixel_perfect", "control_mode")  # infotext_fields()


def extension_parse(text: str) -> dict:
    def value(v):
        if v in ("True", "False"):
            return v == "True"
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v
    return {"_".join(w.lower() for w in key.split(" ")): value(v)
            for item in text.split(",") for key, v in (item.strip().split(": "),)}


def test_reads_the_extensions_published_unit_and_says_what_is_missing():
    """The extension's own infotext example (unit_tests/args_test.py `test_infotext_parsing`) in a webui text."""
    unit = ("Module: inpaint_only+lama, Model: control_v11p_sd15_inpaint [ebff9138], Weight: 1, "
            "Resize Mode: Resize and Fill, Low Vram: False, Guidance Start: 0, Guidance End: 1, "
            "Pixel Perfect: True, Control Mode: Balanced")
    text = f'a house\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ControlNet 0: "{unit}"'
    parsed = parse(text)
    assert parsed["ControlNet 0"] == unit
    fields, notes = request_fields(parsed)
    (got,) = fields["controls"]
    ext = extension_parse(unit)
    assert (got.model, got.weight, got.start, got.end) == ("control_v11p_sd15_inpaint", ext["weight"],
                                                           ext["guidance_start"], ext["guidance_end"])
    assert (got.resize, got.mode, got.preprocessor, got.image) == ("resize and fill", "balanced", "none", None)
    assert notes == ["ControlNet 0: preprocessor 'inpaint_only+lama' is not one of ours (none, canny, invert); none "
                     "used (give a ready-made map)",
                     "ControlNet 0: Pixel Perfect is not ours; the map is made at the render's size",
                     "ControlNet 0: the control image is not in the PNG; give it again (model "
                     "control_v11p_sd15_inpaint [ebff9138])"]


def test_our_units_are_the_extensions_format_and_read_back(tmp_path):
    """What the writer puts in a PNG parses with the extension's parser into its own field names and enum
    values, and reads back into the same units (less the control image)."""
    from optimizedSD.engine.control import ControlUnit, control_metadata
    from optimizedSD.engine.request import Request

    model = tmp_path / "control_v11p_sd15_canny.safetensors"
    model.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: the webui's short hash reads 64 KiB at 1 MiB
    units = (ControlUnit(str(model), "a.png", weight=0.8, start=0.1, end=0.9, mode="prompt", preprocessor="canny",
                         low=50, high=150, resize="just resize"),
             ControlUnit(str(model), "b.png", weight=1.25, mode="control", preprocessor="invert"))
    r = Request("p", width=64, height=64, controls=units)
    meta = control_metadata(r)
    text = parameters_text({"prompt": "p", "steps": 4, "sampler": "ddim", "seed": 1, "size": "64x64", **meta})
    parsed = parse(text)
    import hashlib
    digest = hashlib.sha256(model.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    for i, u in enumerate(units):
        ext = extension_parse(parsed[f"ControlNet {i}"])
        assert set(ext) == set(EXTENSION_FIELDS)
        assert ext["model"] == f"control_v11p_sd15_canny [{digest}]" and ext["module"] == u.preprocessor
        assert ext["resize_mode"] in EXTENSION_RESIZE_MODES and ext["control_mode"] in EXTENSION_CONTROL_MODES
        assert (ext["weight"], ext["guidance_start"], ext["guidance_end"]) == (u.weight, u.start, u.end)
    fields, notes = request_fields(parsed)
    assert fields["controls"] == tuple(ControlUnit("control_v11p_sd15_canny", None, **{
        k: getattr(u, k) for k in ("weight", "start", "end", "mode", "preprocessor", "resize")},
        **({"low": u.low, "high": u.high} if u.preprocessor == "canny" else {})) for u in units)
    assert notes == [f"ControlNet {i}: the control image is not in the PNG; give it again (model "
                     f"control_v11p_sd15_canny [{digest}])" for i in range(2)]
    bad = parse('p\nSteps: 4, Seed: 1, Size: 64x64, ControlNet 0: "preprocessor: canny, weight: 1"')
    fields, notes = request_fields(bad)
    assert "controls" not in fields and notes[0].startswith("ControlNet 0 'preprocessor: canny, weight: 1' is not")
