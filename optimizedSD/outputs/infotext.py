"""The `parameters` text of an image: written as AUTOMATIC1111's webui writes it, read from ours and its.

    a red fox                                   <- prompt (may span lines)
    Negative prompt: blurry                     <- optional, may span lines
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd-v1-4, ...

The last line is `key: value` pairs; a value holding `,`, `:`, `"` or a newline is JSON-quoted. This
is the webui's format (`modules/infotext_utils.py`: `quote`, `parse_generation_parameters`, whose
pair pattern `_PAIR` copies). Sampler names are the webui's labels (`modules/sd_samplers_kdiffusion.py`:
`Euler a`, `DPM++ 2M`, ... and `DDIM`, `PLMS`), with a ` Karras` suffix for the Karras schedule, so
the webui maps them to its samplers; our PNG `sampler` text chunk keeps our own name (`euler_a karras`).
`parse` reads our texts old (`Sampler: euler_a karras`) and new, and the webui's, including its newer
`Sampler: DPM++ 2M, Schedule type: Karras`. `request_fields` turns parsed text into `Request` fields,
the ControlNet extension's units (`ControlNet 0: "Module: canny, Model: name [hash], Weight: 1.0, ..."`,
its `ControlNetUnit.serialize`) included, less their control images, which no PNG holds.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from ..engine.hires import hires_fields

# Our sampler name -> the webui's label (one table; `webui_sampler` / `our_sampler` go both ways).
WEBUI_SAMPLERS = {"euler_a": "Euler a", "euler": "Euler", "heun": "Heun", "dpm2": "DPM2", "dpm2_a": "DPM2 a",
                  "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2s_a": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE",
                  "ddim": "DDIM", "plms": "PLMS", "lcm": "LCM"}
KARRAS = "Karras"  # the webui's sampler-name suffix and `Schedule type` value for the Karras schedule
_OUR_KARRAS = " karras"  # our own suffix (Request.sampler_name, the PNG `sampler` chunk)
_AUTOMATIC = "Automatic"  # the webui's `Schedule type` of a sampler's own schedule

# The webui's `re_param_code`: `key: value` with the value JSON-quoted or up to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_CONTROL_KEY = re.compile(r"^ControlNet (\d+)$")  # the ControlNet extension's unit keys

# Fields the writer puts first, in the webui's order: (parameters key, metadata key).
_FIELDS = (("Steps", "steps"), ("Sampler", "sampler"), ("CFG scale", "scale"), ("Seed", "seed"), ("Size", "size"),
           ("Model", "checkpoint"), ("Model hash", "checkpoint_hash"), ("Denoising strength", "strength"))
_OWN_KEYS = {"prompt", "negative_prompt"} | {key for _, key in _FIELDS}


def webui_sampler(name: str) -> str:
    """Our sampler name (`euler_a`, `euler_a karras`) as the webui's label (`Euler a`, `Euler a Karras`);
    a name the table lacks is kept."""
    base, karras = (name[:-len(_OUR_KARRAS)], True) if name.endswith(_OUR_KARRAS) else (name, False)
    label = WEBUI_SAMPLERS.get(base)
    if label is None:
        return name
    return f"{label} {KARRAS}" if karras else label


def our_sampler(text: str, schedule: str | None = None) -> tuple[str, bool] | None:
    """(sampler, karras) for a `Sampler` value, ours or the webui's (`Euler a Karras`, `euler_a karras`,
    `k_euler_a`), and the webui's `Schedule type`; None when it is no sampler of ours."""
    name = text.strip()
    karras = (schedule or "").strip().lower() == KARRAS.lower()
    if name.lower().endswith(_OUR_KARRAS):
        name, karras = name[:-len(_OUR_KARRAS)].rstrip(), True
    if name.lower().startswith("k_"):  # the webui's old aliases: k_euler_a, k_dpmpp_2m, ...
        name = name[2:]
    by_label = {label.lower(): ours for ours, label in WEBUI_SAMPLERS.items()}
    ours = name if name in WEBUI_SAMPLERS else by_label.get(name.lower())
    return None if ours is None else (ours, karras)


def _quote(value: object) -> str:
    """A value for the `key: value` line, JSON-quoted when it would break the line (as the webui's `quote`,
    which also reads `"`)."""
    s = str(value)
    return json.dumps(s, ensure_ascii=False) if any(c in s for c in ',:"\n') else s


def parameters_text(meta: dict) -> str:
    """The one-string summary other SD tools use, e.g.
    `a cat\\nNegative prompt: dog\\nSteps: 10, Sampler: Euler a, CFG scale: 7.5, Seed: 42,
    Size: 512x512, Model: sd-v1-4, Model hash: abcd1234`. Missing/None/empty fields are left out;
    keys other than the known ones are appended as `key: value`.
    """
    lines = [str(meta.get("prompt", ""))]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    values = dict(meta)
    if values.get("checkpoint"):
        values["checkpoint"] = Path(str(values["checkpoint"])).stem
    if values.get("sampler"):
        values["sampler"] = webui_sampler(str(values["sampler"]))
    fields = [(label, values.get(key)) for label, key in _FIELDS]
    fields += [(k, v) for k, v in meta.items() if k not in _OWN_KEYS]
    kv = ", ".join(f"{k}: {_quote(v)}" for k, v in fields if v is not None and v != "")
    if kv:
        lines.append(kv)
    return "\n".join(lines)


def parse(text: str) -> dict:
    """`parameters` text -> {"Prompt": ..., "Negative prompt": ..., key: value for each pair of the last
    line (unquoted)}; `Size: WxH` also gives `Size-1` (width) and `Size-2` (height), as the webui's parser.
    The last line counts as pairs only when it has three or more (else it is prompt text), as there."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
        if size := _SIZE.match(value):
            out[f"{key}-1"], out[f"{key}-2"] = size.groups()
    return out


def request_fields(parsed: dict) -> tuple[dict, list[str]]:
    """(`Request` keyword arguments that `parsed` gives: prompt, negative_prompt, sampler, karras, steps,
    scale, seed, width, height, strength; a note for each value that is not ours to use)."""
    fields = {"prompt": parsed.get("Prompt", ""), "negative_prompt": parsed.get("Negative prompt", "")}
    notes = []
    if "Sampler" in parsed:
        sampler = our_sampler(parsed["Sampler"], parsed.get("Schedule type"))
        schedule = parsed.get("Schedule type", _AUTOMATIC)
        if sampler is None:
            notes.append(f"sampler {parsed['Sampler']!r} is not one of ours ({', '.join(WEBUI_SAMPLERS.values())})")
        else:
            fields["sampler"], fields["karras"] = sampler
        if schedule.lower() not in (_AUTOMATIC.lower(), KARRAS.lower()):
            notes.append(f"schedule type {schedule!r} is not one of ours ({_AUTOMATIC}, {KARRAS})")
    for key, name, kind in (("Steps", "steps", int), ("CFG scale", "scale", float), ("Seed", "seed", int),
                            ("Size-1", "width", int), ("Size-2", "height", int),
                            ("Denoising strength", "strength", float)):
        if key in parsed:
            try:
                fields[name] = kind(parsed[key])
            except ValueError:
                notes.append(f"{key} {parsed[key]!r} is not a number")
    fields.update(text_fields(parsed, notes))
    hires, hires_notes = hires_fields(parsed)  # its Denoising strength is the second pass's (engine/hires.py)
    if hires:
        fields.pop("strength", None)
        fields.update(hires)
    notes += hires_notes
    controls, control_notes = control_fields(parsed)
    if controls:
        fields["controls"] = controls
    notes += control_notes
    return fields, notes


def text_fields(parsed: dict, notes: list[str]) -> dict:
    """How the prompts were read: `Clip skip`, `Pad conds` (the webui's) and `Prompt syntax` (ours); a key
    the text lacks is the webui's default (clip skip 1, no padding, its syntax), as the webui reads them."""
    fields = {"clip_skip": 1, "pad_conds": parsed.get("Pad conds", "False").strip().lower() == "true",
              "prompt_syntax": parsed.get("Prompt syntax", "webui").strip()}
    try:
        fields["clip_skip"] = int(parsed.get("Clip skip", 1))
    except ValueError:
        notes.append(f"Clip skip {parsed['Clip skip']!r} is not a number")
    return fields


def control_fields(parsed: dict) -> tuple[tuple, list[str]]:
    """(ControlUnits, notes) of the `ControlNet N` keys, in N's order. A unit's `model` is the name the
    text gives, without its ` [hash]` (the front finds the file in its ControlNet folders); its `image`
    is None: the extension writes no control image into the PNG (nor does the webui paste one), so
    each unit gets a note saying to give it again. A unit that cannot be read is left out, with a note."""
    from ..engine.control import CONTROL_MODES, ControlUnit
    from ..engine.control_images import PREPROCESSORS, RESIZE_MODES

    modes = {label.lower(): ours for ours, label in CONTROL_MODES.items()}
    resizes = {label.lower(): ours for ours, label in RESIZE_MODES.items()}
    keys = sorted((int(m.group(1)), k) for k in parsed if (m := _CONTROL_KEY.match(k)))
    units, notes = [], []
    for n, key in keys:
        try:  # the extension's `ControlNetUnit.parse`: "Field Name: value" pairs split at ", "
            items = {k.strip(): v.strip() for k, _, v in (item.strip().partition(": ") for item in parsed[key].split(","))}
            name, _, digest = items["Model"].partition(" [")
            unit = dict(model=name.strip(), weight=float(items.get("Weight", 1)),
                        start=float(items.get("Guidance Start", 0)), end=float(items.get("Guidance End", 1)))
        except (KeyError, ValueError):
            notes.append(f"{key} {parsed[key]!r} is not the ControlNet extension's unit format; left out")
            continue
        module = items.get("Module", "none").lower()
        if module not in PREPROCESSORS:
            notes.append(f"{key}: preprocessor {module!r} is not one of ours ({', '.join(PREPROCESSORS)}); none used "
                         "(give a ready-made map)")
            module = "none"
        unit["preprocessor"] = module
        if module == "canny":  # the extension's Threshold A/B are canny's low/high thresholds
            try:
                unit.update(low=float(items.get("Threshold A", 100)), high=float(items.get("Threshold B", 200)))
            except ValueError:
                notes.append(f"{key}: thresholds {items.get('Threshold A')!r}/{items.get('Threshold B')!r} are not "
                             "numbers; 100/200 used")
        mode = modes.get(items.get("Control Mode", "Balanced").lower())
        if mode is None:
            notes.append(f"{key}: control mode {items['Control Mode']!r} is not one of ours; Balanced used")
        unit["mode"] = mode or "balanced"
        resize = resizes.get(items.get("Resize Mode", "Crop and Resize").lower())
        if resize is None:
            notes.append(f"{key}: resize mode {items['Resize Mode']!r} is not one of ours; Crop and Resize used")
        unit["resize"] = resize or "crop and resize"
        if items.get("Pixel Perfect", "False") == "True":
            notes.append(f"{key}: Pixel Perfect is not ours; the map is made at the render's size")
        units.append(ControlUnit(**unit))
        notes.append(f"{key}: the control image is not in the PNG; give it again (model {items['Model']})")
    return tuple(units), notes


# --fp8 as the webui's `FP8 weight` field (its `fp8_storage` option: "Enable" stores the Linear/Conv2d
# weights of the UNet and the text encoder in fp8, the VAE not: our "all"); "UNet" is ours (the UNet only).
FP8_FIELD = "FP8 weight"
FP8_VALUES = {"all": "Enable", "unet": "UNet"}
PRECISION_FIELD = "Precision"  # ours: written when not the device's exact default (bf16 on a CPU)


def model_metadata(fp8: str | None, precision: str | None = None) -> dict:
    """The fields of the model settings an image was made with: `FP8 weight` (--fp8), `Precision` (bf16)."""
    meta = {}
    if fp8:
        meta[FP8_FIELD] = FP8_VALUES[fp8]
    if precision == "bf16":
        meta[PRECISION_FIELD] = precision
    return meta


def model_fields(parsed: dict) -> dict:
    """`resolve_model` arguments a parsed `parameters` text asks for (a replay loads the model so):
    fp8 ("unet", "all" or None: the webui's `Disable` or no field) and precision when it says bf16."""
    by_value = {v.lower(): k for k, v in FP8_VALUES.items()}
    out = {"fp8": by_value.get(str(parsed.get(FP8_FIELD, "")).strip().lower())}
    if str(parsed.get(PRECISION_FIELD, "")).strip().lower() == "bf16":
        out["precision"] = "bf16"
    return out


def read_parameters(image: Image.Image) -> str | None:
    """The `parameters` text an image file holds: a PNG text chunk (ours, the webui's), a JPEG comment
    (ours) or an EXIF UserComment (the webui's JPEG and WebP); None when it holds none."""
    text = image.info.get("parameters") or getattr(image, "text", {}).get("parameters")
    if text:
        return text
    comment = image.info.get("comment")
    if comment:
        return comment.decode("utf-8", "replace") if isinstance(comment, bytes) else str(comment)
    raw = image.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD, UserComment
    if isinstance(raw, bytes) and len(raw) > 8:  # an 8-byte character code, then the text
        code, body = raw[:8], raw[8:]
        if code.startswith(b"UNICODE"):
            return body.decode("utf-16-be" if not body.startswith(b"\xff\xfe") else "utf-16", "replace")
        return body.decode("utf-8", "replace").rstrip("\0")
    return raw if isinstance(raw, str) and raw else None
