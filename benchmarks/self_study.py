"""Self-study synthesis throughput: shared-prefix batching versus one ``model.generate`` per row.

Same model, same chunk, same conversations and lengths, measured in one run. The local backend
prefills the chunk's system message once for the whole batch and decodes all rows together,
recording the teacher's top-k at every step; the naive baseline calls ``model.generate`` on
each conversation separately (chunk included in every prompt), also returning the scores. The
last line printed is one JSON object with the headline figures.

Usage: ``python benchmarks/self_study.py [--batch 32] [--chunk-tokens 512] [--answer-tokens 96]``
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from models import build_model

from cartridges.chat import chat_ids
from cartridges.modeling import load_tokenizer
from cartridges.synthesis.local_backend import LocalBackend

logger = logging.getLogger("benchmark")
TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "06_models" / "tiny_llama"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="conversations sharing one chunk")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="chunk length in tokens")
    parser.add_argument("--answer-tokens", type=int, default=96, help="tokens generated per row")
    parser.add_argument("--top-k", type=int, default=20, help="teacher log-probabilities kept")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    tokenizer = load_tokenizer(TOKENIZER)
    model = build_model(len(tokenizer))
    generator = torch.Generator().manual_seed(0)
    chunk_ids = torch.randint(10, len(tokenizer), (args.chunk_tokens,), generator=generator)
    chunk = tokenizer.decode(chunk_ids)
    system = f"You are in a conversation about the following information.\n\n{chunk}"
    questions = [
        [{"role": "user", "content": f"Question {i}: what does part {i} say?"}]
        for i in range(args.batch)
    ]

    # The random model rarely emits its end token; no stop token keeps lengths equal for both.
    backend = LocalBackend(model, tokenizer)
    backend.stop_ids = []
    started = time.perf_counter()
    batched = backend.complete(
        system, questions, temperature=0.0, max_tokens=args.answer_tokens, top_logprobs=args.top_k
    )
    batched_seconds = time.perf_counter() - started
    batched_tokens = sum(len(c.token_ids) for c in batched)

    started = time.perf_counter()
    naive_tokens, agree = 0, 0
    for question, ours in zip(questions, batched, strict=True):
        prompt = chat_ids(tokenizer, [{"role": "system", "content": system}, *question], True)
        output = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=args.answer_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.stack(output.scores).log_softmax(-1).topk(args.top_k, dim=-1)
        generated = output.sequences[0, len(prompt) :].tolist()
        naive_tokens += len(generated)
        agree += generated == ours.token_ids
    naive_seconds = time.perf_counter() - started

    figures = {
        "benchmark": "self_study",
        "batch": args.batch,
        "chunk_tokens": args.chunk_tokens,
        "answer_tokens": args.answer_tokens,
        "batched_conversations_per_s": round(args.batch / batched_seconds, 2),
        "naive_conversations_per_s": round(args.batch / naive_seconds, 2),
        "batched_tokens_per_s": round(batched_tokens / batched_seconds, 1),
        "naive_tokens_per_s": round(naive_tokens / naive_seconds, 1),
        "speedup_vs_naive": round(
            (batched_tokens / batched_seconds) / (naive_tokens / naive_seconds), 2
        ),
        "identical_outputs": f"{agree}/{args.batch}",
    }
    logger.info(
        "shared-prefix batching: %.1f tok/s, naive generate: %.1f tok/s, "
        "speedup %.1fx (%s identical)",
        figures["batched_tokens_per_s"],
        figures["naive_tokens_per_s"],
        figures["speedup_vs_naive"],
        figures["identical_outputs"],
    )
    print(json.dumps(figures))  # noqa: T201 - the benchmark's result line


if __name__ == "__main__":
    main()
