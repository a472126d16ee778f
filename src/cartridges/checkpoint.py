"""Cartridge files: our safetensors format, PEFT's CARTRIDGE adapter, the reference's torch file.

Our format is ONE ``.safetensors`` file: the four tensors of a
:class:`~cartridges.cartridge.Cartridge` and, in the header metadata, the model name and
fingerprint, p, the frozen count, dtype, the initialiser, the source corpus hash, the package
version and a SHA-256 of the tensors' bytes, verified on every load (a changed byte is refused).
One file (not a folder) so that a versioned catalog entry and an MLflow artifact are a single
object; safetensors so that loading never runs pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from cartridges import __version__
from cartridges.cartridge import Cartridge, CartridgeInfo
from cartridges.files import atomic_write
from cartridges.modeling import kv_layout, model_fingerprint

FORMAT = "cartridges/1"
_TENSORS = ("frozen_keys", "frozen_values", "trainable_keys", "trainable_values")


class CartridgeFormatError(ValueError):
    """A file that is not a readable cartridge."""


# --------------------------------------------------------------------------- our own format
def save_cartridge(cartridge: Cartridge, path: str | os.PathLike) -> None:
    """Write ``cartridge`` to one safetensors file, atomically (a crash leaves no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(cartridge, name).detach().contiguous().cpu() for name in _TENSORS}
    metadata = {
        "format": FORMAT,
        "num_tokens": str(cartridge.num_tokens),
        "num_frozen_tokens": str(cartridge.num_frozen_tokens),
        "dtype": str(cartridge.dtype).removeprefix("torch."),
        "layout": json.dumps(asdict(cartridge.layout)),
        "info": json.dumps(_stored_info(cartridge)),
        "package_version": __version__,
        "content_sha256": _content_digest(tensors),
    }
    with atomic_write(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def _content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' raw bytes, in file order (any dtype, bfloat16 included)."""
    digest = hashlib.sha256()
    for name in _TENSORS:
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _stored_info(cartridge: Cartridge) -> dict:
    """The provenance to write: without the version a dataset noted when it was read."""
    info = asdict(cartridge.info)
    info["extra"] = {k: v for k, v in info["extra"].items() if k != "catalog_version"}
    return info


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a cartridge file, without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
        raise CartridgeFormatError(
            f"'{path}' is not a readable safetensors file: {error}"
        ) from error
    if metadata.get("format") != FORMAT:
        raise CartridgeFormatError(
            f"'{path}' is not a cartridge file (format {metadata.get('format')!r}, "
            f"expected {FORMAT!r})."
        )
    return metadata


def load_cartridge(
    path: str | os.PathLike,
    model: PreTrainedModel | None = None,
    device: str | torch.device = "cpu",
) -> Cartridge:
    """Read a cartridge file; with ``model`` given, refuse it unless it was made for that model."""
    metadata = read_metadata(path)
    tensors = load_file(str(path))
    expected = metadata.get("content_sha256")  # absent in files written before it was kept
    if expected is not None and (found := _content_digest(tensors)) != expected:
        raise CartridgeFormatError(
            f"Cartridge '{path}' does not hold the bytes it was saved with: its tensors hash to "
            f"{found}, its header records {expected}. The file was corrupted or edited after it "
            "was written; train it again or restore a copy."
        )
    tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    keys = torch.cat([tensors["frozen_keys"], tensors["trainable_keys"]], dim=2)
    values = torch.cat([tensors["frozen_values"], tensors["trainable_values"]], dim=2)
    info = CartridgeInfo(**json.loads(metadata["info"]))
    cartridge = Cartridge(keys, values, int(metadata["num_frozen_tokens"]), info=info)
    if model is not None:
        cartridge.check_compatible(model)
    return cartridge


# --------------------------------------------------------------------------- PEFT adapters
def export_peft(cartridge: Cartridge, model: PreTrainedModel, directory: str | os.PathLike) -> Path:
    """Write ``cartridge`` as a PEFT CARTRIDGE adapter, loadable with ``PeftModel.from_pretrained``.

    PEFT stores one ``prompt_embeddings`` matrix ``[p, layers * 2 * kv_heads * head_dim]``: each
    row holds, layer by layer, that token's keys then values (heads x head_dim).
    """
    from peft import CartridgeConfig

    cartridge.check_compatible(model)
    layout = cartridge.layout
    config = CartridgeConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=cartridge.num_tokens,
        num_frozen_tokens=cartridge.num_frozen_tokens,
        base_model_name_or_path=str(model.name_or_path),
        num_layers=layout.num_layers,
        num_attention_heads=layout.num_kv_heads,
        token_dim=layout.num_kv_heads * layout.head_dim,
        num_transformer_submodules=1,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    kv = torch.stack([cartridge.keys, cartridge.values], dim=1)  # [L, 2, H, p, D]
    embeddings = kv.permute(3, 0, 1, 2, 4).reshape(cartridge.num_tokens, -1)  # [p, L*2*H*D]
    save_file(
        {"prompt_embeddings": embeddings.detach().contiguous().cpu()},
        str(directory / "adapter_model.safetensors"),
    )
    return directory


def import_peft(directory: str | os.PathLike, model: PreTrainedModel) -> Cartridge:
    """Read a PEFT CARTRIDGE (or plain prefix-tuning) adapter directory into a cartridge."""
    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    weights_path = directory / "adapter_model.safetensors"
    if not config_path.exists() or not weights_path.exists():
        raise CartridgeFormatError(
            f"'{directory}' is not a PEFT adapter: expected adapter_config.json and "
            "adapter_model.safetensors in it."
        )
    config = json.loads(config_path.read_text())
    if config.get("peft_type") not in ("CARTRIDGE", "PREFIX_TUNING"):
        raise CartridgeFormatError(
            f"'{directory}' holds a {config.get('peft_type')} adapter, not a CARTRIDGE adapter."
        )
    if config.get("prefix_projection"):
        raise CartridgeFormatError("Prefix-tuning adapters with prefix_projection=True hold no KV.")
    embeddings = load_file(str(weights_path))["prompt_embeddings"]
    layout = kv_layout(model)
    num_tokens = embeddings.shape[0]
    expected = layout.num_layers * 2 * layout.num_kv_heads * layout.head_dim
    if embeddings.shape[1] != expected:
        raise CartridgeFormatError(
            f"Adapter rows hold {embeddings.shape[1]} values but model '{model.name_or_path}' "
            f"needs "
            f"{expected} (layers={layout.num_layers} x 2 x kv_heads={layout.num_kv_heads} x "
            f"head_dim={layout.head_dim})."
        )
    kv = embeddings.reshape(num_tokens, layout.num_layers, 2, layout.num_kv_heads, layout.head_dim)
    kv = kv.permute(1, 2, 3, 0, 4)  # [L, 2, H, p, D]
    info = CartridgeInfo(
        model_name=config.get("base_model_name_or_path") or str(model.name_or_path),
        model_fingerprint=model_fingerprint(model),
        initializer="peft",
    )
    frozen = int(config.get("num_frozen_tokens", 0))
    return Cartridge(kv[:, 0], kv[:, 1], num_frozen_tokens=frozen, info=info)


# --------------------------------------------------------------------------- reference files
def import_reference(path: str | os.PathLike, model: PreTrainedModel | None = None) -> Cartridge:
    """Read a checkpoint saved by the reference implementation (``torch.save`` of a dict).

    The dict holds per-layer lists (or ``nn.ParameterList``) of ``(1, kv_heads, T, head_dim)``
    tensors under ``trainable_keys``/``trainable_values`` and ``frozen_keys``/``frozen_values``
    (older files: ``fixed_keys``/``fixed_values``). Loaded with ``weights_only=True``: no
    arbitrary code runs, only the container classes those files use are allowed.
    """
    with torch.serialization.safe_globals([nn.ParameterList, nn.Parameter]):
        try:
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises many types for bad pickles
            raise CartridgeFormatError(
                f"Could not read '{path}' as a reference cartridge checkpoint: {error}"
            ) from error
    if not isinstance(checkpoint, dict):
        raise CartridgeFormatError(f"'{path}' holds a {type(checkpoint).__name__}, not a dict.")
    prefix = "frozen" if "frozen_keys" in checkpoint else "fixed"
    missing = [
        key
        for key in ("trainable_keys", "trainable_values", f"{prefix}_keys", f"{prefix}_values")
        if key not in checkpoint
    ]
    if missing:
        raise CartridgeFormatError(f"'{path}' lacks {missing}; keys present: {sorted(checkpoint)}.")

    def stacked(name: str) -> torch.Tensor | None:
        tensors = [torch.as_tensor(t.detach()) for t in checkpoint[name]]
        return torch.stack([t[0] for t in tensors]) if tensors else None  # [L, H, T, D]

    trainable_keys, trainable_values = stacked("trainable_keys"), stacked("trainable_values")
    frozen_keys, frozen_values = stacked(f"{prefix}_keys"), stacked(f"{prefix}_values")
    if frozen_keys is None:
        frozen_keys = trainable_keys[:, :, :0]
        frozen_values = trainable_values[:, :, :0]
    info = CartridgeInfo(initializer="reference", extra={"source_file": Path(path).name})
    if model is not None:
        info.model_name = str(model.name_or_path)
        info.model_fingerprint = model_fingerprint(model)
    cartridge = Cartridge(
        torch.cat([frozen_keys, trainable_keys], dim=2),
        torch.cat([frozen_values, trainable_values], dim=2),
        num_frozen_tokens=frozen_keys.shape[2],
        info=info,
    )
    if model is not None:
        cartridge.check_compatible(model)
    return cartridge


def export_reference(cartridge: Cartridge, path: str | os.PathLike) -> Path:
    """Write ``cartridge`` as the reference implementation saves its trainable cache.

    A ``torch.save`` dict of per-layer ``nn.ParameterList``s of ``(1, kv_heads, T, head_dim)``
    tensors: ``trainable_keys``/``trainable_values`` and ``fixed_keys``/``fixed_values`` (the
    frozen attention-sink tokens; ``T = 0`` when there are none, so every list has one entry per
    layer). That is the file the reference's cache loader and its Tokasaurus-based server read,
    so a cartridge trained here can be served there on GPUs; :func:`import_reference` reads it
    back exactly.
    """
    frozen = cartridge.num_frozen_tokens

    def per_layer(tensor: torch.Tensor, tokens: slice) -> nn.ParameterList:
        parts = tensor.detach().cpu()[:, :, tokens]  # [L, H, T, D]
        return nn.ParameterList(
            nn.Parameter(layer[None].clone().contiguous(), requires_grad=False) for layer in parts
        )

    state = {
        "trainable_keys": per_layer(cartridge.keys, slice(frozen, None)),
        "trainable_values": per_layer(cartridge.values, slice(frozen, None)),
        "fixed_keys": per_layer(cartridge.keys, slice(0, frozen)),
        "fixed_values": per_layer(cartridge.values, slice(0, frozen)),
    }
    with atomic_write(path) as temporary:
        torch.save(state, temporary)
    return Path(path)
