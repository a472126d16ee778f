"""Quick measurements of the toy-world model: does it read its context, and does it self-study?

Used by the pretraining loop (to track progress and report at the end) and by the tests that
check the committed model. Exact match is measured teacher-forced: the reply is correct iff the
model's argmax at every reply position (content words and the closing ``<end>``) is the expected
token, which is the same as greedy generation producing exactly that reply and stopping.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.modeling import pad_token_id
from cartridges.toy_world.conversations import assistant_reply, mentioned_names, seed_prompt
from cartridges.toy_world.language import ASK_TEMPLATES, HELDOUT_TEMPLATES, SEED_TYPES
from cartridges.toy_world.registry import Registry, heldout_questions, make_registry
from cartridges.toy_world.tokenizer import encode_conversation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QAItem:
    """One question with its exact expected reply; ``context`` is the registry's text or None."""

    context: str | None
    question: str
    answer: str


def _prompt_messages(context: str | None, user: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": context}] if context is not None else []
    return msgs + [{"role": "user", "content": user}]


@torch.no_grad()
def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: list[QAItem],
    batch_size: int = 64,
) -> list[bool]:
    """Teacher-forced exact match of each item's reply (see the module docstring)."""
    vocab = tokenizer.get_vocab()
    pad, eos = pad_token_id(tokenizer), tokenizer.eos_token_id
    results: list[bool] = []
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        seqs, spans = [], []
        for it in chunk:
            prompt, _ = encode_conversation(
                tokenizer, _prompt_messages(it.context, it.question), add_generation_prompt=True
            )
            target = [vocab.get(w, tokenizer.unk_token_id) for w in it.answer.split()] + [eos]
            seqs.append(prompt + target)
            spans.append((len(prompt), len(target)))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        pred = logits.argmax(-1).cpu()
        for r, (p0, n) in enumerate(spans):
            results.append(bool(torch.equal(pred[r, p0 - 1 : p0 - 1 + n], ids[r, p0 : p0 + n])))
    return results


def heldout_items(
    n_questions: int,
    n_facts: int = 32,
    seed: int = 12345,
    template: str = HELDOUT_TEMPLATES[0],
) -> tuple[list[QAItem], list[QAItem]]:
    """Fresh registries, one held-out-template question each: (with context, without context)."""
    rng = random.Random(seed)
    with_ctx, no_ctx = [], []
    for k in range(n_questions):
        doc = make_registry(rng, n_facts, doc_id=f"eval_{k}")
        qa = heldout_questions(doc, rng, n=1, template=template)[0]
        with_ctx.append(QAItem(doc.text, qa.question, qa.answer))
        no_ctx.append(QAItem(None, qa.question, qa.answer))
    return with_ctx, no_ctx


@torch.no_grad()
def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int = 24,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Assistant replies to chats (left-padded batch, HF ``generate``), decoded without specials."""
    enc = tokenizer.apply_chat_template(
        conversations,
        tokenize=True,
        add_generation_prompt=True,
        padding=True,
        return_tensors="pt",
        return_dict=True,
        tokenizer_kwargs={"padding_side": "left"},  # the caller's tokenizer is left as it is
    )
    kwargs = (
        dict(do_sample=False)
        if temperature <= 0
        else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    )
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id(tokenizer),
        **kwargs,
    )
    new = out[:, enc["input_ids"].shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def self_study_check(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    n_docs: int = 4,
    n_questions_per_doc: int = 32,
    n_facts: int = 32,
    seed: int = 777,
    temperature: float = 0.6,
) -> dict[str, float]:
    """Run bot A (seed prompt -> message) and bot B (message -> reply) as self-study would.

    Per document, ``n_questions_per_doc`` messages for the ``question``/``generic`` seeds and two
    for each other seed type, sampled at ``temperature``. Reports: the fraction of question-seed
    messages that are an ask template about a name of the document; their name coverage
    (distinct names asked / names in the document; uniform sampling of as many questions as
    names would give 1 - 1/e = 0.63); the fraction of all messages mentioning only names of the
    document; bot B's exact-match accuracy on replies to those messages (document in context).
    """
    rng = random.Random(seed)
    docs = [make_registry(rng, n_facts, doc_id=f"ss_{k}") for k in range(n_docs)]
    ask_forms = {tpl.format(name="{}") for tpl in ASK_TEMPLATES}
    q_ok = q_total = all_total = 0
    covered = []
    bot_b_items: list[tuple[Registry, str]] = []
    for doc in docs:
        types = [("question", "generic")[j % 2] for j in range(n_questions_per_doc)]
        types += [st for st in SEED_TYPES if st not in ("question", "generic") for _ in range(2)]
        convs = [_prompt_messages(doc.text, seed_prompt(st, rng)) for st in types]
        msgs = generate_replies(
            model, tokenizer, convs, temperature=temperature, seed=rng.randrange(1 << 30)
        )
        names_seen = set()
        doc_names = dict(doc.facts)
        for st, msg in zip(types, msgs, strict=True):
            names = mentioned_names(msg)
            well_formed = bool(names) and all(n in doc_names for n in names)
            if st in ("question", "generic"):
                q_total += 1
                form = " ".join("{}" if w in doc_names else w for w in msg.split())
                if form in ask_forms and well_formed:
                    q_ok += 1
                    names_seen.add(names[0])
            all_total += 1
            if well_formed:
                bot_b_items.append((doc, msg))
        covered.append(len(names_seen) / len(doc.facts))
    items = [QAItem(doc.text, msg, assistant_reply(doc, msg)) for doc, msg in bot_b_items]
    b_ok = exact_match(model, tokenizer, items) if items else []
    return {
        "seed_question_well_formed": q_ok / max(q_total, 1),
        "seed_question_name_coverage": sum(covered) / max(len(covered), 1),
        "bot_a_well_formed": len(bot_b_items) / max(all_total, 1),
        "bot_b_exact_match": sum(b_ok) / max(len(items), 1),
    }


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    n_questions: int = 200,
    n_facts: int = 32,
    seed: int = 12345,
    with_self_study: bool = True,
) -> dict[str, float]:
    """Held-out ICL and no-context exact match on fresh registries (each template), plus
    self-study."""
    metrics: dict[str, float] = {}
    for k, tpl in enumerate(HELDOUT_TEMPLATES + ASK_TEMPLATES):
        with_ctx, no_ctx = heldout_items(n_questions, n_facts, seed + k, tpl)
        tag = f"heldout{k}" if k < len(HELDOUT_TEMPLATES) else f"ask{k - len(HELDOUT_TEMPLATES)}"
        metrics[f"icl_{tag}"] = sum(exact_match(model, tokenizer, with_ctx)) / n_questions
        metrics[f"no_context_{tag}"] = sum(exact_match(model, tokenizer, no_ctx)) / n_questions
    metrics["icl"] = metrics["icl_heldout0"]
    metrics["no_context"] = metrics["no_context_heldout0"]
    if with_self_study:
        metrics.update(self_study_check(model, tokenizer, n_facts=n_facts, seed=seed + 99))
    return metrics
