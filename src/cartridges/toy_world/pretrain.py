"""Pretrain the toy-world model: learn to answer from the document in context and to self-study.

Each training example is a chat whose system message is a fresh random document, followed by
several turns drawn with replacement: questions in every template answered from the document,
self-study seed prompts answered with a bot-A message (a question about a random record, a
restated record...), and statements answered by restating the true record. The loss is taken on
assistant tokens only. A curriculum grows the number of records per document once the running
accuracy on answer values passes a threshold (tiny models learn retrieval on short documents
first, then it transfers to long ones).

Run: ``python -m cartridges.toy_world.pretrain --output data/06_models/toy_world``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass
from transformers import PreTrainedTokenizerFast

from cartridges.files import atomic_write
from cartridges.modeling import pad_token_id
from cartridges.schedule import lr_at
from cartridges.toy_world import conversations, language
from cartridges.toy_world.evaluate import (
    evaluate_model,
    exact_match,
    heldout_items,
    self_study_check,
)
from cartridges.toy_world.model import ToyWorldConfig, ToyWorldForCausalLM
from cartridges.toy_world.tokenizer import build_tokenizer, encode_conversation, segment_start_ids

logger = logging.getLogger(__name__)


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class PretrainConfig:
    """Everything that determines a pretraining run (saved next to the checkpoints)."""

    seed: int = 0
    steps: int = 6000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    curriculum: tuple[int, ...] = (4, 8, 16, 32)
    """Maximum records per document at each level; a document has between half and all of them."""
    full_town_prob: float = 0.5
    """At the last level, the probability that a document lists a whole town (32 records);
    otherwise it has ``curriculum[-1] // 2 .. curriculum[-1]`` records."""
    advance_threshold: float = 0.9
    n_turns: int = 8
    max_documents: int = 1
    """A context holds up to this many registries of distinct towns, separated by a blank line
    (a corpus of several documents in context, or cartridges of several composed)."""
    multi_document_prob: float = 0.0  # chance that a context holds 2..max_documents registries
    init_from: str | None = None  # a saved toy model to start from (fine-tuning), else random
    # model
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    shift_width: int = 2
    max_position_embeddings: int = 1024
    # bookkeeping
    num_threads: int = 1
    log_every: int = 25
    eval_every: int = 500
    eval_questions: int = 128
    checkpoint_every: int = 250
    checkpoint_dir: str | None = None
    stop_icl: float | None = None
    """Stop early once the held-out ICL accuracy at the last level reaches this value."""


@dataclass
class StepInfo:
    """What ``on_step`` receives after every optimiser step."""

    step: int
    loss: float
    value_accuracy: float
    level: int
    max_facts: int
    lr: float
    tokens_per_s: float
    metrics: dict[str, float] = field(default_factory=dict)


def make_model(cfg: PretrainConfig, tokenizer: PreTrainedTokenizerFast) -> ToyWorldForCausalLM:
    """A fresh toy-world model sized by ``cfg`` for ``tokenizer``."""
    config = ToyWorldConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        shift_width=cfg.shift_width,
        segment_start_token_ids=segment_start_ids(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return ToyWorldForCausalLM(config)


def facts_range(cfg: PretrainConfig, level: int) -> tuple[int, int]:
    """(min, max) records per document at a curriculum level."""
    top = cfg.curriculum[level]
    return max(2, top // 2), top


def sample_batch(
    cfg: PretrainConfig, tokenizer: PreTrainedTokenizerFast, level: int, step: int
) -> dict[str, torch.Tensor]:
    """Sample a step's language-modelling batch from the toy world (unlike ``batching.make_batch``,
    which batches stored distillation targets): deterministic in (seed, step, level), so that a
    resumed run sees the same data."""
    rng = random.Random(cfg.seed * 1_000_003 + step * 7 + level)
    lo, hi = facts_range(cfg, level)
    vocab = tokenizer.get_vocab()
    item_ids = {vocab[i] for i in language.ITEMS}
    seqs, masks, value_masks = [], [], []
    for _ in range(cfg.batch_size):
        n_facts = rng.randint(lo, hi)
        if level == len(cfg.curriculum) - 1 and rng.random() < cfg.full_town_prob:
            n_facts = language.TOWN_SIZE
        n_documents = 1
        if cfg.max_documents > 1 and rng.random() < cfg.multi_document_prob:
            n_documents = rng.randint(2, cfg.max_documents)
        _, messages, kinds, bos_user = conversations.sample_conversation(
            rng, n_facts, cfg.n_turns, n_documents=n_documents
        )
        ids, mask = encode_conversation(tokenizer, messages, bos_before_first_user=bos_user)
        # value positions: the item token of each "qa" answer (last content word of that turn)
        vmask = [False] * len(ids)
        turn = -1
        for pos in range(len(ids)):
            if ids[pos] == vocab["<assistant>"]:
                turn += 1
            if mask[pos] and kinds[turn] == "qa" and ids[pos] in item_ids:
                vmask[pos] = True
        seqs.append(ids)
        masks.append(mask)
        value_masks.append(vmask)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id(tokenizer), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    values = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, (s, m, v) in enumerate(zip(seqs, masks, value_masks, strict=True)):
        t = torch.tensor(s)
        input_ids[r, : len(s)] = t
        labels[r, : len(s)] = torch.where(torch.tensor(m), t, torch.full_like(t, -100))
        values[r, : len(s)] = torch.tensor(v)
    return {"input_ids": input_ids, "labels": labels, "values": values}


def _save_checkpoint(
    path: Path, model, optim, step: int, level: int, running: float, cfg: PretrainConfig
) -> None:
    state = {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "step": step,
        "level": level,
        "running_acc": running,
        "config": dataclasses.asdict(cfg),
    }
    with atomic_write(path) as temporary:
        torch.save(state, temporary)


def _optimizer(model: ToyWorldForCausalLM, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "embed" in name else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=cfg.betas,
    )


def _resume(path: Path | None, model, optim) -> tuple[int, int, float]:
    """Load ``path``'s checkpoint if there is one; return (step, level, running accuracy)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if path is None or not path.exists():
        return 0, 0, 0.0
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optim.load_state_dict(state["optim"])
    logger.info("resumed from %s at step %d (level %d)", path, state["step"], state["level"])
    return state["step"], state["level"], state["running_acc"]


def _train_step(
    model: ToyWorldForCausalLM, optim, batch: dict[str, torch.Tensor], lr: float, grad_clip: float
) -> tuple[float, float]:
    """One optimiser step on assistant tokens; return the loss and the accuracy on values."""
    for g in optim.param_groups:
        g["lr"] = lr
    logits = model(input_ids=batch["input_ids"]).logits
    shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
    loss = F.cross_entropy(shift_logits.flatten(0, 1), shift_labels.flatten(), ignore_index=-100)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optim.step()
    with torch.no_grad():
        vpos = batch["values"][:, 1:]
        pred = shift_logits.argmax(-1)
        acc = (pred[vpos] == shift_labels[vpos]).float().mean().item() if vpos.any() else 0.0
    return loss.item(), acc


def _evaluate(
    model: ToyWorldForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    cfg: PretrainConfig,
    eval_items,
    step: int,
    at_last: bool,
) -> dict[str, float]:
    """Held-out ICL accuracy, plus the self-study checks once at the last curriculum level."""
    metrics = {"heldout_icl": sum(exact_match(model, tokenizer, eval_items)) / len(eval_items)}
    if at_last:
        ss = self_study_check(
            model, tokenizer, n_docs=2, n_facts=cfg.curriculum[-1], seed=cfg.seed + step
        )
        metrics["seed_q_ok"] = ss["seed_question_well_formed"]
        metrics["seed_q_cov"] = ss["seed_question_name_coverage"]
        metrics["bot_a_ok"] = ss["bot_a_well_formed"]
    model.train()
    return metrics


def pretrain(
    cfg: PretrainConfig,
    tokenizer: PreTrainedTokenizerFast | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> tuple[ToyWorldForCausalLM, PreTrainedTokenizerFast]:
    """Train a toy-world model from scratch (or resume from ``cfg.checkpoint_dir``).

    The loop reads top to bottom as one step (data, update, curriculum, evaluation, logging,
    checkpoint, early stop), so it is kept in one piece.
    """
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    tokenizer = tokenizer or build_tokenizer()
    model = make_model(cfg, tokenizer)
    if cfg.init_from is not None:  # fine-tune: same architecture, weights of a saved model
        model.load_state_dict(ToyWorldForCausalLM.from_pretrained(cfg.init_from).state_dict())
    optim = _optimizer(model, cfg)
    ckpt_path = Path(cfg.checkpoint_dir) / "checkpoint.pt" if cfg.checkpoint_dir else None
    step, level, running = _resume(ckpt_path, model, optim)
    eval_items = heldout_items(
        cfg.eval_questions, n_facts=cfg.curriculum[-1], seed=cfg.seed + 4242
    )[0]
    model.train()
    t_last, tok_count = time.time(), 0
    while step < cfg.steps:
        t_step = time.time()
        batch = sample_batch(cfg, tokenizer, level, step)
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, min_ratio=cfg.min_lr_ratio)
        loss, acc = _train_step(model, optim, batch, lr, cfg.grad_clip)
        step += 1
        running = acc if step == 1 else 0.95 * running + 0.05 * acc
        tok_count += int(batch["input_ids"].numel())
        if running > cfg.advance_threshold and level < len(cfg.curriculum) - 1:
            level += 1
            running = 0.0
            logger.info(
                "step %d: curriculum -> level %d, facts %s", step, level, facts_range(cfg, level)
            )
        at_last = level == len(cfg.curriculum) - 1
        metrics: dict[str, float] = {}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics = _evaluate(model, tokenizer, cfg, eval_items, step, at_last)
        step_tps = batch["input_ids"].numel() / max(time.time() - t_step, 1e-9)
        if step % cfg.log_every == 0 or metrics:
            logger.info(
                "step %d loss %.4f value_acc %.3f running %.3f level %d lr %.2e %.0f tok/s %s",
                *(step, loss, acc, running, level, lr),
                tok_count / max(time.time() - t_last, 1e-9),
                " ".join(f"{k}={v:.3f}" for k, v in metrics.items()),
            )
            t_last, tok_count = time.time(), 0
        if on_step is not None:
            max_facts = facts_range(cfg, level)[1]
            on_step(StepInfo(step, loss, acc, level, max_facts, lr, step_tps, metrics))
        icl = metrics.get("heldout_icl")  # only on evaluation steps
        stop = cfg.stop_icl is not None and at_last and icl is not None and icl >= cfg.stop_icl
        due = step % cfg.checkpoint_every == 0 or step == cfg.steps or stop
        if ckpt_path is not None and due:
            _save_checkpoint(ckpt_path, model, optim, step, level, running, cfg)
        if stop:
            logger.info("step %d: held-out ICL %.3f >= %.3f, stopping", step, icl, cfg.stop_icl)
            break
    model.eval()
    return model, tokenizer


def model_from_checkpoint(
    checkpoint_dir: str | Path, tokenizer: PreTrainedTokenizerFast | None = None
) -> tuple[ToyWorldForCausalLM, PreTrainedTokenizerFast, int]:
    """Rebuild the model from a (possibly still running) run's checkpoint.

    Returns (model, tokenizer, step).
    """
    state = torch.load(
        Path(checkpoint_dir) / "checkpoint.pt", map_location="cpu", weights_only=False
    )
    cfg_dict = dict(state["config"])
    cfg_dict["curriculum"] = tuple(cfg_dict["curriculum"])
    cfg_dict["betas"] = tuple(cfg_dict["betas"])
    cfg = PretrainConfig(**cfg_dict)
    tokenizer = tokenizer or build_tokenizer()
    model = make_model(cfg, tokenizer)
    model.load_state_dict(state["model"])
    return model.eval(), tokenizer, int(state["step"])


def save(
    model: ToyWorldForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    output: str | Path,
    metrics: dict[str, float] | None = None,
    cfg: PretrainConfig | None = None,
) -> None:
    """Save model (safetensors) and tokenizer with ``save_pretrained``, plus a metrics file."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    info = {"metrics": metrics or {}, "pretrain_config": dataclasses.asdict(cfg) if cfg else None}
    (output / "toy_world_training.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """CLI: pretrain, save to ``--output``, and log held-out ICL / no-context accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", required=True, help="directory for save_pretrained (model + tokenizer)"
    )
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        help="resumable checkpoints (default: <output>/../toy_world_ckpt)",
    )
    defaults = PretrainConfig()
    for f in dataclasses.fields(PretrainConfig):
        if f.name in ("checkpoint_dir", "curriculum", "betas"):
            continue
        default = getattr(defaults, f.name)
        typ = str if "str" in str(f.type) else type(default) if default is not None else float
        parser.add_argument("--" + f.name.replace("_", "-"), type=typ, default=default)
    parser.add_argument("--curriculum", default=",".join(map(str, defaults.curriculum)))
    parser.add_argument(
        "--eval-n", type=int, default=200, help="questions for the final evaluation"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    kw = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(PretrainConfig)
        if f.name not in ("checkpoint_dir", "curriculum", "betas")
    }
    ckpt = args.checkpoint_dir or str(Path(args.output).parent / (Path(args.output).name + "_ckpt"))
    cfg = PretrainConfig(
        **kw, curriculum=tuple(int(x) for x in args.curriculum.split(",")), checkpoint_dir=ckpt
    )
    logger.info("pretraining with %s", cfg)
    t0 = time.time()
    model, tokenizer = pretrain(cfg)
    logger.info("pretraining took %.1f s", time.time() - t0)
    metrics = evaluate_model(model, tokenizer, n_questions=args.eval_n, n_facts=cfg.curriculum[-1])
    for k, v in metrics.items():
        logger.info("final %s = %.3f", k, v)
    save(model, tokenizer, args.output, metrics, cfg)
    logger.info("saved model and tokenizer to %s", args.output)


if __name__ == "__main__":
    main()
