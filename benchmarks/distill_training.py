"""Distillation training throughput: this project versus PEFT's CARTRIDGE recipes, side by side.

Same frozen model, same conversations, same p, measured in one run:

- ``ours``: stored sparse top-k teacher targets, packed rows (``cartridges.training``);
- ``peft_online``: PEFT's example approach, the teacher's logits recomputed every step from
  document + conversation (as in peft's ``examples/cartridge_self_study/train_distill.py``);
- ``peft_topk``: a PEFT CARTRIDGE adapter trained on the same stored top-k targets, padded
  batches in dataset order (what a user would write; PEFT's forward takes no packed mask).

Throughput is conversation tokens trained per second. The achieved FLOP rate of ``ours`` is
reported as a fraction of a large float32 matmul's rate measured in the same run. The last line
printed is one JSON object with the headline figures.

Usage: ``python benchmarks/distill_training.py [--p 64] [--conversations 48] [--steps 6]``
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from models import build_model
from peft import CartridgeConfig, get_peft_model

from cartridges.batching import Example
from cartridges.initialization import from_token_ids
from cartridges.losses import topk_distillation_loss
from cartridges.training import TrainConfig, train_cartridge

logger = logging.getLogger("benchmark")
TOP_K = 20


@torch.no_grad()
def make_data(model, document: torch.Tensor, count: int, generator: torch.Generator):
    """Conversations of 64-256 tokens and their stored top-k teacher targets."""
    examples = []
    for _ in range(count):
        length = int(torch.randint(64, 257, (1,), generator=generator))
        tokens = torch.randint(0, model.config.vocab_size, (length,), generator=generator)
        logits = model(input_ids=torch.cat([document, tokens])[None]).logits[0]
        logprobs = torch.log_softmax(logits[len(document) : -1], dim=-1)
        values, ids = logprobs.topk(TOP_K, dim=-1)
        examples.append(Example(tokens, torch.arange(1, length), ids, values))
    return examples


def run_ours(model, document, examples, p: int, steps: int, pack_length: int) -> dict:
    cartridge = from_token_ids(model, document[:p].tolist())
    config = TrainConfig(
        global_batch_size=4,
        micro_batch_size=4,
        max_steps=steps + 1,
        warmup_steps=1,
        pack_length=pack_length or None,
        checkpoint_every=10**9,
    )
    _, history = train_cartridge(model, cartridge, examples, config, pad_token_id=0)
    timed = history[1:]  # the first step warms up
    seconds = sum(h["tokens"] / h["tokens_per_s"] for h in timed)
    tokens = sum(h["tokens"] for h in timed)
    return {"tokens": tokens, "seconds": seconds}


def _peft_model(model, document, p: int):
    peft_model = get_peft_model(
        model, CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=p, num_frozen_tokens=1)
    )
    with torch.no_grad():
        cache = model(input_ids=document[:p][None], use_cache=True).cache
        flat = torch.stack(
            [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
        )  # [L, 2, H, p, D]
        peft_model.prompt_encoder["default"].load_prompt_embeddings(
            flat.permute(3, 0, 1, 2, 4).reshape(p, -1)
        )
    return peft_model


def _padded(examples, device="cpu"):
    width = max(len(e.token_ids) for e in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, : len(e.token_ids)] = e.token_ids
        mask[row, : len(e.token_ids)] = 1
    return ids, mask


def run_peft(model, document, examples, p: int, steps: int, online: bool) -> dict:
    """PEFT adapter, padded batches of 4 in dataset order; teacher online or from stored top-k."""
    peft_model = _peft_model(model, document, p)
    optimizer = torch.optim.Adam([q for q in peft_model.parameters() if q.requires_grad], lr=2e-2)
    batches = [examples[i : i + 4] for i in range(0, len(examples), 4)][: steps + 1]
    tokens, seconds = 0, 0.0
    for index, batch in enumerate(batches):
        started = time.perf_counter()
        ids, mask = _padded(batch)
        if online:
            with torch.no_grad(), peft_model.disable_adapter():
                teacher_ids = torch.cat([document.expand(len(batch), -1), ids], dim=1)
                teacher_mask = torch.cat(
                    [torch.ones(len(batch), len(document), dtype=torch.long), mask], 1
                )
                teacher = model(input_ids=teacher_ids, attention_mask=teacher_mask).logits
                teacher = torch.log_softmax(teacher[:, len(document) : -1].float(), dim=-1)
                values, top = teacher.topk(TOP_K, dim=-1)  # [B, T-1, K]
        student = peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        rows, columns, target_ids, target_values = [], [], [], []
        for row, e in enumerate(batch):
            n = len(e.token_ids) - 1
            rows.append(torch.full((n,), row))
            columns.append(torch.arange(n))
            if online:
                target_ids.append(top[row, :n])
                target_values.append(values[row, :n])
            else:
                target_ids.append(e.teacher_ids)
                target_values.append(e.teacher_logprobs)
        rows, columns = torch.cat(rows), torch.cat(columns)
        loss = topk_distillation_loss(
            student[rows, columns], torch.cat(target_ids), torch.cat(target_values)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if index:  # the first step warms up
            seconds += time.perf_counter() - started
            tokens += int(mask.sum())
    return {"tokens": tokens, "seconds": seconds}


def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=256, help="cartridge tokens; the document is 8p")
    parser.add_argument("--pack-length", type=int, default=0, help="packed row length (0: buckets)")
    parser.add_argument(
        "--conversations", type=int, default=40, help="conversations of 64-256 tokens"
    )
    parser.add_argument("--steps", type=int, default=6, help="timed optimiser steps per method")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size of the model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("cartridges").setLevel(logging.WARNING)

    model = build_model(args.vocab)
    generator = torch.Generator().manual_seed(0)
    document = torch.randint(0, args.vocab, (8 * args.p,), generator=generator)
    examples = make_data(model, document, args.conversations, generator)
    results = {
        "ours": run_ours(
            model, document, examples, args.p, args.steps, pack_length=args.pack_length
        ),
        "peft_topk": run_peft(model, document, examples, args.p, args.steps, online=False),
        "peft_online": run_peft(model, document, examples, args.p, args.steps, online=True),
    }
    rate = {name: r["tokens"] / r["seconds"] for name, r in results.items()}
    parameters = sum(q.numel() for q in model.parameters())
    flops = 6 * parameters * rate["ours"]  # forward + backward through the frozen model
    peak = matmul_flops_per_s()
    for name, value in rate.items():
        logger.info("%-12s %8.0f conversation tokens/s", name, value)
    figures = {
        "benchmark": "distill_training",
        "p": args.p,
        "document_tokens": 8 * args.p,
        "model_parameters": parameters,
        "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "speedup_vs_peft_online_teacher": round(rate["ours"] / rate["peft_online"], 2),
        "speedup_vs_peft_topk_padded": round(rate["ours"] / rate["peft_topk"], 2),
        "flop_fraction_of_matmul_peak": round(flops / peak, 3),
    }
    logger.info("speedup vs PEFT online teacher: %.2fx", figures["speedup_vs_peft_online_teacher"])
    logger.info("speedup vs PEFT on stored top-k: %.2fx", figures["speedup_vs_peft_topk_padded"])
    print(json.dumps(figures))  # noqa: T201 - the benchmark's result line


if __name__ == "__main__":
    main()
