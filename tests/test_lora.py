"""The LoRA ablation: sized to the cartridge, trained by the same loop, the model left intact."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from cartridges.lora import (
    LoraStudent,
    adapter_files,
    lora_adapter,
    lora_config_for_budget,
    trainable_parameters,
)
from cartridges.objective import held_out_kl
from cartridges.training import TrainConfig, train
from tests.training_data import setting


@pytest.fixture(scope="module")
def data():
    return setting()


def test_the_rank_is_the_largest_within_the_cartridges_budget(data):
    model, _, _, cartridge = data
    budget = trainable_parameters(cartridge)
    config = lora_config_for_budget(model, budget, ["q_proj", "v_proj"])
    with lora_adapter(model, config) as peft_model:
        used = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        per_rank = used // config.r
    assert used <= budget < used + per_rank


def test_lora_trains_on_the_same_loss_and_leaves_the_shared_model_untouched(data, tmp_path):
    model, _, examples, cartridge = data
    probe = examples[0].token_ids[None]
    before = model(input_ids=probe).logits
    config = lora_config_for_budget(model, trainable_parameters(cartridge), ["q_proj", "v_proj"])
    with lora_adapter(model, config) as peft_model:
        student = LoraStudent(peft_model)
        initial = held_out_kl(student, examples, 8, 0)
        train(
            student,
            examples,
            TrainConfig(global_batch_size=4, micro_batch_size=4, max_steps=30, warmup_steps=2),
            pad_token_id=0,
        )
        trained = held_out_kl(student, examples, 8, 0)
        adapted = peft_model(input_ids=probe).logits
        files = adapter_files(peft_model)
    assert trained < 0.9 * initial
    assert torch.equal(model(input_ids=probe).logits, before)  # adapter removed on exit
    assert not hasattr(model, "peft_config")

    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    reloaded = PeftModel.from_pretrained(model, str(tmp_path))
    try:
        assert torch.allclose(reloaded(input_ids=probe).logits, adapted, atol=1e-5)
    finally:
        reloaded.unload()


def test_unknown_target_modules_are_refused_by_name(data):
    model, _, _, cartridge = data
    with pytest.raises(ValueError, match=r"No linear layer .* named like \['query_key_value'\]"):
        lora_config_for_budget(model, trainable_parameters(cartridge), ["query_key_value"])


def test_a_budget_below_one_rank_is_refused(data):
    model, _, _, _ = data
    with pytest.raises(ValueError, match=r"cannot buy one LoRA rank"):
        lora_config_for_budget(model, 10, ["q_proj"])
