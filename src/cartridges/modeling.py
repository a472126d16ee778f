"""Load a frozen causal LM and describe the shape of its KV cache.

Everything here works from ``model.config`` and from one real forward pass, never from tables
keyed on a model family: any Hugging Face causal LM that speaks the standard cache API works.
Architectures that transformers does not ship (the toy world's, or a user's own) plug in through
the ``cartridges.models`` entry-point group: this module imports no model code of its own.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from itertools import chain
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cartridges.gguf import converted_folder, gguf_file, source_record

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# Config keys that do not change what the model computes; left out of the fingerprint so that a
# model re-saved elsewhere, or loaded in another dtype, still matches its cartridges.
_FINGERPRINT_IGNORED_KEYS = {
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "architectures",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


class ModelNotFoundError(OSError):
    """A model name or path that cannot be resolved on this machine."""


@dataclass(frozen=True)
class KVLayout:
    """Shape of one token's KV entry: per layer, keys and values of ``(kv_heads, head_dim)``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None  # smallest attention window among the layers, if any

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV cache bytes one token occupies across all layers (keys and values)."""
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn a parameter string such as ``"bfloat16"`` into a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}.") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA when there is one, else the CPU.

    Under a distributed launcher (``LOCAL_RANK`` set), ``auto`` and ``cuda`` mean this
    process's own GPU.
    """
    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return torch.device(device)


def synchronize(model: PreTrainedModel) -> None:
    """Wait for the model's device to finish queued work (timings on a GPU need it)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def check_device_runs(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a device that is absent, or a dtype it cannot run, before any weight is read.

    Raises:
        ValueError: naming the ``model`` key to change and the values that work here.
    """
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(
            f"model.device is '{device}' but no CUDA device is available here: use "
            "model.device: auto (CUDA when there is one, else the CPU) or cpu."
        )
    count = torch.cuda.device_count()
    if (device.index or 0) >= count:
        raise ValueError(
            f"model.device is '{device}' but this machine has {count} CUDA device(s): use "
            f"cuda:0 to cuda:{count - 1}, or auto."
        )
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"model.dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}: "
            "use model.dtype: float16 (and distill_training.train.mixed_precision: none) or "
            "float32."
        )


MODEL_PLUGINS = "cartridges.models"
"""Entry-point group of model plugins: each entry names a module (or an object in one) whose
import registers an architecture with the transformers Auto classes, e.g. in ``pyproject.toml``::

    [project.entry-points."cartridges.models"]
    my_arch = "my_package.modeling"
"""


@functools.cache
def load_model_plugins() -> tuple[str, ...]:
    """Import every installed model plugin once; return the names of those that loaded.

    A plugin whose own dependencies are missing is skipped with a warning, so that it cannot
    keep the models transformers ships from loading; any other error in a plugin is raised.
    """
    loaded = []
    for plugin in entry_points(group=MODEL_PLUGINS):
        try:
            plugin.load()
        except ImportError as error:
            logger.warning("Skipped model plugin %r (%s): %s", plugin.name, plugin.value, error)
            continue
        loaded.append(plugin.name)
    return tuple(loaded)


def model_folder(name_or_path: str | os.PathLike) -> str:
    """What transformers loads for ``name_or_path``: the name itself (a hub name or a model
    directory), or, for a GGUF file (or a packaged one's short name), its converted folder."""
    file = gguf_file(name_or_path)
    return str(converted_folder(file)) if file is not None else str(name_or_path)


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub name, local directory or GGUF file, with a clear error offline."""
    load_model_plugins()
    folder = model_folder(name_or_path)  # a bad GGUF file is refused here, naming the file
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise _not_found(name_or_path, error) from error
    tokenizer.name_or_path = str(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class _Loaded:
    """A loaded model, never handed out itself, and its tensors' versions when it was loaded."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    versions: tuple[int, ...]


# Loaded models, most recently used last; see load_model. The lock keeps two threads (a server's
# workers) from reading the same weights twice.
_LOADED: OrderedDict[tuple[str, str, str], _Loaded] = OrderedDict()
_LOADED_MAX = 4
_LOADING = threading.Lock()


def load_model(
    name_or_path: str | os.PathLike, dtype: str = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its tokenizer; the weights are read once per process.

    The model is put in eval mode with every weight's ``requires_grad`` off: cartridges train a
    KV prefix, never the model. Each call gets its own module objects and tokenizer, sharing
    one copy of the weight tensors, so that what a caller does to its model (a PEFT adapter, a
    hook, ``requires_grad_``, ``.to()``) never reaches another caller. Only changing the weights
    in place is shared; it is detected (by the tensors' version counters) and the next call
    reads the weights again.

    Args:
        name_or_path: a Hugging Face hub name or a local directory.
        dtype: parameter dtype (``float32``, ``bfloat16``, ``float16``).
        device: ``cpu``, ``cuda``, ``cuda:1``, ... or ``auto``.
    """
    key = (str(name_or_path), str(dtype), str(device))
    with _LOADING:
        loaded = _LOADED.get(key)
        if loaded is not None and _versions(loaded.model) != loaded.versions:
            logger.warning("The weights of %s were changed in place: loading them again", key[0])
            loaded = None
        if loaded is None:
            model, tokenizer = _read_model(*key)
            loaded = _Loaded(model, tokenizer, _versions(model))
        _LOADED[key] = loaded
        _LOADED.move_to_end(key)
        while len(_LOADED) > _LOADED_MAX:
            _LOADED.popitem(last=False)
    return _own_copy(loaded.model), copy.deepcopy(loaded.tokenizer)


def _read_model(
    name_or_path: str, dtype: str, device: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    check_device_runs(torch_device, torch_dtype)
    tokenizer = load_tokenizer(name_or_path)
    folder = model_folder(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise _not_found(name_or_path, error) from error
    # the name the user gave, not a cache folder
    model.config._name_or_path = model.name_or_path = name_or_path
    if (source := source_record(folder)) is not None:
        logger.info("%s: GGUF file %s, sha256 %s", name_or_path, source["file"], source["sha256"])
    model.to(torch_device).eval()
    model.requires_grad_(False)
    logger.info(
        "Loaded %s (%s, %.1fM parameters) on %s",
        name_or_path,
        model.config.model_type,
        sum(p.numel() for p in model.parameters()) / 1e6,
        model.device,
    )
    return model, tokenizer


def _versions(model: PreTrainedModel) -> tuple[int, ...]:
    """Each weight's version counter: it moves whenever the tensor is changed in place."""
    return tuple(t._version for t in chain(model.parameters(), model.buffers()))


def _own_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A deep copy of ``model`` whose parameters and buffers are new tensors on the same storage.

    New tensor objects (not the shared ones) so that ``requires_grad_`` or ``.to()`` on the copy
    stays with the copy; the same storage so that the weights exist once in memory.
    """
    memo: dict[int, torch.Tensor] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = torch.nn.Parameter(parameter.detach(), requires_grad=False)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach()
    return copy.deepcopy(model, memo)


def load_model_from(spec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_model` for a ``model`` parameter block (``ModelParams`` or a mapping)."""
    fields = spec if isinstance(spec, Mapping) else vars(spec)
    return load_model(
        fields["name_or_path"], fields.get("dtype", "float32"), fields.get("device", "cpu")
    )


def context_length(config) -> int | None:
    """How many positions the model attends over, read from its (text) config; ``None`` if unsaid.

    Multimodal models keep it in a nested ``text_config``; ``get_text_config`` finds it there.
    """
    value = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    return int(value) if value else None


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills padding: the tokenizer's pad token, else its end of sequence, else 0.

    Padding is never attended to, so any id is correct; a real token keeps embeddings in range.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _not_found(name_or_path: str | os.PathLike, error: Exception) -> ModelNotFoundError:
    if Path(name_or_path).exists():
        return ModelNotFoundError(
            f"Could not load a model from local path '{name_or_path}': {error}"
        )
    return ModelNotFoundError(
        f"Could not resolve model '{name_or_path}': it is not a local directory and it is not "
        "in the local Hugging Face cache (this machine may be offline). Either download it "
        f"on a connected machine (`hf download {name_or_path}`) and copy the "
        "cache over, or set `model.name_or_path` in conf/<env>/parameters.yml to a local "
        f"directory holding the model's config, weights and tokenizer. Original error: {error}"
    )


# Per-model results of kv_layout and model_fingerprint: models are frozen, and both are asked
# for on hot paths (every prefix built during self-study, every compatibility check).
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kv_layout(model: PreTrainedModel) -> KVLayout:
    """Read the KV layout from a one-token forward pass, so that no naming convention is assumed."""
    if model not in _LAYOUTS:
        _LAYOUTS[model] = _read_kv_layout(model)
    return _LAYOUTS[model]


@torch.no_grad()
def _read_kv_layout(model: PreTrainedModel) -> KVLayout:
    ids = torch.zeros((1, 1), dtype=torch.long, device=model.device)
    cache = model(input_ids=ids, use_cache=True).cache
    shapes = {tuple(layer.keys.shape[1:]) for layer in cache.layers} | {
        tuple(layer.values.shape[1:]) for layer in cache.layers
    }
    if len(shapes) != 1:
        raise NotImplementedError(
            f"Layers with different KV shapes {sorted(shapes)} are not supported by cartridges yet."
        )
    ((num_kv_heads, _, head_dim),) = shapes
    return KVLayout(
        num_layers=len(cache.layers),
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        sliding_window=sliding_window(model.config),
    )


def sliding_window(config) -> int | None:
    """The smallest sliding attention window any layer uses, or ``None`` for full attention."""
    config = config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


# Inputs some models hand their attention function that the project's own attention functions
# (packed training's block-sparse rows, shared-prefix decoding) do not compute: each refuses a
# call that passes one, naming it, rather than return something else. One list, asked by both.
UNSUPPORTED_ATTENTION_INPUTS = {
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "position_bias": "a position bias",
    "alibi_slopes": "ALiBi slopes",
}


def unsupported_attention_inputs(kwargs: Mapping[str, object]) -> list[str]:
    """What an attention call passes (``kwargs``) that no attention function here computes."""
    return [
        what for name, what in UNSUPPORTED_ATTENTION_INPUTS.items() if kwargs.get(name) is not None
    ]


def model_fingerprint(model: PreTrainedModel) -> str:
    """A short hash of the architecture config and a sample of the weights.

    Equal fingerprints mean the model computes the same KV caches, so a cartridge trained on one
    works on the other. The weight sample is rounded to bfloat16 first, so that the same
    checkpoint loaded in float32 or bfloat16 keeps its fingerprint.
    """
    if model not in _FINGERPRINTS:
        _FINGERPRINTS[model] = _compute_fingerprint(model)
    return _FINGERPRINTS[model]


def _compute_fingerprint(model: PreTrainedModel) -> str:
    config = {
        key: value
        for key, value in model.config.to_dict().items()
        if key not in _FINGERPRINT_IGNORED_KEYS
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    parameters = list(model.parameters())
    for parameter in (parameters[0], parameters[-1]):
        sample = parameter.detach().flatten()[:4096].to("cpu", torch.bfloat16).float()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
