"""Short hashes of checkpoint, LoRA, embedding and VAE files as AUTOMATIC1111's webui writes them into `parameters`,
so that tools reading webui infotext (and model-sharing sites) recognise the files.

- LoRA: the first 12 hex digits of the SHA-256 of the file; for a .safetensors file, of its tensor
  bytes only (after the 8-byte length and the JSON header: kohya-ss' "addnet" hash, which the webui uses
  for .safetensors LoRAs). Listed as `Lora hashes: "name: 0123456789ab, other: ..."`.
- Textual inversion: the first 12 hex digits of the file's SHA-256 (`TI hashes: "name: ..."`).
- VAE: the first 10 hex digits of the file's SHA-256 (`VAE hash: ...`, next to `VAE: <file name>`).
Names lose their `:` and `,`, as the webui strips them, so the list stays parseable.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_BLOCK = 1 << 20
HASH_CHUNK = 1 << 20  # file_hash reads this much from each end of the file


def sha256_of(path: str | Path, skip_safetensors_header: bool = False) -> str:
    """Hex SHA-256 of a file, or of a .safetensors file's bytes after its header."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_safetensors_header:
            header = int.from_bytes(f.read(8), "little")  # safetensors: u64 little-endian header length
            f.seek(8 + header)
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def lora_hash(path: str | Path) -> str:
    path = Path(path)
    return sha256_of(path, skip_safetensors_header=path.suffix.lower() == ".safetensors")[:12]


def embedding_hash(path: str | Path) -> str:
    return sha256_of(path)[:12]


def vae_hash(path: str | Path) -> str:
    return sha256_of(path)[:10]


def hash_list(named: list[tuple[str, str]]) -> str:
    """[(name, hash)] -> `name: hash, name2: hash2`, names without `:` and `,` (webui infotext)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in named)


def file_hash(path: str | os.PathLike, chunk: int = HASH_CHUNK) -> str:
    """Short, cheap fingerprint of a (multi-GB) checkpoint: the first 8 hex chars of
    sha256(decimal size + b"\\n" + first `chunk` bytes + last `chunk` bytes), the two ends not
    overlapping for files under 2 * chunk (such files are hashed whole). Reads at most 2 MiB.
    Our own scheme: not comparable with the "Model hash" of other tools.
    """
    size = os.path.getsize(path)
    h = hashlib.sha256(f"{size}\n".encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read())
    return h.hexdigest()[:8]
