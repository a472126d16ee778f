"""Self-study against a fleet: the streaming client versus one batch at a time, same teacher.

A stand-in teacher on 127.0.0.1 (``cartridges_testing.stand_in_teacher``, its own process)
answers every request after a fixed delay with a vLLM-shaped payload: answers of
``--answer-tokens`` tokens with top-``--top-k`` log-probabilities and their bytes. Three clients
run the same self-study (same seed, chunks and limits) against it, in one run:

- ``streaming``: the project's client, many batches in flight under one bound, at
  ``max_concurrency`` 32 and 1024;
- ``one_batch``: the client as it was before, for reference: one batch
  (``conversations_per_chunk`` rows) awaited before the next, the ``openai`` SDK parsing every
  response into pydantic objects.

It prints conversations/s for each, the speed-up, and the client's CPU microseconds per answer
token (the client process's CPU time; the teacher runs in another process). The last line is
one JSON object with the headline figures.

Usage: ``python benchmarks/self_study_client.py [--delay-ms 200] [--answer-tokens 256]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import openai

from cartridges.modeling import load_tokenizer
from cartridges.synthesis.backends import Completion, Sampling
from cartridges.synthesis.openai_backend import OpenAIBackend
from cartridges.synthesis.runs import run_self_study
from cartridges.synthesis.self_study import SelfStudy, SelfStudyConfig
from cartridges_testing.stand_in_teacher import StandInTeacher, TeacherSettings

logger = logging.getLogger("benchmark")
logging.getLogger("httpx2").setLevel(logging.WARNING)  # the openai SDK logs every request
TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "06_models" / "tiny_llama"
CHUNKS = [
    (f"chunk-{i}", f"Record {i}: the pump P{i} seal was replaced in March.") for i in range(8)
]


class OneBatchClient:
    """The previous client: the ``openai`` SDK, one batch in flight, pydantic responses."""

    def __init__(self, tokenizer, base_url: str, model: str, max_concurrency: int) -> None:
        self.tokenizer, self.base_url, self.model = tokenizer, base_url, model
        self.max_concurrency = max_concurrency
        self.requests_in_flight = 0
        self.max_length = None  # the server refuses what does not fit

    def batches_in_flight(self, batch_size: int) -> int:
        return 1

    def identity(self) -> str:
        return f"one-batch:{self.base_url}:{self.model}"

    async def aclose(self) -> None:
        return None

    async def acomplete(self, system, conversations, sampling: Sampling) -> list[Completion]:
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key="unused", max_retries=1)
        semaphore = asyncio.Semaphore(self.max_concurrency)

        async def one(row, messages):
            async with semaphore:
                response = await client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "system", "content": system}, *messages],
                    temperature=sampling.temperature,
                    max_tokens=sampling.max_tokens,
                    seed=sampling.seed + row,
                    logprobs=True,
                    top_logprobs=max(sampling.top_logprobs, 1),
                    extra_body={"return_tokens_as_token_ids": True},
                )
            return self._parse(response, sampling.top_logprobs)

        try:
            return list(await asyncio.gather(*(one(i, c) for i, c in enumerate(conversations))))
        finally:
            await client.close()

    def _parse(self, response, top_logprobs: int) -> Completion:
        choice = response.choices[0]
        content = choice.logprobs.content
        token_ids = [int(entry.token.removeprefix("token_id:")) for entry in content]
        top_ids, top_values = [], []
        if top_logprobs:
            for entry in content:
                top = entry.top_logprobs[:top_logprobs]
                top_ids.append([int(t.token.removeprefix("token_id:")) for t in top])
                top_values.append([float(t.logprob) for t in top])
        stopped = choice.finish_reason == "stop"
        if stopped:
            token_ids.append(self.tokenizer.eos_token_id)
        return Completion(
            token_ids=token_ids,
            text=(choice.message.content or "").strip(),
            stopped=stopped,
            top_ids=np.asarray(top_ids, np.int32).reshape(len(top_ids), top_logprobs),
            top_logprobs=np.asarray(top_values, np.float32).reshape(len(top_ids), top_logprobs),
        )


def _measure(backend, tokenizer, config: SelfStudyConfig) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as shards:
        study = SelfStudy(backend, tokenizer, config)
        wall, cpu = time.perf_counter(), time.process_time()
        conversations, targets, _ = run_self_study(study, CHUNKS, shards, "benchmark")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        answer_tokens = targets.to_pandas(columns=["conversation_id", "position"])
        answer_tokens = len(answer_tokens.drop_duplicates())
        disk = sum(f.stat().st_size for f in Path(shards).rglob("*.parquet"))
        return {
            "conversations": conversations.num_rows,
            "conversations_per_s": conversations.num_rows / wall,
            "cpu_us_per_answer_token": 1e6 * cpu / max(answer_tokens, 1),
            "disk_kb_per_conversation": disk / 1024 / conversations.num_rows,
            # ru_maxrss is the process's peak so far: arms run in order of concurrency.
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=200.0, help="teacher latency")
    parser.add_argument("--answer-tokens", type=int, default=256, help="tokens per answer")
    parser.add_argument("--top-k", type=int, default=20, help="log-probabilities per token")
    parser.add_argument("--batch", type=int, default=32, help="conversations_per_chunk")
    parser.add_argument("--conversations", type=int, default=4096, help="at concurrency 1024")
    parser.add_argument("--device", default="cpu", help="unused: the client needs no device")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    tokenizer = load_tokenizer(TOKENIZER)
    settings = TeacherSettings(
        delay_ms=args.delay_ms,
        answer_tokens=args.answer_tokens,
        question_tokens=24,
        vocab_size=len(tokenizer),
        model="stand-in",
    )

    def config(conversations: int) -> SelfStudyConfig:
        return SelfStudyConfig(
            num_conversations=conversations,
            conversations_per_chunk=args.batch,
            max_question_tokens=32,
            max_answer_tokens=args.answer_tokens,
            top_k=args.top_k,
            min_prob_mass=1.0,  # keep every entry: the payload the client parses is stored whole
            system_prompt="About:\n{chunk}",
            seed_type_weights={"question": 1.0},
        )

    figures: dict[str, float | int | str] = {"benchmark": "self_study_client"}
    with StandInTeacher(settings) as teacher:
        arms = {
            "one_batch_c32": (
                OneBatchClient(tokenizer, teacher.base_url, "stand-in", 32),
                8 * args.batch,
            ),
            "streaming_c32": (
                OpenAIBackend(tokenizer, [teacher.base_url], "stand-in", max_concurrency=32),
                16 * args.batch,
            ),
            "streaming_c1024": (
                OpenAIBackend(tokenizer, [teacher.base_url], "stand-in", max_concurrency=1024),
                args.conversations,
            ),
        }
        results = {}
        for name, (backend, conversations) in arms.items():
            results[name] = _measure(backend, tokenizer, config(conversations))
            logger.info(
                "%s: %.1f conversations/s, %.1f client CPU us per answer token",
                name,
                results[name]["conversations_per_s"],
                results[name]["cpu_us_per_answer_token"],
            )
        figures["peak_requests_in_flight"] = teacher.health()["peak_in_flight"]
    for name, result in results.items():
        figures[f"{name}_conversations_per_s"] = round(result["conversations_per_s"], 1)
        figures[f"{name}_cpu_us_per_answer_token"] = round(result["cpu_us_per_answer_token"], 1)
    base = results["one_batch_c32"]["conversations_per_s"]
    figures["speedup_c1024_vs_one_batch"] = round(
        results["streaming_c1024"]["conversations_per_s"] / base, 2
    )
    figures["speedup_c1024_vs_c32"] = round(
        results["streaming_c1024"]["conversations_per_s"]
        / results["streaming_c32"]["conversations_per_s"],
        2,
    )
    figures["client_peak_rss_mb_c1024"] = round(results["streaming_c1024"]["peak_rss_mb"])
    figures["disk_kb_per_conversation"] = round(
        results["streaming_c1024"]["disk_kb_per_conversation"], 1
    )
    figures["parse_cpu_ratio_one_batch_vs_streaming"] = round(
        results["one_batch_c32"]["cpu_us_per_answer_token"]
        / results["streaming_c1024"]["cpu_us_per_answer_token"],
        2,
    )
    figures.update(delay_ms=args.delay_ms, answer_tokens=args.answer_tokens, top_k=args.top_k)
    print(json.dumps(figures))  # noqa: T201 - the benchmark's result line


if __name__ == "__main__":
    main()
