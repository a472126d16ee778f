"""The recipe shared by distill_training and lora_baseline: size, start and the example split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cartridges.context import corpus_context
from cartridges.recipe import Recipe, initial_cartridge, split_by_document, split_examples
from cartridges.synthesis.self_study import Conversation
from cartridges.tables import ShardedTable
from cartridges.targets import unsure_conversations
from tests.conftest import CORPUS
from tests.training_data import to_tables

SYSTEM = "About:\n{chunk}"


def _tables(
    count: int, chunks: tuple[str, ...] = ("chunk-a",)
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``count`` conversations of 6 tokens, each with teacher targets at positions 3-5, about
    ``chunks`` in turn."""
    conversations = [
        Conversation(
            f"conv-{i:03d}",
            chunks[i % len(chunks)],
            "question",
            "ask",
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            [1, 5 + i, 6, 7, 8, 2],
            3,
            False,
            [(p, [8 + p, 9], [-0.1, -2.5]) for p in (3, 4, 5)],
        )
        for i in range(count)
    ]
    return to_tables(conversations)


def test_the_size_is_given_or_the_context_divided_by_the_compression():
    assert Recipe().cartridge_size(100) == 25  # compression 4 by default
    assert Recipe().cartridge_size(100, compression=16) == 6
    assert Recipe(num_cartridge_tokens=7).cartridge_size(100) == 7
    assert Recipe(num_cartridge_tokens=7).cartridge_size(100, compression=2) == 50  # a sweep's
    assert Recipe(num_frozen_tokens=3).cartridge_size(4) == 4  # at least one trainable token


@pytest.mark.parametrize("initializer", ["text", "random_tokens", "random_vectors"])
def test_each_initializer_starts_a_cartridge_of_the_recipes_size(tiny, initializer):
    model, tokenizer = tiny
    context = corpus_context([CORPUS], tokenizer, SYSTEM)
    recipe = Recipe(num_cartridge_tokens=6, num_frozen_tokens=1, initializer=initializer)
    cartridge = initial_cartridge(model, tokenizer, context, recipe, seed=0)
    assert cartridge.num_tokens == 6 and cartridge.num_frozen_tokens == 1
    assert cartridge.info.initializer == initializer
    again = initial_cartridge(model, tokenizer, context, recipe, seed=0)
    assert torch.equal(cartridge.keys, again.keys)  # seeded
    if initializer == "text":  # the KV of the corpus's first context tokens, and its hash
        assert cartridge.info.source_sha256 == context.sha256


def test_a_text_start_longer_than_the_corpus_in_context_is_refused(tiny):
    model, tokenizer = tiny
    context = corpus_context(["pump"], tokenizer, SYSTEM)
    recipe = Recipe(num_cartridge_tokens=context.num_tokens + 1)
    with pytest.raises(ValueError, match=rf"={context.num_tokens + 1} exceeds the "):
        initial_cartridge(model, tokenizer, context, recipe, seed=0)


@pytest.mark.parametrize("initializer", ["text", "random_tokens", "random_vectors"])
def test_a_cartridge_that_fills_the_models_positions_is_refused_before_any_kv(
    tiny, initializer, monkeypatch
):
    """p = n/4 of a 31 MB corpus (1.7M tokens) on a model of 1,024 positions used to run for
    10 minutes at >= 9 GB, then train a cartridge the model cannot attend over."""
    model, tokenizer = tiny
    context = corpus_context([CORPUS], tokenizer, SYSTEM)
    limit = context.num_tokens // 8
    monkeypatch.setattr(model.config, "max_position_embeddings", limit)
    monkeypatch.setattr(
        "cartridges.recipe.from_token_ids", lambda *a, **k: pytest.fail("computed a KV")
    )
    recipe = Recipe(compression=4, initializer=initializer)
    with pytest.raises(
        ValueError,
        match=rf"p={round(context.num_tokens / 4)} tokens "
        rf"\(compression=4 of {context.num_tokens} corpus tokens\) does not fit",
    ):
        initial_cartridge(model, tokenizer, context, recipe, seed=0)
    recipe = Recipe(num_cartridge_tokens=limit, initializer=initializer)
    with pytest.raises(ValueError, match=rf"num_cartridge_tokens below {limit}"):
        initial_cartridge(model, tokenizer, context, recipe, seed=0)


def test_the_split_is_seeded_and_holds_out_the_fraction(tiny):
    _, tokenizer = tiny
    conversations, targets = _tables(10)
    chunks = pd.DataFrame({"text": [CORPUS]})
    recipe = Recipe(held_out_fraction=0.2)
    split = split_examples(conversations, targets, chunks, recipe, 3, tokenizer)
    assert len(split.training) == 8 and len(split.held_out) == 2
    assert (
        split.held_out_ids
        == split_examples(conversations, targets, chunks, recipe, 3, tokenizer).held_out_ids
    )
    other = split_examples(conversations, targets, chunks, recipe, 4, tokenizer).held_out_ids
    assert other != split.held_out_ids
    for example, conversation_id in zip(split.held_out, split.held_out_ids, strict=True):
        row = conversations.set_index("conversation_id").loc[conversation_id]
        assert example.token_ids.tolist() == list(row["token_ids"])


def test_a_recorded_held_out_set_is_held_out_exactly_and_a_foreign_one_refused(tiny):
    _, tokenizer = tiny
    conversations, targets = _tables(10)
    chunks = pd.DataFrame({"text": [CORPUS]})
    recipe = Recipe(held_out_fraction=0.2)
    recorded = split_examples(conversations, targets, chunks, recipe, 3, tokenizer).held_out_ids
    other = Recipe(held_out_fraction=0.5)  # parameters changed since the cartridge was trained
    split = split_examples(
        conversations, targets, chunks, other, 4, tokenizer, held_out_ids=recorded
    )
    assert split.held_out_ids == recorded and len(split.training) == 8
    with pytest.raises(ValueError, match=r"1 of the 2 held-out conversations .* \(e.g. 'gone'\)"):
        split_examples(
            conversations, targets, chunks, recipe, 3, tokenizer, held_out_ids=[recorded[0], "gone"]
        )


def test_the_objective_picks_the_training_targets(tiny):
    _, tokenizer = tiny
    conversations, targets = _tables(4)
    chunks = pd.DataFrame({"text": [CORPUS]})
    one_hot = split_examples(
        conversations, targets, chunks, Recipe(objective="cross_entropy"), 0, tokenizer
    )
    example = one_hot.training[0]
    assert example.teacher_ids[:, 0].tolist() == example.token_ids[example.positions].tolist()
    memorised = split_examples(
        conversations, targets, chunks, Recipe(objective="memorization"), 0, tokenizer
    )
    chunk_ids = tokenizer(CORPUS, add_special_tokens=False)["input_ids"]
    assert [e.token_ids.tolist() for e in memorised.training] == [chunk_ids]
    assert len(memorised.held_out) == 1  # still conversations with the teacher's top-k
    assert memorised.held_out[0].teacher_ids.shape[1] == 2


@pytest.mark.parametrize("sharded", [False, True])
def test_a_document_split_keeps_only_that_documents_conversations_and_chunks(
    tiny, tmp_path, sharded
):
    _, tokenizer = tiny
    conversations, targets = _tables(12, ("a-0", "b-0", "a-1"))
    if sharded:
        conversations = ShardedTable.from_dataframe(conversations, tmp_path / "c.parquet")
        targets = ShardedTable.from_dataframe(targets, tmp_path / "t.parquet")
    chunks = pd.DataFrame(
        {
            "chunk_id": ["a-0", "b-0", "a-1"],
            "doc_id": ["a", "b", "a"],
            "text": ["a x", CORPUS, "a z"],
        }
    )
    recipe = Recipe(held_out_fraction=0.25)
    about_a = {f"conv-{i:03d}" for i in range(12) if i % 3 != 1}
    split = split_examples(conversations, targets, chunks, recipe, 0, tokenizer, documents=["a"])
    assert len(split.training) + len(split.held_out) == 8
    assert set(split.held_out_ids) <= about_a and len(split.held_out_ids) == 2
    seen = {tuple(example.token_ids.tolist()) for example in split.training}
    rows = _tables(12, ("a-0", "b-0", "a-1"))[0].set_index("conversation_id")
    assert seen == {tuple(rows.loc[c, "token_ids"]) for c in about_a - set(split.held_out_ids)}
    memorised = split_examples(
        conversations, targets, chunks, Recipe(objective="memorization"), 0, tokenizer, ["b"]
    )
    assert [e.token_ids.tolist() for e in memorised.training] == [
        tokenizer(CORPUS, add_special_tokens=False)["input_ids"]
    ]
    with pytest.raises(ValueError, match="No self-study conversation is about the documents"):
        split_examples(conversations, targets, chunks, recipe, 0, tokenizer, documents=["c"])


def test_document_cartridges_are_refused_for_shared_names_or_documents_without_conversations(
    tiny,
):
    from cartridges.distillation import DistillConfig, distill_documents

    model, tokenizer = tiny
    conversations, targets = _tables(6, ("a-0",))
    chunks = pd.DataFrame({"chunk_id": ["a-0", "b-0"], "doc_id": ["a", "b"], "text": [CORPUS] * 2})
    config = DistillConfig(document_compression=4, sweep_compressions=[])
    corpus = pd.DataFrame(
        {"doc_id": ["a", "b"], "source": ["x/pump.txt", "y/pump.md"], "text": [CORPUS] * 2}
    )
    with pytest.raises(ValueError, match=r"Documents share a name \['pump'\]"):
        distill_documents(model, tokenizer, corpus, chunks, conversations, targets, config, SYSTEM)
    corpus["source"] = ["pump.txt", "valve.txt"]
    with pytest.raises(ValueError, match="Cannot train the cartridge of document valve"):
        distill_documents(model, tokenizer, corpus, chunks, conversations, targets, config, SYSTEM)
    assert (
        distill_documents(
            model, tokenizer, corpus, chunks, conversations, targets, DistillConfig(), SYSTEM
        )
        == {}
    )  # not asked for


def _unsure_tables(count: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every third conversation's teacher is unsure at its middle answer token (top-1 p=0.4)."""
    conversations, targets = _tables(count, ("a-0", "b-0"))
    unsure = {f"conv-{i:03d}" for i in range(0, count, 3)}
    middle = targets["conversation_id"].isin(unsure) & (targets["position"] == 4)
    targets.loc[middle, "logprob"] = np.log([0.4, 0.35] * (int(middle.sum()) // 2), dtype="float32")
    return conversations, targets


@pytest.mark.parametrize("sharded", [False, True])
def test_conversations_whose_teacher_was_guessing_are_left_out(tiny, tmp_path, sharded):
    _, tokenizer = tiny
    conversations, targets = _unsure_tables(12)
    unsure = {f"conv-{i:03d}" for i in range(0, 12, 3)}
    if sharded:
        conversations = ShardedTable.from_dataframe(conversations, tmp_path / "c.parquet")
        targets = ShardedTable.from_dataframe(targets, tmp_path / "t.parquet")
    chunks = pd.DataFrame({"chunk_id": ["a-0", "b-0"], "doc_id": ["a", "b"], "text": [CORPUS] * 2})
    recipe = Recipe(held_out_fraction=0.25, min_teacher_confidence=0.5)
    split = split_examples(conversations, targets, chunks, recipe, 0, tokenizer)
    assert len(split.training) + len(split.held_out) == 8
    kept = {tuple(example.token_ids.tolist()) for example in [*split.training, *split.held_out]}
    rows = _tables(12)[0].set_index("conversation_id")
    assert kept == {tuple(rows.loc[c, "token_ids"]) for c in set(rows.index) - unsure}
    by_document = split_by_document(conversations, targets, chunks, recipe, 0, tokenizer, ["a"])
    assert set(by_document["a"].held_out_ids).isdisjoint(unsure)
    assert len(by_document["a"].training) + len(by_document["a"].held_out) == 4  # 0, 6 unsure
    everything = split_examples(
        conversations, targets, chunks, Recipe(min_teacher_confidence=0.3), 0, tokenizer
    )
    assert len(everything.training) + len(everything.held_out) == 12  # 0.4 is sure enough
    with pytest.raises(ValueError, match=r"min_teacher_confidence=0.95 leaves no conversation"):
        split_examples(
            conversations, targets, chunks, Recipe(min_teacher_confidence=0.95), 0, tokenizer
        )


def test_the_teachers_confidence_is_the_same_read_in_batches_across_shards(tmp_path):
    _, targets = _unsure_tables(30)
    expected = unsure_conversations(targets, 0.5)
    assert expected == {f"conv-{i:03d}" for i in range(0, 30, 3)}
    shards = [targets.iloc[:25], targets.iloc[25:97], targets.iloc[97:]]  # conversations split
    for encoding in ("str", "category"):  # shards may dictionary-encode ids, each its own way
        paths = []
        for index, shard in enumerate(shards):
            path = tmp_path / f"{encoding}-{index}.parquet"
            shard.astype({"conversation_id": encoding}).to_parquet(path, index=False)
            paths.append(path)
        table = ShardedTable(paths)
        for batch_rows in (1, 4, 7, 1000):  # positions and conversations split across batches
            assert unsure_conversations(table, 0.5, batch_rows=batch_rows) == expected
    assert unsure_conversations(table, 0.0) == set()


@pytest.mark.parametrize("source", ["own", "others"])
def test_a_document_cartridges_companions_are_its_own_chunks_or_the_other_documents(
    tiny, monkeypatch, source
):
    import cartridges.distillation as distillation

    model, tokenizer = tiny
    conversations, targets = _tables(6, ("a-0", "b-0"))
    chunks = pd.DataFrame(
        {"chunk_id": ["a-0", "b-0"], "doc_id": ["a", "b"], "text": ["pump text", "valve text"]}
    )
    corpus = pd.DataFrame(
        {"doc_id": ["a", "b"], "source": ["pump.txt", "valve.txt"], "text": [CORPUS] * 2}
    )
    config = distillation.DistillConfig(
        document_compression=4,
        sweep_compressions=[],
        document_companions=source,
        train={"companion_prob": 0.5, "max_steps": 1},
    )
    seen = {}

    def recording(model, tokenizer, initial, split, config, conversations, log, label, companions):
        seen[label] = list(companions.chunk_texts)
        return distillation.Distilled(initial, [], 0.0, 0.0)

    monkeypatch.setattr(distillation, "distill", recording)
    distillation.distill_documents(
        model, tokenizer, corpus, chunks, conversations, targets, config, SYSTEM
    )
    if source == "own":
        assert seen == {"document_pump": ["pump text"], "document_valve": ["valve text"]}
    else:  # distractor mixing: each is read beside the other document's KV
        assert seen == {"document_pump": ["valve text"], "document_valve": ["pump text"]}
    with pytest.raises(ValueError, match="document_companions: others draws"):
        distillation.distill_documents(
            model,
            tokenizer,
            corpus.iloc[:1],
            chunks.iloc[:1],
            conversations,
            targets,
            distillation.DistillConfig(
                document_compression=4, document_companions="others", train={"companion_prob": 1}
            ),
            SYSTEM,
        )
