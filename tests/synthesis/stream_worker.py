"""Run by the out-of-order kill test: self-study through the openai backend, then save."""

from __future__ import annotations

import sys

from cartridges.modeling import load_tokenizer
from cartridges.synthesis.openai_backend import OpenAIBackend
from cartridges.synthesis.runs import run_self_study
from cartridges.synthesis.self_study import SelfStudy, SelfStudyConfig

# Chunk "slow" is answered late by the stand-in teacher, so its batches finish after later ones.
CHUNKS = [
    ("slow", "SLOW The pump P2 seal was replaced in March."),
    ("b", "Alarm E12 is low suction."),
    ("c", "The valve V7 was tested in May."),
    ("d", "Alarm E21 is a seal leak."),
]
SETTINGS = dict(
    num_conversations=24,
    conversations_per_chunk=2,
    max_question_tokens=6,
    max_answer_tokens=8,
    top_k=4,
    system_prompt="About:\n{chunk}",
)


def study(model_dir: str, base_url: str) -> SelfStudy:
    tokenizer = load_tokenizer(model_dir)
    backend = OpenAIBackend(tokenizer, [base_url], "stand-in", max_concurrency=4, max_retries=0)
    return SelfStudy(backend, tokenizer, SelfStudyConfig(**SETTINGS))


if __name__ == "__main__":
    model_dir, base_url, shard_dir, output = sys.argv[1:5]
    conversations, targets, _ = run_self_study(study(model_dir, base_url), CHUNKS, shard_dir, "s")
    conversations.to_pandas().to_parquet(f"{output}-conversations.parquet")
    targets.to_pandas().to_parquet(f"{output}-targets.parquet")
