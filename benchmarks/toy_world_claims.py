"""The paper's three claims on the toy world, over several seeds: exact match, mean and spread.

Each seed draws a fresh world (four documents of 32 records, one per town, and a held-out
question per record) and runs the project's own pipeline nodes on it, with the parameters of
``conf/base`` and ``conf/multi_document`` (what ``kedro run`` and ``kedro run --env
multi_document`` use), the seed also driving chunking, self-study and training:

- single document (``conf/base``, the embedded model, one document of 131 tokens): the
  cartridges at 8x and 16x compression against ICL;
- long corpus (``conf/multi_document``: the multi-document model, whose context is 128 tokens,
  and all four documents, 520 tokens in context): one cartridge of the whole corpus at 8x,
  trained by self-study on windows that fit the context, against ICL cut to the context;
- composition (same run): the cartridges of two documents, each trained only on its own
  document's conversations at 4x, concatenated, on the questions about both, against each alone
  on its own document's questions.

- routing (same run): every document's cartridge is a candidate for every question; BM25 over the
  documents picks one per question (``evaluation.routing.top_k``), against the oracle's pick
  (each question's own document) and the cartridges of the whole corpus at the same KV (16x,
  the sweep's) and at twice it (8x).

Targets (from the issues that asked for this): single >= 0.9 x ICL at 8x and >= 0.8 x ICL at
16x; composition >= 0.9 x the mean of the two alone; long corpus >= 0.8 and >= 2x truncated ICL;
routed >= 0.9 x the oracle's pick and above the whole corpus's cartridge of the same KV.
The last line printed is one JSON object with the headline figures.

Usage: ``python benchmarks/toy_world_claims.py [--seeds 0 1 2] [--settings single multi]
[--workers 2]``; ``--scale 0.25`` shortens self-study and training for a quick look.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from kedro.config import OmegaConfigLoader

from cartridges.context import corpus_context
from cartridges.modeling import load_tokenizer
from cartridges.pipelines.distill_training.nodes import (
    distill_cartridge,
    distill_cartridge_sweep,
    distill_document_cartridges,
    initialize_cartridge,
)
from cartridges.pipelines.document_prep.nodes import chunk_documents, load_documents
from cartridges.pipelines.evaluation.nodes import evaluate_methods
from cartridges.pipelines.self_study.nodes import synthesize_conversations
from cartridges.toy_world.example_corpus import write_example_corpus

logger = logging.getLogger("benchmark")
ROOT = Path(__file__).resolve().parents[1]
WORLD_SEED = 1000  # worlds of the benchmark are not the committed example corpus (seed 2026)


def parameters(env: str | None) -> dict[str, Any]:
    """The run parameters of ``conf/base`` (+ ``env``), as ``kedro run --env env`` sees them."""
    loader = OmegaConfigLoader(
        str(ROOT / "conf"),
        base_env="base",
        default_run_env=env or "base",
        merge_strategy={"parameters": "soft"},
        runtime_params={},
    )
    return copy.deepcopy(dict(loader["parameters"]))


def seeded(
    params: dict[str, Any], seed: int, corpus: Path, work: Path, scale: float
) -> dict[str, Any]:
    """``params`` on this seed's world (``corpus``), writing shards under ``work``."""
    params["model"]["name_or_path"] = str(ROOT / params["model"]["name_or_path"])
    params["model"]["device"] = "cpu"
    prep, study, distill = params["document_prep"], params["self_study"], params["distill_training"]
    prep["corpus_dir"] = str(corpus)
    prep["chunking"]["seed"] = seed
    study.update(seed=seed, shard_dir=str(work / "shards"))
    study["num_conversations"] = max(64, int(study["num_conversations"] * scale))
    distill["checkpoint_dir"] = None
    distill["train"]["seed"] = seed
    if distill["train"].get("max_steps"):
        distill["train"]["max_steps"] = max(10, int(distill["train"]["max_steps"] * scale))
    params["evaluation"].update(tasks=["qa", "routing"], decode_batch_sizes=[1], cost_repeats=1)
    return params


def run_pipeline(
    params: dict[str, Any], questions: list, include: list[str]
) -> tuple[pd.DataFrame, int]:
    """document_prep -> self_study -> distill_training -> evaluation, node by node; the report
    and the corpus's length in context (tokens)."""
    model, prompt = params["model"], params["system_prompt"]
    prep = dict(params["document_prep"], include=include)
    distill = params["distill_training"]
    corpus, _ = load_documents(prep, model)
    chunks = chunk_documents(corpus, prep, model)
    conversations, targets, _ = synthesize_conversations(
        corpus, chunks, params["self_study"], model, prompt
    )
    initial = initialize_cartridge(corpus, distill, model, prompt)
    cartridge, _ = distill_cartridge(
        initial, chunks, conversations, targets, distill, model, prompt
    )
    sweep = distill_cartridge_sweep(corpus, chunks, conversations, targets, distill, model, prompt)
    documents = distill_document_cartridges(
        corpus, chunks, conversations, targets, distill, model, prompt
    )
    report, _ = evaluate_methods(
        corpus,
        questions,
        cartridge,
        None,
        sweep,
        documents,
        conversations,
        targets,
        params["evaluation"],
        model,
        prompt,
    )
    tokenizer = load_tokenizer(model["name_or_path"])
    return report, corpus_context(list(corpus["text"]), tokenizer, prompt).num_tokens


def override(params: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``block.key.subkey=value`` assignments (values read as YAML), as ``kedro run --params``."""
    import yaml

    for assignment in assignments:
        path, _, text = assignment.partition("=")
        *parents, last = path.split(".")
        target = params
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = yaml.safe_load(text)
    return params


def one_seed(
    seed: int, settings: list[str], scale: float, assignments: list[str] = ()
) -> dict[str, float]:
    """The figures of one world."""
    from cartridges.evaluation.questions import load_questions

    torch.set_num_threads(1)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        write_example_corpus(
            work / "corpus", work / "questions.jsonl", n_docs=4, n_facts=32, seed=WORLD_SEED + seed
        )
        questions = load_questions(work / "questions.jsonl")
        if "single" in settings:
            started = time.perf_counter()
            params = seeded(
                override(parameters(None), list(assignments)),
                seed,
                work / "corpus",
                work / "single",
                scale,
            )
            params["distill_training"]["sweep_compressions"] = [8, 16]
            only_first = [q for q in questions if q.document == "town_0"]
            report, _ = run_pipeline(params, only_first, ["town_0.txt"])
            em = _exact_match(report)
            figures |= {
                "single_icl": em["icl"],
                "single_cartridge_4x": em["cartridge"],
                "single_cartridge_8x": _by_compression(report, em, 8),
                "single_cartridge_16x": _by_compression(report, em, 16),
                "single_seconds": time.perf_counter() - started,
            }
        if "multi" in settings:
            started = time.perf_counter()
            params = seeded(
                override(parameters("multi_document"), list(assignments)),
                seed,
                work / "corpus",
                work / "multi",
                scale,
            )
            report, corpus_tokens = run_pipeline(params, questions, ["*"])
            em = _exact_match(report)
            rows = report.drop_duplicates("method").set_index("method")
            figures |= {
                "long_cartridge": em["cartridge"],
                "long_corpus_tokens": float(corpus_tokens),
                "long_compression": corpus_tokens / float(rows.loc["cartridge", "kv_tokens"]),
                "long_truncated_icl": em["icl"],
                "long_truncated_icl_tokens": float(rows.loc["icl", "kv_tokens"]),
                "composition_alone_mean": (em["document_town_0"] + em["document_town_1"]) / 2,
                "composition": em.get("composition", float("nan")),
                "composition_icl_documents": em.get("icl_documents", float("nan")),
                "no_context": em["no_context"],
                **_routing(report, em),
                "multi_seconds": time.perf_counter() - started,
            }
    logger.info("seed %d: %s", seed, json.dumps(figures))
    return figures


def _exact_match(report: pd.DataFrame) -> dict[str, float]:
    """Exact match of each method on the open questions (the qa task)."""
    rows = report[report["task"] == "qa"]
    return dict(zip(rows["method"], rows["exact_match"].astype(float), strict=True))


def _routing(report: pd.DataFrame, em: dict[str, float]) -> dict[str, float]:
    """The routed library against its oracle: exact match, routing accuracy, KV tokens."""
    kinds = report.drop_duplicates("method").set_index("kind")
    if "routed" not in kinds.index:
        return {}
    routed, oracle = kinds.loc["routed", "method"], kinds.loc["oracle_selection", "method"]
    routing = report[(report["task"] == "routing") & (report["method"] == routed)]
    tokens = float(kinds.loc["routed", "kv_tokens"])
    whole = report[report["method"].str.startswith("sweep_")].drop_duplicates("method")
    equal = whole.iloc[(whole["kv_tokens"] - tokens).abs().argmin()] if len(whole) else None
    return {
        "routed": em[routed],
        "routed_oracle": em[oracle],
        "routing_accuracy": float(routing["quality"].iloc[0]),
        "routed_tokens": tokens,
        # The whole corpus's cartridge nearest the routed pick's size (the sweep's 16x).
        "whole_corpus_equal_kv": em[equal["method"]] if equal is not None else float("nan"),
        "whole_corpus_equal_kv_tokens": float(equal["kv_tokens"]) if equal is not None else 0.0,
    }


def _by_compression(report: pd.DataFrame, em: dict[str, float], ratio: int) -> float:
    """Exact match of the sweep cartridge whose size is closest to ``ratio`` x compression."""
    rows = report[report["method"].str.startswith("sweep_")].drop_duplicates("method")
    closest = rows.iloc[(rows["compression_vs_icl"] - ratio).abs().argmin()]
    return em[closest["method"]]


def summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Mean, standard deviation and range of every figure, and the claims' ratios per seed."""
    ratios = []
    for figures in runs:
        ratio = {}
        if "single_icl" in figures:
            ratio["single_8x_vs_icl"] = figures["single_cartridge_8x"] / figures["single_icl"]
            ratio["single_16x_vs_icl"] = figures["single_cartridge_16x"] / figures["single_icl"]
        if "long_cartridge" in figures:
            ratio["composition_vs_alone"] = figures["composition"] / max(
                figures["composition_alone_mean"], 1e-9
            )
            ratio["long_vs_truncated_icl"] = figures["long_cartridge"] / max(
                figures["long_truncated_icl"], 1e-9
            )
        if "routed" in figures:
            ratio["routed_vs_oracle"] = figures["routed"] / max(figures["routed_oracle"], 1e-9)
            ratio["routed_vs_whole_corpus_cartridge"] = figures["routed"] / max(
                figures["long_cartridge"], 1e-9
            )
            ratio["routed_vs_whole_corpus_equal_kv"] = figures["routed"] / max(
                figures["whole_corpus_equal_kv"], 1e-9
            )
        ratios.append(figures | ratio)
    out: dict[str, Any] = {}
    for name in ratios[0]:
        values = [r[name] for r in ratios]
        out[name] = {
            "mean": round(statistics.fmean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
            "min": round(min(values), 3),
            "max": round(max(values), 3),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=["single", "multi"])
    parser.add_argument("--workers", type=int, default=2, help="seeds run in parallel")
    parser.add_argument("--scale", type=float, default=1.0, help="x conversations and steps")
    parser.add_argument(
        "--params", nargs="*", default=[], help="overrides, e.g. distill_training.compression=8"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("cartridges", "kedro", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    count = len(args.seeds)
    with ProcessPoolExecutor(args.workers) as pool:
        runs = list(
            pool.map(
                one_seed,
                args.seeds,
                [args.settings] * count,
                [args.scale] * count,
                [args.params] * count,
            )
        )
    for seed, figures in zip(args.seeds, runs, strict=True):
        logger.info("seed %d: %s", seed, ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    stats = summary(runs)
    for name, values in stats.items():
        logger.info(
            "%-32s mean %.3f  std %.3f  range %.3f-%.3f",
            name,
            values["mean"],
            values["std"],
            values["min"],
            values["max"],
        )
    headline = {"benchmark": "toy_world_claims", "seeds": args.seeds, "scale": args.scale}
    headline |= {name: values["mean"] for name, values in stats.items()}
    headline |= {f"{name}_std": values["std"] for name, values in stats.items() if "_vs_" in name}
    print(json.dumps(headline))  # noqa: T201


if __name__ == "__main__":
    main()
