"""PEFT interop for generation: why ``PeftModel.generate`` answers differently, and what works.

An exported cartridge loaded with ``PeftModel.from_pretrained`` gives our forward logits exactly
(tests/test_checkpoint.py). Its ``generate`` does not: PEFT 0.21's
``prepare_inputs_for_generation`` injects the prefix as ``model_kwargs["past_key_values"]``,
a keyword transformers 5 models no longer read (they take ``cache=``), so the prompt is
prefilled into generate's own empty cache, with no prefix, at positions shifted by ``p``. The
route that works is the base model's own ``generate`` continuing from the prefix as a cache.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from cartridges.checkpoint import export_peft
from cartridges.initialization import from_token_ids
from cartridges.prefix import forward_with_prefix
from tests.architectures import build_model

PEFT_DROPS_THE_PREFIX = (
    "PEFT 0.21 puts the cartridge in model_kwargs['past_key_values'], which transformers 5 "
    "models ignore (they read `cache=`): generate prefills an empty cache without the prefix"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = build_model("llama")
    generator = torch.Generator().manual_seed(0)
    document = torch.randint(3, 100, (24,), generator=generator).tolist()
    query = torch.randint(3, 100, (1, 7), generator=generator)
    cartridge = from_token_ids(model, document, num_frozen_tokens=1)
    directory = tmp_path_factory.mktemp("peft")
    export_peft(cartridge, model, directory)
    peft_model = PeftModel.from_pretrained(build_model("llama"), str(directory))
    prefix_cache = cartridge.as_cache(1, model.config)
    ours = forward_with_prefix(model, prefix_cache, query).logits[0, -1].log_softmax(-1)
    return peft_model, cartridge, query, ours


def _first_token_logprobs(model, **inputs) -> torch.Tensor:
    out = model.generate(
        **inputs,
        max_new_tokens=1,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out.scores[0][0].log_softmax(-1)


@pytest.mark.xfail(strict=True, reason=PEFT_DROPS_THE_PREFIX)
def test_peft_generate_matches_our_answer(setup):
    peft_model, _, query, ours = setup
    theirs = _first_token_logprobs(
        peft_model, input_ids=query, attention_mask=torch.ones_like(query)
    )
    assert (theirs - ours).abs().max() <= 1e-5


def test_the_cause_peft_generate_prefills_an_empty_cache(setup):
    peft_model, _, query, _ = setup
    seen: list[dict] = []

    def record(module, args, kwargs):
        cache_length = kwargs["cache"].get_seq_length()  # now: the forward will extend it
        seen.append({"cache_length": cache_length, "position_ids": kwargs.get("position_ids")})

    handle = peft_model.get_base_model().model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        peft_model.generate(
            input_ids=query,
            attention_mask=torch.ones_like(query),
            max_new_tokens=1,
            do_sample=False,
        )
    finally:
        handle.remove()
    prefill = seen[0]
    assert prefill["cache_length"] == 0  # the cartridge never reached the model
    assert (
        prefill["position_ids"][0, 0].item() == peft_model.peft_config["default"].num_virtual_tokens
    )


def test_the_working_route_generates_from_the_prefix_as_a_cache(setup):
    peft_model, cartridge, query, ours = setup
    mask = torch.ones(1, cartridge.num_tokens + query.shape[1], dtype=torch.long)
    theirs = _first_token_logprobs(
        peft_model.get_base_model(),
        input_ids=query,
        attention_mask=mask,
        cache=peft_model.get_prompt(batch_size=1),
    )
    assert (theirs - ours).abs().max() <= 1e-5
