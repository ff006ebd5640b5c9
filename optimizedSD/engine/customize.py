"""What a user adds to a checkpoint at inference, resolved once per model and per request.

Per model (`Customizations`, part of `ModelSpec`, applied when the engine loads): a separate VAE
(`--vae`), the adapters of arXiv 2303.18181 (`--config` naming them, weights from `--adapter_path`,
`--adapter_scale`) and the textual-inversion embeddings of a folder (`--embeddings`, default
`embeddings/` when it exists). Per request (`request_loras`): the LoRAs of `--lora PATH[:WEIGHT]`
and of `<lora:NAME:WEIGHT>` tags in the prompt, found in the LoRA folders (`--lora_dir`, default
`models/Lora` then `weights/lora`, under the working directory, then this checkout; each followed
by the `LyCORIS` folder beside it, where there is one, as the webui reads `models/LyCORIS`; `<lyco:...>`
tags too).
Every file is read and checked here, before anything is written; every problem is a `RequestError`
of one line naming the file and what to do.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..model.config import SDConfig
from ..model.paths import DEFAULT_EMBEDDINGS_DIR, DEFAULT_LORA_DIRS, bases, with_lycoris_siblings
from .request import Request, RequestError



@dataclass(frozen=True)
class Customizations:
    vae: Path | None = None  # a separate VAE file
    adapter_path: Path | None = None  # the adapters' folder (their config is `cfg.unet.adapters`)
    embeddings_dir: Path | None = None  # None: no embeddings
    embeddings: tuple = ()  # embeddings.Embedding, read from `embeddings_dir`
    lora_dirs: tuple[Path, ...] = ()  # where `<lora:NAME>` is looked for
    safety_checker: Path | None = None  # the safety checker's folder or file (custom/safety_file.py)
    safety: object = None  # its shapes (model.safety.SafetyConfig), read without its weights
    safety_blur: bool = False  # flagged images blurred instead of black

    def arguments(self) -> dict:
        """`resolve_customizations`' arguments that give these again (paths absolute: a cluster worker's)."""
        absolute = lambda p: None if p is None else str(Path(p).resolve())  # noqa: E731
        return dict(vae=absolute(self.vae), adapter_path=absolute(self.adapter_path),
                    embeddings=absolute(self.embeddings_dir) or "", lora_dirs=[absolute(d) for d in self.lora_dirs],
                    safety_checker=absolute(self.safety_checker), safety_blur=self.safety_blur)



def resolve_customizations(cfg: SDConfig, *, vae=None, adapter_path=None, adapter_scale=None, embeddings=None,
                           lora_dirs=None, safety_checker=None, safety_blur=False) -> tuple[SDConfig, Customizations]:
    """(the config with `adapter_scale` applied, the checked customizations). `embeddings=None` takes
    `embeddings/` when it exists, `""` none; `lora_dirs=None` the default LoRA folders."""
    from ..custom.embeddings import EmbeddingError, read_embeddings_dir

    if vae is not None and not Path(vae).is_file():
        raise RequestError(f"VAE file not found: {vae}; check the --vae path")
    adapters = cfg.unet.adapters
    if adapter_path is not None and adapters is None:
        raise RequestError(f"--adapter_path {adapter_path} given, but the model config names no adapters; pass that "
                           "project's YAML (with unet_config.params.adapter_config) with --config")
    if adapters is not None and adapter_path is None:
        raise RequestError("the model config names adapters (unet_config.params.adapter_config) but no --adapter_path "
                           "gives their weights; pass the folder save_adapter_to_dir wrote")
    if adapter_path is not None and not Path(adapter_path).is_dir():
        raise RequestError(f"adapter folder not found: {adapter_path}; pass the folder that save_adapter_to_dir wrote "
                           "(e.g. <logdir>/checkpoints/999-adapters) with --adapter_path")
    if adapter_scale is not None:
        if adapters is None:
            raise RequestError("--adapter_scale applies to adapters; the model config names none")
        if not (isinstance(adapter_scale, (int, float)) and abs(adapter_scale) < float("inf")):
            raise RequestError(f"--adapter_scale must be a finite number, got {adapter_scale}")
        cfg = cfg.with_adapters(adapters.with_scale(float(adapter_scale)))
    folder = None
    if embeddings:
        folder = Path(embeddings)
    elif embeddings is None:
        folder = next((b / DEFAULT_EMBEDDINGS_DIR for b in bases() if (b / DEFAULT_EMBEDDINGS_DIR).is_dir()), None)
    try:
        found = tuple(read_embeddings_dir(folder, cfg.text.hidden_size)) if folder is not None else ()
    except EmbeddingError as e:
        raise RequestError(str(e)) from None
    dirs = with_lycoris_siblings(lora_dirs or dict.fromkeys(b / d for d in DEFAULT_LORA_DIRS for b in bases()))
    return cfg, Customizations(Path(vae) if vae else None, Path(adapter_path) if adapter_path else None,
                               folder, found, dirs, **_safety(safety_checker, safety_blur))


def _safety(path, blur: bool) -> dict:
    """Customizations' safety-checker fields: the path, its shapes (layout checked), the blur."""
    if path is None:
        if blur:
            raise RequestError("--safety_blur goes with --safety_checker PATH (what flags the images it blurs)")
        return {}
    from ..custom.safety_file import SafetyError, safety_config

    try:
        return dict(safety_checker=Path(path), safety=safety_config(path), safety_blur=bool(blur))
    except SafetyError as e:
        raise RequestError(str(e)) from None


# ---- per request -------------------------------------------------------------------------------
def prompt_text(prompt: str) -> str:
    """The prompt the text encoder reads: without its `<lora:...>` tags."""
    from ..custom.lora import extract_lora_tags

    return extract_lora_tags(prompt)[0]


def request_loras(r: Request, cfg: SDConfig, lora_dirs) -> list[tuple]:
    """[(lora.Lora, weight)] of a request: its `loras` (paths), then the prompt's tags, each read and
    checked against `cfg` (read once per file version)."""
    from ..custom.lora import LoraError, extract_lora_tags, find_lora

    try:
        _, tags = extract_lora_tags(r.prompt)
        wanted = [(Path(p), w) for p, w in r.loras] + [(find_lora(name, lora_dirs), w) for name, w in tags]
        out = []
        for path, weight in wanted:
            if not path.is_file():
                raise LoraError(f"LoRA file not found: {path}; check the --lora path")
            if not abs(weight) < float("inf"):
                raise LoraError(f"the weight of LoRA {path.name} must be a finite number, got {weight}")
            stat = path.stat()
            out.append((_read_lora(path.resolve(), stat.st_mtime_ns, stat.st_size, cfg), weight))
        return out
    except LoraError as e:
        raise RequestError(str(e)) from None


@functools.lru_cache(maxsize=8)
def _read_lora(path: Path, mtime_ns: int, size: int, cfg: SDConfig):
    from ..custom.lora import read_lora

    return read_lora(path, cfg)


def custom_metadata(custom: Customizations, cfg: SDConfig, r: Request) -> dict:
    """The webui infotext fields of what a request's images were made with: `Lora hashes` (and the
    `--lora` files as `Lora`, since their tags are not in the prompt), `TI hashes` of the embeddings
    its prompts name, `VAE`/`VAE hash`, `Adapters`."""
    from ..custom.adapters import adapter_metadata
    from ..custom.embeddings import embeddings_in, ti_metadata
    from ..custom.lora import lora_metadata, lora_tag
    from ..custom.vae_file import vae_metadata

    meta = {}
    loras = request_loras(r, cfg, custom.lora_dirs)
    if r.loras:
        meta["Lora"] = " ".join(lora_tag(lora, w) for lora, w in loras[:len(r.loras)])
    meta.update(lora_metadata(loras))
    if custom.embeddings:
        meta.update(ti_metadata(embeddings_in(list(custom.embeddings), (r.prompt, r.negative_prompt))))
    if custom.vae:
        meta.update(vae_metadata(custom.vae))
    if custom.adapter_path:
        meta.update(adapter_metadata(custom.adapter_path, cfg.unet.adapters))
    if custom.safety_checker:
        from ..custom.safety_file import safety_metadata

        meta.update(safety_metadata(custom.safety_checker, custom.safety_blur))
    return meta


def lora_names(lora_dirs) -> list[str]:
    """The `<lora:NAME>` names the LoRA folders offer (a picker's choices), first folder first."""
    from ..custom.lora import LORA_SUFFIXES

    names = []
    for folder in map(Path, lora_dirs):
        if folder.is_dir():
            names += sorted(p.stem for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in LORA_SUFFIXES)
    return list(dict.fromkeys(names))


def with_tag(prompt: str, tag: str) -> str:
    """`prompt` with `tag` (a LoRA's `<lora:NAME:1>`, an embedding's name) added at its end."""
    prompt = (prompt or "").rstrip()
    return f"{prompt} {tag}" if prompt else tag
