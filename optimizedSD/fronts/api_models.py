"""The pydantic models of the webui-compatible HTTP API (`fronts/api.py`): AUTOMATIC1111's field names,
defaults and response shapes (its `modules/api/models.py`, whose request models are generated from
`StableDiffusionProcessingTxt2Img` / `...Img2Img`: the defaults below are those classes' and the API's).

Request models take any other field too (`extra="allow"`): a field we have no use for is accepted and
ignored, and the response's `info` says so in `warnings` when its value asks for something we do not do.
Types are checked here (a string for `steps` is a 422 naming the field); values (ranges, samplers, sizes)
by the engine's `request.check`, whose words name the fields with `API_LABELS`.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..engine.request import CLI_LABELS

# Request field -> the API's name for it, for the engine's one-line errors (cf. request.CLI_LABELS); a field
# the API has no name for keeps the Request's.
_NAMES = {"n_samples": "batch_size", "sampler": "sampler_name", "karras": "scheduler", "scale": "cfg_scale",
          "strength": "denoising_strength", "init_image": "init_images", "clip_skip": "CLIP_stop_at_last_layers",
          "hr_steps": "hr_second_pass_steps", "hr_denoise": "denoising_strength", "hires": "enable_hr"}
API_LABELS = {field: _NAMES.get(field, field) for field in CLI_LABELS}
# A ControlNet unit's fields as the extension's API names them (`engine.control.CLI_LABELS`' keys); kept apart
# from API_LABELS, whose labels are looked for in every message (`api.field_of`): "image", "model" are common words.
CONTROL_LABELS = {"control_model": "model", "control_image": "image", "control_weight": "weight",
                  "control_start": "guidance_start", "control_end": "guidance_end", "control_mode": "control_mode",
                  "control_preprocessor": "module", "control_low": "threshold_a", "control_high": "threshold_b",
                  "control_resize": "resize_mode"}


class _Processing(BaseModel):
    """The fields txt2img and img2img share (`StableDiffusionProcessing`), at the webui's defaults."""
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())

    prompt: str = ""
    negative_prompt: Optional[str] = ""
    styles: Optional[list[str]] = None
    seed: int = -1
    subseed: Optional[int] = -1
    subseed_strength: Optional[float] = 0.0
    seed_resize_from_h: Optional[int] = -1
    seed_resize_from_w: Optional[int] = -1
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = "Euler"  # the API's fallback when sampler_name is not given
    scheduler: Optional[str] = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Optional[float] = None
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: bool = False
    comments: Optional[dict] = None
    script_name: Optional[str] = None
    script_args: list = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = Field(default_factory=dict)
    force_task_id: Optional[str] = None
    infotext: Optional[str] = None
    unet_bs: Optional[int] = Field(default=None, description="ours: latents through each UNet half at once "
                                   "(default: the device's)")
    memory: Optional[str] = Field(default=None, description="ours: default, lowvram, turbo or a budget such as "
                                  "2G (default: the server's)")
    watermark: Optional[str] = Field(default=None, description="ours: the invisible watermark's text (the CompVis "
                                     "script's dwtDct, e.g. StableDiffusionV1; images of at least 256x256); \"\": "
                                     "none; default: the server's --watermark")


class Txt2ImgRequest(_Processing):
    enable_hr: bool = False
    denoising_strength: Optional[float] = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Processing):
    init_images: Optional[list[str]] = Field(default=None, description="base64 images (a data: URL too); "
                                             "the first is used")
    resize_mode: int = 0
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = Field(default=None, description="base64 mask: white repainted, black kept")
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: Optional[int] = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    denoising_strength: Optional[float] = 0.75
    include_init_images: bool = Field(default=False, exclude=True)


class ControlNetUnitRequest(BaseModel):
    """One of `alwayson_scripts.controlnet.args`: the sd-webui-controlnet extension's `ControlNetUnit`
    (internal_controlnet/args.py), its field names, defaults and ranges. `enabled` defaults to false there
    too: a unit without `enabled: true` is skipped. Fields this server has no use for are accepted."""
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    enabled: bool = False
    image: Optional[Union[str, dict, list]] = Field(default=None, description="base64 control image (a data: URL "
                                                    "too), or {\"image\": ..., \"mask\": ...}; img2img without one: "
                                                    "the init image")
    mask: Optional[str] = None
    module: str = Field(default="none", description="preprocessor: none, canny or invert")
    model: str = Field(default="None", description="a ControlNet of the server's ControlNet folders, with or "
                       "without its ' [hash]' (GET /controlnet/model_list)")
    weight: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    resize_mode: Union[int, str] = Field(default="Crop and Resize", description="Just Resize, Crop and Resize, "
                                         "Resize and Fill, or 0, 1, 2")
    low_vram: bool = False
    processor_res: int = -1
    threshold_a: float = Field(default=-1, description="canny's low threshold (out of 1-255, as -1: 100)")
    threshold_b: float = Field(default=-1, description="canny's high threshold (out of 1-255, as -1: 200)")
    guidance_start: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    guidance_end: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    pixel_perfect: bool = False
    control_mode: Union[int, str] = Field(default="Balanced", description="Balanced, My prompt is more important, "
                                          "ControlNet is more important, or 0, 1, 2")


class ControlNetModelList(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_list: list[str]


class ControlNetModuleList(BaseModel):
    module_list: list[str]
    module_detail: dict[str, dict]


class ImagesResponse(BaseModel):
    images: Optional[list[str]] = Field(default=None, description="The generated images in base64 format.")
    parameters: dict
    info: str


class PNGInfoRequest(BaseModel):
    image: str = Field(description="The base64 encoded PNG image")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="A string with the parameters used to generate the image")
    items: dict = Field(description="A dictionary containing all the other fields the image had")
    parameters: dict = Field(description="A dictionary with parsed generation info fields")


class ProgressResponse(BaseModel):
    progress: float = Field(description="The progress with a range of 0 to 1")
    eta_relative: float
    state: dict = Field(description="The current state snapshot")
    current_image: Optional[str] = Field(default=None, description="The last image the running job finished, "
                                         "base64 PNG (None before its first)")
    textinfo: Optional[str] = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: Optional[float] = None
    need_inner_model: Optional[bool] = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    title: str
    model_name: str
    hash: Optional[str] = None
    sha256: Optional[str] = None
    filename: str
    config: Optional[str] = None


class SDVaeItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_name: str
    filename: str


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict = Field(default_factory=dict)


class EmbeddingItem(BaseModel):
    step: Optional[int] = None
    sd_checkpoint: Optional[str] = None
    sd_checkpoint_name: Optional[str] = None
    shape: int
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class MemoryResponse(BaseModel):
    ram: dict
    cuda: dict
