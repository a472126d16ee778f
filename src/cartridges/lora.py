"""The parameterisation ablation: a LoRA adapter trained exactly like a cartridge.

The paper compares a trainable KV prefix with LoRA at equal size, on the same synthetic data
and the same distillation loss. Here the adapter is a :class:`~cartridges.objective.Student`
scored by the same objective and trained by the same loop (``cartridges.training``: batching,
schedule, checkpoints, data parallelism), its rank chosen so that it trains no more parameters
than the cartridge it is compared with.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from cartridges.batching import Batch
from cartridges.cartridge import Cartridge
from cartridges.objective import loss_sum


def trainable_parameters(cartridge: Cartridge) -> int:
    """Parameters a cartridge trains: keys and values of its non-frozen positions."""
    return sum(p.numel() for p in cartridge.parameters() if p.requires_grad)


def lora_config_for_budget(
    model: PreTrainedModel, budget: int, target_modules: Sequence[str], alpha_per_rank: float = 2.0
) -> LoraConfig:
    """The largest-rank LoRA on ``target_modules`` that trains at most ``budget`` parameters.

    A rank-r adapter on a ``d_in x d_out`` linear layer trains ``r * (d_in + d_out)``.
    """
    suffixes = tuple(target_modules)
    per_rank = sum(
        module.in_features + module.out_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in suffixes
    )
    if per_rank == 0:
        raise ValueError(
            f"No linear layer of '{model.name_or_path}' is named like {list(target_modules)}; "
            "set lora_baseline.target_modules to its projection names (e.g. q_proj, v_proj)."
        )
    rank = budget // per_rank
    if rank < 1:
        raise ValueError(
            f"A cartridge of {budget} trainable parameters cannot buy one LoRA rank on "
            f"{list(target_modules)} ({per_rank} parameters per rank); target fewer modules."
        )
    return LoraConfig(
        r=rank,
        lora_alpha=alpha_per_rank * rank,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )


@contextmanager
def lora_adapter(model: PreTrainedModel, config: LoraConfig) -> Iterator[PeftModel]:
    """A fresh adapter on the shared frozen model, removed again on exit.

    ``get_peft_model`` edits the model in place, so the adapter is removed on exit and the
    caller's model is plain again (other callers of :func:`~cartridges.modeling.load_model` get
    their own module objects either way).
    """
    peft_model = get_peft_model(model, config)
    try:
        yield peft_model
    finally:
        peft_model.unload()
        if hasattr(model, "peft_config"):
            del model.peft_config


@dataclass
class LoraStudent:
    """The ablation: the model with a LoRA adapter reads each conversation with no prefix."""

    model: PeftModel
    loss_chunk_size: int = 0

    @property
    def prefix_len(self) -> int:
        return 0

    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def loss_sum(self, batch: Batch, kl: bool = False) -> torch.Tensor:
        return loss_sum(self.model, None, batch, kl, self.loss_chunk_size)


def adapter_files(peft_model: PeftModel) -> dict[str, bytes]:
    """The adapter as PEFT writes it (``PeftModel.from_pretrained`` reads it back)."""
    with tempfile.TemporaryDirectory() as directory:
        peft_model.save_pretrained(directory)
        return {path.name: path.read_bytes() for path in sorted(Path(directory).iterdir())}
