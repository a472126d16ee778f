"""Distillation training throughput: this project versus PEFT's CARTRIDGE recipes, side by side.

Same frozen model, same conversations (64-256 tokens), same p, same optimiser steps of a global
batch of conversations (the paper's 32 by default) in micro-batches, measured in one run with
the arms taking turns step by step (paired measurements):

- ``ours``: stored sparse top-k teacher targets, length-bucketed rows, the output head run only
  at target positions (``cartridges.training``);
- ``ours_packed``: the same on packed rows of ``--pack-length`` tokens with block-sparse
  attention (``train.attention: flex``: FlexAttention on GPUs, its CPU counterpart here), each
  optimiser step and forward holding about as many tokens as the bucketed arm's;
- ``ours_packed_dense`` (``--dense-arm``): packed rows with the dense 4D mask, for comparison;
- ``peft_online``: PEFT's example approach, the teacher's logits recomputed every step from
  document + conversation (as in peft's ``examples/cartridge_self_study/train_distill.py``);
- ``peft_topk``: a PEFT CARTRIDGE adapter trained on the same stored top-k targets, padded
  micro-batches in dataset order (what a user would write; PEFT's forward takes no packed mask).

Each of our arms takes turns step by step with its own run of ``peft_topk``, in one thread.
Per real token, ours and ``peft_topk`` do the same work; the difference is the padding that
dataset order pays (printed) and per-step overhead, so the ratio grows with the micro-batch.
The packed arms' first step is reported too: on a GPU it includes compiling the FlexAttention
kernel (rows share one length, so it compiles once). Throughput is conversation tokens trained
per second. The achieved FLOP rate of ``ours`` is reported as a fraction of a large float32
matmul's rate measured in the same run. The last line printed is one JSON object with the
headline figures.

Usage: ``python benchmarks/distill_training.py [--p 256] [--global-batch 32] [--micro-batch 8]
[--pack-length 1024]``; on a GPU, e.g. ``--device cuda --dtype bfloat16 --hidden 2048 --layers 16
--vocab 32000 --pack-length 2048``."""

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
def make_data(model, count: int, generator: torch.Generator, batch: int = 16):
    """Conversations of 64-256 tokens and stored top-k targets at every position.

    The targets' values do not change the cost of a step, so they come from the model without
    the document, in padded batches: building a realistically large epoch stays cheap, and
    length bucketing sees the spread of lengths a real dataset has.
    """
    lengths = torch.randint(64, 257, (count,), generator=generator).tolist()
    conversations = [
        torch.randint(0, model.config.vocab_size, (n,), generator=generator) for n in lengths
    ]
    examples = []
    for start in range(0, count, batch):
        group = conversations[start : start + batch]
        ids, mask = (t.to(model.device) for t in _padded_ids(group))
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        values, top = torch.log_softmax(logits, dim=-1).topk(TOP_K, dim=-1)  # [B, T, K]
        values, top = values.cpu(), top.cpu()
        for row, tokens in enumerate(group):
            n = len(tokens)
            examples.append(
                Example(tokens, torch.arange(1, n), top[row, : n - 1], values[row, : n - 1])
            )
    return examples


def _peft_model(model, document, p: int):
    peft_model = get_peft_model(
        model, CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=p, num_frozen_tokens=1)
    )
    with torch.no_grad():
        cache = model(input_ids=document[:p][None].to(model.device), use_cache=True).cache
        flat = torch.stack(
            [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
        )  # [L, 2, H, p, D]
        peft_model.prompt_encoder["default"].load_prompt_embeddings(
            flat.permute(3, 0, 1, 2, 4).reshape(p, -1)
        )
    return peft_model


def _padded_ids(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return ids, mask


def _peft_loss(model, peft_model, document, batch, online: bool) -> tuple[torch.Tensor, int]:
    """Summed top-k loss of one padded micro-batch, and its count of distilled positions."""
    device = model.device
    ids, mask = (t.to(device) for t in _padded_ids([e.token_ids for e in batch]))
    if online:
        with torch.no_grad(), peft_model.disable_adapter():
            teacher_ids = torch.cat([document.to(device).expand(len(batch), -1), ids], dim=1)
            teacher_mask = torch.cat(
                [torch.ones(len(batch), len(document), dtype=torch.long, device=device), mask], 1
            )
            teacher = model(input_ids=teacher_ids, attention_mask=teacher_mask).logits
            teacher = torch.log_softmax(teacher[:, len(document) : -1].float(), dim=-1)
            values, top = teacher.topk(TOP_K, dim=-1)  # [B, T-1, K]
    student = peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    rows, columns, target_ids, target_values = [], [], [], []
    for row, e in enumerate(batch):
        n = len(e.token_ids) - 1
        rows.append(torch.full((n,), row, device=device))
        columns.append(torch.arange(n, device=device))
        target_ids.append(top[row, :n] if online else e.teacher_ids.to(device))
        target_values.append(values[row, :n] if online else e.teacher_logprobs.to(device))
    rows, columns = torch.cat(rows), torch.cat(columns)
    loss = topk_distillation_loss(
        student[rows, columns], torch.cat(target_ids), torch.cat(target_values)
    )
    return loss * len(rows), len(rows)


class PeftRecipe:
    """A PEFT CARTRIDGE adapter trained a step at a time on padded micro-batches in dataset order.

    The teacher is online (recomputed from document + conversation) or the stored top-k.
    """

    def __init__(self, model, document, examples, p: int, args, online: bool) -> None:
        self.model, self.document, self.examples = model, document, examples
        self.args, self.online = args, online
        self.peft_model = _peft_model(model, document, p)
        trainable = [q for q in self.peft_model.parameters() if q.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=2e-2)

    def step(self, index: int) -> dict:
        """Optimiser step ``index``: its conversation tokens, padded tokens and seconds."""
        size, micro_size = self.args.global_batch, self.args.micro_batch
        step = self.examples[index * size : (index + 1) * size]
        micro = [step[i : i + micro_size] for i in range(0, len(step), micro_size)]
        positions = sum(len(e.token_ids) - 1 for e in step)
        _synchronize(self.model.device)
        started = time.perf_counter()
        self.optimizer.zero_grad()
        for batch in micro:
            loss, _ = _peft_loss(self.model, self.peft_model, self.document, batch, self.online)
            (loss / positions).backward()
        self.optimizer.step()
        _synchronize(self.model.device)
        return {
            "tokens": sum(len(e.token_ids) for e in step),
            "padded": sum(len(b) * max(len(e.token_ids) for e in b) for b in micro),
            "seconds": time.perf_counter() - started,
        }


def _config(args, examples, attention: str | None) -> TrainConfig:
    """Bucketed (``attention`` None) or packed rows; packed steps hold about the same tokens."""
    global_batch, micro_batch, pack_length = args.global_batch, args.micro_batch, None
    if attention is not None:
        mean = sum(len(e.token_ids) for e in examples) / len(examples)
        micro_batch = max(1, round(args.micro_batch * mean / args.pack_length))
        global_batch = micro_batch * max(1, round(args.global_batch / args.micro_batch))
        pack_length = args.pack_length
    return TrainConfig(
        global_batch_size=global_batch,
        micro_batch_size=micro_batch,
        max_steps=args.steps + 1,
        warmup_steps=1,
        pack_length=pack_length,
        attention=attention or "auto",
        checkpoint_every=10**9,
    )


def run_paired(model, document, examples, p: int, args, attention=None) -> dict[str, dict]:
    """Ours and PEFT on stored top-k take turns, a step each, so that drift hits both alike.

    ``attention`` is ``None`` for length-bucketed rows, else the packed rows' attention mode.
    Both run in this thread: alternating compute between threads costs each a thread-pool
    hand-over that is not part of either.
    """
    peft = PeftRecipe(model, document, examples, p, args, online=False)
    steps: dict[str, list[dict]] = {"ours": [], "peft_topk": []}

    def after_our_step(metrics: dict[str, float], index: int) -> None:
        seconds = metrics["tokens"] / metrics["tokens_per_s"]
        steps["ours"].append({"tokens": metrics["tokens"], "seconds": seconds})
        steps["peft_topk"].append(peft.step(index))

    config = _config(args, examples, attention)
    cartridge = from_token_ids(model, document[:p].tolist())
    train_cartridge(model, cartridge, examples, config, pad_token_id=0, on_step=after_our_step)
    totals = {name: _total(timed[1:]) for name, timed in steps.items()}  # step 0 warms up
    totals["ours"]["first_step_seconds"] = steps["ours"][0]["seconds"]
    return totals


def run_online(model, document, examples, p: int, args) -> dict:
    peft = PeftRecipe(model, document, examples, p, args, online=True)
    return _total([peft.step(index) for index in range(args.online_steps + 1)][1:])


def _total(steps: list[dict]) -> dict:
    return {key: sum(step[key] for step in steps) for key in steps[0]}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(
    device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5
) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    _synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def training_flops_per_token(model, p: int, examples) -> float:
    """Forward plus input-gradient backward FLOPs per conversation token (weights are frozen).

    Matrix products cost 2 FLOPs per weight forward and 2 backward (no weight gradients);
    attention scores and mixing cost ``4 * hidden`` per attended key per layer forward, twice
    that backward, each token attending the ``p`` cartridge keys and its causal history.
    """
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    tokens = sum(len(e.token_ids) for e in examples)
    keys = sum(
        len(e.token_ids) * p + len(e.token_ids) * (len(e.token_ids) + 1) / 2 for e in examples
    )
    attention = 3 * 4 * config.hidden_size * config.num_hidden_layers * keys / tokens
    return 4 * weights + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=256, help="cartridge tokens; the document is 8p")
    parser.add_argument(
        "--pack-length",
        type=int,
        default=1024,
        help="tokens per packed row of the packed arms (0: no packed arm)",
    )
    parser.add_argument(
        "--dense-arm", action="store_true", help="also time packed rows with the dense 4D mask"
    )
    parser.add_argument(
        "--global-batch", type=int, default=32, help="conversations per step (paper: 32-64)"
    )
    parser.add_argument("--micro-batch", type=int, default=8, help="conversations per forward")
    parser.add_argument(
        "--conversations", type=int, default=1024, help="conversations in the training set"
    )
    parser.add_argument("--steps", type=int, default=8, help="timed optimiser steps, paired")
    parser.add_argument(
        "--online-steps", type=int, default=1, help="timed steps of the (slow) online teacher"
    )
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size of the model")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the model")
    parser.add_argument("--layers", type=int, default=4, help="layers of the model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("cartridges").setLevel(logging.WARNING)

    dtype = getattr(torch, args.dtype)
    model = build_model(args.vocab, args.hidden, args.layers).to(args.device, dtype)
    generator = torch.Generator().manual_seed(0)
    document = torch.randint(0, args.vocab, (8 * args.p,), generator=generator)
    if args.dtype != "float32" and args.device == "cpu":
        parser.error("--dtype bfloat16 is for GPUs; CPU matrix products in bfloat16 are emulated")
    needed = args.global_batch * (max(args.steps, args.online_steps) + 1)
    if args.conversations < needed:
        parser.error(f"--conversations must be at least {needed} for the steps asked")
    examples = make_data(model, args.conversations, generator)
    arms = {"ours_packed": "flex"} if args.pack_length else {}
    if args.pack_length and args.dense_arm:
        arms["ours_packed_dense"] = "dense"
    results = run_paired(model, document, examples, args.p, args)
    for arm, attention in arms.items():  # each arm paired with its own PEFT run
        paired = run_paired(model, document, examples, args.p, args, attention)
        results[arm], results[f"peft_topk_beside_{arm}"] = paired["ours"], paired["peft_topk"]
    results["peft_online"] = run_online(model, document, examples, args.p, args)
    rate = {name: r["tokens"] / r["seconds"] for name, r in results.items()}
    achieved = training_flops_per_token(model, args.p, examples) * rate["ours"]
    peak = matmul_flops_per_s(model.device, dtype)
    for name, value in rate.items():
        logger.info("%-12s %8.0f conversation tokens/s", name, value)
    figures = {
        "benchmark": "distill_training",
        "p": args.p,
        "document_tokens": 8 * args.p,
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
        "device": str(model.device),
        "dtype": args.dtype,
        "model_parameters": sum(q.numel() for q in model.parameters()),
        "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "peft_padding_fraction": round(
            results["peft_topk"]["padded"] / results["peft_topk"]["tokens"] - 1, 3
        ),
        "speedup_vs_peft_online_teacher": round(rate["ours"] / rate["peft_online"], 2),
        "speedup_vs_peft_topk_padded": round(rate["ours"] / rate["peft_topk"], 2),
        "flop_fraction_of_matmul_peak": round(achieved / peak, 3),
    }
    for arm in arms:
        figures[f"speedup_vs_peft_topk_{arm.removeprefix('ours_')}"] = round(
            rate[arm] / rate[f"peft_topk_beside_{arm}"], 2
        )
        figures[f"{arm}_first_step_s"] = round(results[arm]["first_step_seconds"], 2)
        figures[f"{arm}_step_s"] = round(results[arm]["seconds"] / args.steps, 2)
    if arms:
        figures["pack_length"] = args.pack_length
    logger.info("speedup vs PEFT online teacher: %.2fx", figures["speedup_vs_peft_online_teacher"])
    logger.info("speedup vs PEFT on stored top-k: %.2fx", figures["speedup_vs_peft_topk_padded"])
    for arm in arms:
        key = f"speedup_vs_peft_topk_{arm.removeprefix('ours_')}"
        logger.info("%s: %.2fx over PEFT on stored top-k", arm, figures[key])
    print(json.dumps(figures))  # noqa: T201 - the benchmark's result line


if __name__ == "__main__":
    main()
