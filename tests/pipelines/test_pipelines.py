"""Each pipeline on the tiny model, chained through an in-memory catalog."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from kedro.io import DataCatalog
from kedro.runner import SequentialRunner
from kedro_datasets.pickle import PickleDataset

from cartridges.cartridge import Cartridge
from cartridges.datasets import (
    CartridgeDataset,
    CartridgeHistoryDataset,
    ParquetShardsDataset,
    QuestionsDataset,
)
from cartridges.pipelines.distill_training import create_pipeline as distill_training
from cartridges.pipelines.document_prep import create_pipeline as document_prep
from cartridges.pipelines.evaluation import create_pipeline as evaluation
from cartridges.pipelines.self_study import create_pipeline as self_study
from tests.conftest import CORPUS

SYSTEM_PROMPT = "Conversation about:\n{chunk}"
PERSISTED = [
    "corpus",
    "skipped_documents",
    "chunk_set",
    "training_metrics",
    "evaluation_report",
    "evaluation_metrics",
    "self_study_metrics",
    "tradeoff_plot",
    "cartridge_sweep",
    "document_cartridges",
]


@pytest.fixture()
def catalog(tiny_model_dir, tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "pump.md").write_text("# Pump\n\n" + CORPUS)
    (corpus_dir / "log.txt").write_text("Mira Okafor replaced the seal in March. " * 6)
    (corpus_dir / "empty.txt").write_text("   \n")
    (corpus_dir / "image.png").write_bytes(b"\x89PNG\r\n")
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        '{"question": "Who built the pump?", "answer": "Halvard Industrial"}\n'
        '{"question": "Which alarm?", "answer": "E21", "options": ["E12", "E21"]}\n'
    )
    # Persisted outputs, so that the runner's release of finished datasets keeps them readable.
    catalog = DataCatalog(
        {name: PickleDataset(filepath=str(tmp_path / f"{name}.pkl")) for name in PERSISTED}
        | {"cartridge": CartridgeDataset(str(tmp_path / "cartridge.safetensors"))}
        | {"cartridge_history": CartridgeHistoryDataset(str(tmp_path / "cartridge.safetensors"))}
        | {"questions": QuestionsDataset(str(questions))}
        # As in conf/base/catalog.yml: shard folders, loaded as lazy handles.
        | {
            name: ParquetShardsDataset(str(tmp_path / name), row_group_size=4)
            for name in ("conversations", "teacher_logprobs")
        }
    )
    params = {
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32", "device": "cpu"},
        "system_prompt": SYSTEM_PROMPT,
        "document_prep": {
            "corpus_dir": str(corpus_dir),
            "include": ["*"],
            "exclude": [],
            "strict": False,
            "chunking": {"num_chunks": 4, "min_tokens": 16, "max_tokens": 32, "seed": 0},
        },
        "self_study": {
            "shard_dir": str(tmp_path / "shards"),
            "num_conversations": 6,
            "conversations_per_chunk": 3,
            "max_question_tokens": 8,
            "max_answer_tokens": 8,
            "top_k": 5,
        },
        "distill_training": {
            "num_cartridge_tokens": 8,
            "sweep_compressions": [4],
            "num_frozen_tokens": 1,
            "initializer": "text",
            "held_out_fraction": 0.2,
            "train": {
                "learning_rate": 0.02,
                "global_batch_size": 2,
                "micro_batch_size": 2,
                "max_steps": 3,
                "warmup_steps": 1,
            },
        },
        "evaluation": {
            "tasks": ["qa", "log_perplexity", "fidelity", "chrf"],
            "max_new_tokens": 4,
            "batch_size": 4,
            "decode_tokens": 2,
            "cost_repeats": 1,
        },
    }
    for name, value in params.items():
        catalog[f"params:{name}"] = value
    return catalog


def test_the_four_pipelines_chain_end_to_end(catalog):
    runner = SequentialRunner()
    pipeline = document_prep() + self_study() + distill_training() + evaluation()
    runner.run(pipeline, catalog)

    corpus = catalog["corpus"].load()
    skipped = catalog["skipped_documents"].load()
    assert sorted(corpus["source"]) == ["log.txt", "pump.md"]
    assert dict(zip(skipped["source"], skipped["reason"], strict=True)) == {
        "empty.txt": "empty after cleaning",
        "image.png": "unsupported extension '.png'",
    }
    assert (corpus["n_tokens"] > 0).all()

    chunks = catalog["chunk_set"].load()
    assert len(chunks) == 4 and chunks["n_tokens"].between(1, 32).all()

    conversations = catalog["conversations"].load().to_pandas()  # six rows: small
    targets = catalog["teacher_logprobs"].load().to_pandas()
    assert len(conversations) == 6
    assert set(targets["conversation_id"]) <= set(conversations["conversation_id"])
    first = conversations.iloc[0]
    assert json.loads(first["messages"])[0]["role"] == "user"
    assert SYSTEM_PROMPT.split(":")[0] not in json.loads(first["messages"])[0]["content"]

    cartridge = catalog["cartridge"].load()
    assert isinstance(cartridge, Cartridge) and cartridge.num_tokens == 8
    assert cartridge.info.extra["train_steps"] == 3
    assert len(cartridge.info.extra["held_out_conversations"]) == 1
    ((name, swept),) = catalog["cartridge_sweep"].load().items()
    context_tokens = swept.num_tokens * 4  # p = n / 4, rounded
    assert name == f"p{swept.num_tokens}" and abs(context_tokens - rows_n(catalog)) <= 4

    report = catalog["evaluation_report"].load()
    methods = list(dict.fromkeys(report["method"]))
    assert methods[:4] == ["icl", "no_context", "cartridge", "truncated_icl_p8"]
    assert f"sweep_{name}" in methods  # sizes p
    assert "composition" not in methods  # no cartridges of single documents were asked for
    assert set(report["task"]) == {"qa", "multiple_choice", "log_perplexity", "fidelity", "chrf"}
    rows = report[report["task"] == "qa"].set_index("method")
    cartridge_bytes = 8 * 2 * 2 * 2 * 16 * 4  # p x (K, V) x layers x kv heads x head_dim x fp32
    assert rows.loc["cartridge", "kv_bytes"] == rows.loc["truncated_icl_p8", "kv_bytes"]
    assert rows.loc["cartridge", "kv_bytes"] == cartridge_bytes
    assert (
        rows.loc["cartridge", "compression_vs_icl"] == rows.loc["icl", "kv_bytes"] / cartridge_bytes
    )
    assert catalog["tradeoff_plot"].load() is not None


def rows_n(catalog) -> int:
    """Tokens of the corpus in context, as the distill_training node counts them."""
    from cartridges.chat import context_ids
    from cartridges.context import join_documents
    from cartridges.modeling import load_tokenizer

    tokenizer = load_tokenizer(catalog["params:model"].load()["name_or_path"])
    text = join_documents(list(catalog["corpus"].load()["text"]))
    return len(context_ids(tokenizer, SYSTEM_PROMPT.format(chunk=text)))


def test_document_prep_is_deterministic(catalog):
    SequentialRunner().run(document_prep(), catalog)
    first = catalog["chunk_set"].load()
    SequentialRunner().run(document_prep(), catalog)
    pd.testing.assert_frame_equal(first, catalog["chunk_set"].load())


@pytest.mark.parametrize("objective", ["cross_entropy", "memorization"])
def test_the_ablation_objectives_train_a_cartridge(catalog, objective):
    params = catalog["params:distill_training"].load()
    catalog["params:distill_training"] = {
        **params,
        "objective": objective,
        "sweep_compressions": [],
    }
    SequentialRunner().run(document_prep() + self_study() + distill_training(), catalog)
    cartridge = catalog["cartridge"].load()
    assert cartridge.info.extra["train_steps"] == 3


def test_a_cartridge_rerun_from_a_finished_checkpoint_records_the_steps_it_took(catalog, tmp_path):
    """The header counted only the steps of the last process: 0 when resumed at the end."""
    params = catalog["params:distill_training"].load()
    catalog["params:distill_training"] = {
        **params,
        "sweep_compressions": [],
        "checkpoint_dir": str(tmp_path / "checkpoints"),
    }
    SequentialRunner().run(document_prep() + self_study() + distill_training(), catalog)
    first = catalog["cartridge"].load().info.extra
    assert first["train_steps"] == 3 and first["train_tokens"] > 0
    SequentialRunner().run(distill_training(), catalog)  # resumes the finished run's checkpoint
    again = catalog["cartridge"].load().info.extra
    assert again["train_steps"] == 3 and again["train_tokens"] == first["train_tokens"]


def test_an_unknown_objective_is_refused(catalog):
    params = catalog["params:distill_training"].load()
    catalog["params:distill_training"] = {**params, "objective": "poetry"}
    with pytest.raises(ValueError, match=r"Unknown objective 'poetry'"):
        SequentialRunner().run(document_prep() + self_study() + distill_training(), catalog)


def test_the_toy_world_pipeline_pretrains_and_saves_a_loadable_model(tmp_path):
    from cartridges.datasets import PretrainedModelDataset
    from cartridges.pipelines.toy_world import create_pipeline as toy_world

    catalog = DataCatalog({"toy_world_model": PretrainedModelDataset(str(tmp_path / "toy"))})
    catalog["params:toy_world"] = {
        "steps": 3,
        "batch_size": 4,
        "curriculum": [4],
        "eval_every": 100,
        "eval_questions": 4,
        "checkpoint_every": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
    }
    SequentialRunner().run(toy_world(), catalog)
    model, tokenizer = catalog["toy_world_model"].load()
    assert model.config.model_type == "toy_world_llama" and tokenizer.chat_template
    metrics = catalog["toy_world_metrics"].load()
    assert metrics and all(0.0 <= m["value"] <= 1.0 and m["step"] == 3 for m in metrics.values())


def test_training_logs_the_cartridges_greedy_answers_to_held_out_questions(
    catalog, monkeypatch, tiny
):
    import mlflow

    from cartridges.generation import generate

    logged = {}
    monkeypatch.setattr(mlflow, "active_run", lambda: True)
    monkeypatch.setattr(mlflow, "log_metrics", lambda *args, **kwargs: None)
    monkeypatch.setattr(mlflow, "log_text", lambda text, path: logged.update({path: text}))
    params = catalog["params:distill_training"].load()
    catalog["params:distill_training"] = {
        **params,
        "sweep_compressions": [],
        "eval_generations": 1,
        "eval_max_new_tokens": 5,
        "train": {**params["train"], "eval_every": 2},
    }
    SequentialRunner().run(document_prep() + self_study() + distill_training(), catalog)

    assert sorted(logged) == ["generations/p8/step_000002.md", "generations/p8/step_000003.md"]
    cartridge = catalog["cartridge"].load()
    (held_out,) = cartridge.info.extra["held_out_conversations"]
    conversations = catalog["conversations"].load().to_pandas().set_index("conversation_id")
    row = conversations.loc[held_out]
    question, teacher = json.loads(row["messages"])[:2]
    model, tokenizer = tiny
    (answer,) = generate(
        model,
        [list(row["token_ids"][: row["answer_start"]])],
        prefix=cartridge,
        max_new_tokens=5,
        stop_token_ids=[tokenizer.eos_token_id],
    )
    final = logged["generations/p8/step_000003.md"]
    assert f"### Question\n{question['content']}\n" in final
    assert f"### Teacher (chunk in context)\n{teacher['content']}\n" in final
    expected = tokenizer.decode(answer.token_ids, skip_special_tokens=True)
    assert final.endswith(f"### Cartridge (p=8, greedy)\n{expected}\n")


def test_the_lora_baseline_trains_an_adapter_of_the_cartridges_size(catalog, tmp_path, tiny):
    from peft import PeftModel

    from cartridges.datasets import AdapterDataset
    from cartridges.pipelines.lora_baseline import create_pipeline as lora_baseline

    catalog["lora_baseline"] = AdapterDataset(str(tmp_path / "lora"))
    catalog["lora_baseline_report"] = PickleDataset(filepath=str(tmp_path / "report.pkl"))
    catalog["params:lora_baseline"] = {
        "target_modules": ["q_proj", "v_proj"],
        "train": {"learning_rate": 0.01},
    }
    params = catalog["params:distill_training"].load()
    catalog["params:distill_training"] = {**params, "sweep_compressions": []}
    SequentialRunner().run(document_prep() + self_study() + distill_training(), catalog)
    # Another split now: the comparison still holds out the cartridge's conversations.
    train = {**params.get("train", {}), "seed": 7}
    changed = {"sweep_compressions": [], "train": train, "held_out_fraction": 0.5}
    catalog["params:distill_training"] = {**params, **changed}
    SequentialRunner().run(lora_baseline(), catalog)

    report = catalog["lora_baseline_report"].load()
    cartridge = catalog["cartridge"].load()
    assert report["cartridge_tokens"] == cartridge.num_tokens == 8
    assert report["cartridge_trainable_parameters"] == 7 * 2 * 2 * 2 * 16  # (p - 1) K,V L H D
    assert 0 < report["lora_trainable_parameters"] <= report["cartridge_trainable_parameters"]
    assert report["train_steps"] == 3 and report["learning_rate"] == 0.01
    assert report["held_out_conversations"] == len(cartridge.info.extra["held_out_conversations"])
    assert report["held_out_kl_cartridge"] == pytest.approx(
        cartridge.info.extra["held_out_kl"], rel=1e-4
    )  # the same held-out conversations as distill_training's
    scores = report["question_scores"]
    assert set(scores) == {"lora", "cartridge"}
    for method in scores.values():
        # every selected task that needs only the questions (chrf too), not fidelity
        assert set(method) == {"qa", "qa_exact_match", "multiple_choice", "log_perplexity", "chrf"}
        assert 0 <= method["qa"] <= 1 and method["log_perplexity"] > 0
    model, _ = tiny
    adapter = PeftModel.from_pretrained(model, str(tmp_path / "lora"))  # plain PEFT reads it
    try:
        assert adapter.peft_config["default"].r == report["lora_rank"]
    finally:
        adapter.unload()
