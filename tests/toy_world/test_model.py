"""The toy model's shift embedding must be invisible to the cache API (cartridges rely on it)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from cartridges.toy_world import PREV_IDS_ATTR, ToyWorldForCausalLM, language, registry
from cartridges.toy_world.tokenizer import encode_conversation


def _doc_ids(tokenizer, n_facts: int, seed: int) -> list[int]:
    doc = registry.make_registry(random.Random(seed), n_facts)
    return encode_conversation(tokenizer, [{"role": "system", "content": doc.text}])[0], doc


def _query_ids(tokenizer, doc, seed: int) -> list[int]:
    rng = random.Random(seed)
    name = rng.choice(doc.facts)[0]
    asked = registry.question(name, language.HELDOUT_TEMPLATES[0])
    text = f"<user> {asked} <end> <assistant> {name} owns"
    return tokenizer(text)["input_ids"]


@pytest.mark.parametrize("shift_width", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_prefix_cache_equals_full_sequence(tokenizer, make_tiny, shift_width, seed):
    model = make_tiny(shift_width=shift_width, init_std=0.3, seed=seed)
    d_ids, doc = _doc_ids(tokenizer, 5 + seed, seed)
    q_ids = _query_ids(tokenizer, doc, seed)
    assert q_ids[0] in model.config.segment_start_token_ids
    with torch.no_grad():
        full = model(torch.tensor([d_ids + q_ids])).logits[0, len(d_ids) :]
        prefix = model(torch.tensor([d_ids]), use_cache=True).cache
        # a cache built from bare tensors (like a cartridge) carries no previous ids
        cache = DynamicCache(
            [(layer.keys.clone(), layer.values.clone()) for layer in prefix.layers]
        )
        assert not hasattr(cache, PREV_IDS_ATTR)
        pos = torch.arange(len(d_ids), len(d_ids) + len(q_ids))[None]
        inc = model(torch.tensor([q_ids]), cache=cache, position_ids=pos).logits[0]
    assert (full - inc).abs().max().item() <= 1e-4


def test_incremental_decoding_uses_cache_attribute(tokenizer, make_tiny):
    """Token-by-token forwards (query not starting a segment) match the full forward."""
    model = make_tiny(shift_width=3, init_std=0.3)
    d_ids, doc = _doc_ids(tokenizer, 4, 3)
    with torch.no_grad():
        full = model(torch.tensor([d_ids])).logits[0]
        cache = DynamicCache()
        steps = [
            model(torch.tensor([[t]]), cache=cache, use_cache=True).logits[0, 0] for t in d_ids
        ]
        assert getattr(cache, PREV_IDS_ATTR).shape == (1, 3)
    assert (full - torch.stack(steps)).abs().max().item() <= 1e-4


def test_shift_does_not_cross_segment_start(tokenizer, make_tiny):
    """Changing tokens before a segment start never changes logits after it (beyond attention)."""
    model = make_tiny(shift_width=3, init_std=0.3)
    seg = set(model.config.segment_start_token_ids)
    ids = torch.tensor([[2, 4, 10, 11, 12, 3, 5, 13, 14, 3, 6, 15]])
    embeds, _ = model._shifted_embeddings(ids, None, None)
    ids2 = ids.clone()
    ids2[0, 4] = 20  # the token right before `<end> <user>`
    embeds2, _ = model._shifted_embeddings(ids2, None, None)
    diff = (embeds - embeds2).abs().amax(-1)[0]
    user_pos = 6
    assert ids[0, user_pos].item() in seg
    assert diff[user_pos:].max().item() == 0.0
    assert diff[5].item() > 0  # `<end>` still sees the changed token


def test_left_padding_matches_unpadded(tokenizer, make_tiny):
    model = make_tiny(shift_width=2, init_std=0.3)
    d_ids, _ = _doc_ids(tokenizer, 3, 5)
    pad = tokenizer.pad_token_id
    padded = torch.tensor([[pad] * 4 + d_ids])
    mask = torch.tensor([[0] * 4 + [1] * len(d_ids)])
    with torch.no_grad():
        ref = model(torch.tensor([d_ids])).logits[0]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(padded, attention_mask=mask, position_ids=pos).logits[0, 4:]
    assert (ref - out).abs().max().item() <= 1e-4


def _greedy_recompute(model, ids: torch.Tensor, n: int, eos: int) -> list[int]:
    out = []
    x = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(x).logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt.item())
            x = torch.cat([x, nxt], dim=1)
            if out[-1] == eos:
                break
    return out


def test_generate_with_and_without_cache(tokenizer, make_tiny):
    found_varied = False
    for seed in range(3):
        model = make_tiny(shift_width=3, init_std=0.5, seed=seed)
        d_ids, doc = _doc_ids(tokenizer, 4, seed)
        prompt = torch.tensor(
            [
                d_ids
                + tokenizer(f"<user> what does {doc.facts[0][0]} own ? <end> <assistant>")[
                    "input_ids"
                ]
            ]
        )
        kw = dict(
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        g_cache = model.generate(prompt, use_cache=True, **kw)[0, prompt.shape[1] :].tolist()
        g_plain = model.generate(prompt, use_cache=False, **kw)[0, prompt.shape[1] :].tolist()
        ref = _greedy_recompute(model, prompt, 12, tokenizer.eos_token_id)
        assert g_cache == g_plain == ref
        found_varied |= len(set(g_cache) - set(model.config.segment_start_token_ids)) >= 3
    assert found_varied, "generations too degenerate to test the shift"


def test_left_padded_batch_generate_matches_single(tokenizer, make_tiny):
    model = make_tiny(shift_width=3, init_std=0.5, seed=1)
    convs = []
    for seed, n in ((0, 2), (1, 5)):
        doc = registry.make_registry(random.Random(seed), n)
        convs.append(
            [
                {"role": "system", "content": doc.text},
                {"role": "user", "content": f"what does {doc.facts[0][0]} own ?"},
            ]
        )
    tokenizer.padding_side = "left"
    enc = tokenizer.apply_chat_template(
        convs,
        tokenize=True,
        add_generation_prompt=True,
        padding=True,
        return_tensors="pt",
        return_dict=True,
    )
    kw = dict(
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    batch = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    for r, conv in enumerate(convs):
        single = tokenizer.apply_chat_template(
            [conv], tokenize=True, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ref = model.generate(input_ids=single["input_ids"], **kw)[
            0, single["input_ids"].shape[1] :
        ].tolist()
        got = batch[r, enc["input_ids"].shape[1] :].tolist()
        got = got[: len(ref)]
        assert got == ref


def test_save_load_with_auto_classes(tokenizer, make_tiny, tmp_path):
    model = make_tiny(shift_width=2, init_std=0.3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "toy_world_llama"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ToyWorldForCausalLM)
    assert loaded.config.segment_start_token_ids == model.config.segment_start_token_ids
    ids = torch.tensor([_doc_ids(tokenizer, 3, 0)[0]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)


def test_past_key_values_keyword_and_labels(tokenizer, make_tiny):
    model = make_tiny()
    d_ids, _ = _doc_ids(tokenizer, 2, 0)
    ids = torch.tensor([d_ids])
    with torch.no_grad():
        out = model(ids, labels=ids, use_cache=True)
        assert out.loss is not None and out.cache is not None
        nxt = torch.tensor([[tokenizer.convert_tokens_to_ids("<user>")]])
        a = model(
            nxt, past_key_values=DynamicCache([(lay.keys, lay.values) for lay in out.cache.layers])
        ).logits
        b = model(torch.cat([ids, nxt], 1)).logits[:, -1:]
    assert (a - b).abs().max().item() <= 1e-4
