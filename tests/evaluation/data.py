"""Small evaluation inputs built on the tiny model: corpus, questions, conversations."""

from __future__ import annotations

import json

import pandas as pd
from transformers import PreTrainedTokenizerBase

from cartridges.chat import continuation_ids
from cartridges.evaluation import EvalConfig
from cartridges.modeling import load_tokenizer
from cartridges_testing.tiny_model import CHAT_TEMPLATE
from tests.conftest import CORPUS

SYSTEM_PROMPT = "Conversation about:\n{chunk}"
SYSTEM_TEXT = SYSTEM_PROMPT.format(chunk=CORPUS)
FAST = EvalConfig(max_new_tokens=4, batch_size=2, decode_tokens=2, cost_repeats=1)
QUESTIONS = [
    {"question": "Who built the pump?", "answer": "Halvard Industrial"},
    {"question": "How often is the seal replaced?", "answer": "every 18 months"},
    {"question": "Which alarm means a seal leak?", "answer": "B", "options": ["E12", "E21"]},
]


def write_questions(path, records=QUESTIONS) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def conversation_tables(tokenizer, count: int = 2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``conversations`` and ``teacher_logprobs`` as self-study writes them (one target each)."""
    rows, targets = [], []
    for index in range(count):
        messages = [
            {"role": "user", "content": f"Question {index}: what does E21 mean?"},
            {"role": "assistant", "content": "A seal leak on the Aurora pump."},
        ]
        prompt = continuation_ids(tokenizer, SYSTEM_TEXT, messages[:1], True)
        token_ids = continuation_ids(tokenizer, SYSTEM_TEXT, messages)
        cid = f"c{index}"
        rows.append(
            {"conversation_id": cid, "messages": json.dumps(messages), "token_ids": token_ids}
        )
        targets += [
            {"conversation_id": cid, "position": p, "token_id": token_ids[p], "logprob": 0.0}
            for p in range(len(prompt), len(token_ids))
        ]
    return pd.DataFrame(rows), pd.DataFrame(targets)


# The tiny template with a Qwen3-style switch: enable_thinking=false appends a marker token after
# the generation prompt, so that a prompt shows whether the switch reached the template.
SWITCH_MARKER = "<|system|>"
SWITCH_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ '<|assistant|>' }}",
    "{{ '<|assistant|>' }}{% if enable_thinking is defined and not enable_thinking %}"
    f"{{{{ '{SWITCH_MARKER}' }}}}{{% endif %}}",
)
NO_THINKING = {"enable_thinking": False}


def switch_tokenizer(model_dir) -> PreTrainedTokenizerBase:
    """The tiny model's tokenizer, with :data:`SWITCH_TEMPLATE` as its chat template."""
    tokenizer = load_tokenizer(str(model_dir))
    assert tokenizer.chat_template != SWITCH_TEMPLATE  # the switch was spliced in
    tokenizer.chat_template = SWITCH_TEMPLATE
    return tokenizer
