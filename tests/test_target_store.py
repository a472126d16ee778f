"""Lazily read training examples: exactly the eager tensors, same training, clear refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cartridges.batching import Example, plan_batches
from cartridges.evaluation import held_out_conversations
from cartridges.objective import evaluate_kl
from cartridges.tables import ShardedTable, ShardError
from cartridges.target_store import LazyExamples, prefetch, to_examples
from cartridges.targets import TargetsError, one_hot
from cartridges.train_state import run_key
from cartridges.training import TrainConfig, train_cartridge
from tests.training_data import setting

FIELDS = ("token_ids", "positions", "teacher_ids", "teacher_logprobs")


def _tables(count: int, seed: int = 0, skip: tuple[int, ...] = ()):
    """Random conversations and flat targets: ragged top-k, unsorted positions, some untargeted."""
    rng = np.random.default_rng(seed)
    rows, targets = [], []
    for index in range(count):
        cid = f"conv-{index:03d}"
        length = int(rng.integers(4, 30))
        token_ids = rng.integers(0, 50, length).tolist()
        rows.append(
            {
                "conversation_id": cid,
                "messages": json.dumps([{"role": "user", "content": cid}]),
                "token_ids": token_ids,
                "answer_start": 2,
                "num_tokens": length,
            }
        )
        if index in skip:
            continue
        for position in rng.permutation(np.arange(2, length))[: length - 3]:
            k = int(rng.integers(1, 6))
            for token, logprob in zip(
                rng.integers(0, 50, k), np.sort(rng.normal(-2, 1, k))[::-1], strict=True
            ):
                targets.append((cid, int(position), int(token), float(logprob)))
    frame = pd.DataFrame(targets, columns=["conversation_id", "position", "token_id", "logprob"])
    frame = frame.astype({"position": "int32", "token_id": "int32", "logprob": "float32"})
    return pd.DataFrame(rows), frame


def _write(frame: pd.DataFrame, directory, cuts: list[int], row_group_size: int) -> ShardedTable:
    """``frame`` cut at ``cuts`` into files named anything, with small row groups."""
    directory.mkdir(exist_ok=True)
    files = []
    for index, (start, stop) in enumerate(zip([0, *cuts], [*cuts, len(frame)], strict=True)):
        path = directory / f"batch-{index}.parquet"
        table = pa.Table.from_pandas(frame.iloc[start:stop], preserve_index=False)
        pq.write_table(table, path, row_group_size=row_group_size)
        files.append(path)
    return ShardedTable(files)


def _assert_same(lazy, eager) -> None:
    assert len(lazy) == len(eager)
    for a, b in zip(lazy, eager, strict=True):
        for field in FIELDS:
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and torch.equal(x, y), field


@pytest.fixture()
def tables(tmp_path):
    conversations, targets = _tables(12, skip=(4,))
    # Targets cut mid-conversation, so one conversation spans two files.
    cut = int(targets.index[targets["conversation_id"] == "conv-006"][3])
    return (
        conversations,
        targets,
        _write(conversations, tmp_path / "c", [5], row_group_size=2),
        _write(targets, tmp_path / "t", [cut, cut + 40], row_group_size=16),
    )


def test_lazy_examples_are_the_eager_tensors(tables):
    conversations, targets, conversation_table, target_table = tables
    eager = to_examples(conversations, targets, vocab_size=50)
    lazy = to_examples(conversation_table, target_table, vocab_size=50)
    assert isinstance(lazy, LazyExamples) and len(lazy) == 11  # conv-004 has no targets
    assert "conv-004" not in lazy.conversation_ids
    assert lazy.lengths.tolist() == [len(e.token_ids) for e in eager]
    _assert_same(lazy, eager)
    _assert_same(lazy.read([7, 2, 7]), [eager[7], eager[2], eager[7]])
    _assert_same(lazy.subset([3, 0])[::-1], [eager[0], eager[3]])
    _assert_same(one_hot(lazy), one_hot(eager))
    assert lazy[-1].token_ids.tolist() == eager[-1].token_ids.tolist()


def test_prefetch_hands_out_the_asked_examples_in_order(tables):
    _, _, conversation_table, target_table = tables
    lazy = to_examples(conversation_table, target_table, vocab_size=50)
    lists = [[3, 1], [0], [10, 9, 8], [2]]
    got = list(prefetch(lazy, lists, depth=2))
    assert [list(g) for g in got] == lists
    _assert_same(
        [g[i] for g, ids in zip(got, lists, strict=True) for i in ids], lazy.read(sum(lists, []))
    )
    stream = prefetch(lazy, iter(lists))
    next(stream)
    stream.close()  # stopping early shuts the reader down


def test_plans_come_from_lengths_alone(tables):
    _, _, conversation_table, target_table = tables
    lazy = to_examples(conversation_table, target_table, vocab_size=50)
    for pack in (None, 64):
        a = plan_batches(lazy.lengths, 4, torch.Generator().manual_seed(1), pack)
        b = plan_batches(
            [len(e.token_ids) for e in lazy], 4, torch.Generator().manual_seed(1), pack
        )
        assert a == b


def _examples_to_frames(examples: list[Example]):
    rows, targets = [], []
    for index, e in enumerate(examples):
        cid = f"c{index}"
        ids = e.token_ids.tolist()
        rows.append({"conversation_id": cid, "token_ids": ids, "num_tokens": len(ids)})
        for position, top, logprobs in zip(
            e.positions, e.teacher_ids, e.teacher_logprobs, strict=True
        ):
            for token, logprob in zip(top.tolist(), logprobs.tolist(), strict=True):
                if logprob > -math.inf:
                    targets.append((cid, int(position), token, logprob))
    frame = pd.DataFrame(targets, columns=["conversation_id", "position", "token_id", "logprob"])
    return pd.DataFrame(rows), frame.astype({"logprob": "float32"})


@pytest.mark.parametrize("pack_length", [None, 40])
def test_training_on_lazy_examples_equals_training_in_memory(tmp_path, pack_length):
    model, _, examples, cartridge = setting()
    conversations, targets = _examples_to_frames(examples)
    eager = to_examples(conversations, targets, model.config.vocab_size)
    lazy = to_examples(
        _write(conversations, tmp_path / "c", [10], 4),
        _write(targets, tmp_path / "t", [500], 64),
        model.config.vocab_size,
    )
    config = TrainConfig(
        learning_rate=1e-2, global_batch_size=8, micro_batch_size=4, max_steps=4,
        warmup_steps=1, pack_length=pack_length, eval_every=2,
    )  # fmt: skip
    start = {k: v.clone() for k, v in cartridge.state_dict().items()}
    trained = {}
    for name, data in (("eager", eager), ("lazy", lazy)):
        cartridge.load_state_dict(start)
        held_out = data.subset([0, 1]) if name == "lazy" else data[:2]
        result, history = train_cartridge(model, cartridge, data, config, 0, held_out=held_out)
        trained[name] = ({k: v.clone() for k, v in result.state_dict().items()}, history)
    (a, history_a), (b, history_b) = trained["eager"], trained["lazy"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in history_a] == [h["loss"] for h in history_b]
    assert [h.get("held_out_kl") for h in history_a] == [h.get("held_out_kl") for h in history_b]
    assert evaluate_kl(model, cartridge, lazy, 5, 0) == pytest.approx(
        evaluate_kl(model, cartridge, eager, 5, 0), rel=1e-6
    )


# --------------------------------------------------------------------------- bad input
def test_targets_of_unknown_conversations_name_both_tables(tables, tmp_path):
    conversations, targets, _, target_table = tables
    known = _write(conversations.iloc[:8], tmp_path / "fewer", [], 4)
    with pytest.raises(
        TargetsError, match=r"refers to 4 conversation\(s\) missing from conversations .*fewer"
    ):
        to_examples(known, target_table, vocab_size=50)


def test_ungrouped_targets_name_the_files(tables, tmp_path):
    conversations, targets, conversation_table, _ = tables
    first = targets[targets["conversation_id"] == "conv-000"]
    shuffled = pd.concat(
        [first.iloc[:2], targets[targets["conversation_id"] != "conv-000"], first.iloc[2:]]
    )
    table = _write(shuffled, tmp_path / "ungrouped", [30], 16)
    with pytest.raises(
        TargetsError,
        match=r"not grouped by conversation: 'conv-000' appears in '.*batch-0.parquet' and "
        r"again in '.*batch-1.parquet'",
    ):
        to_examples(conversation_table, table, vocab_size=50)


def test_token_ids_outside_the_vocabulary_name_the_file(tables, tmp_path):
    _, targets, conversation_table, target_table = tables
    with pytest.raises(TargetsError, match=r"token id 49 in '.*batch-\d.parquet' is outside .* 40"):
        to_examples(conversation_table, target_table, vocab_size=40)
    # Without footer statistics the column is scanned instead.
    path = tmp_path / "nostats.parquet"
    pq.write_table(
        pa.Table.from_pandas(targets, preserve_index=False), path, write_statistics=False
    )
    with pytest.raises(TargetsError, match=r"token id 49 in '.*nostats.parquet' is outside"):
        to_examples(conversation_table, ShardedTable([path]), vocab_size=40)


def test_shard_deleted_or_truncated_after_indexing_is_named(tables):
    _, _, conversation_table, target_table = tables
    lazy = to_examples(conversation_table, target_table, vocab_size=50)
    target_table.files[2].unlink()
    with pytest.raises(ShardError, match=r"batch-2.parquet' disappeared"):
        lazy.read(list(range(len(lazy))))
    path = target_table.files[0]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ShardError, match=r"batch-0.parquet' is not a readable parquet file"):
        lazy[0]  # noqa: B018


def test_mixed_and_empty_tables_are_refused(tables, tmp_path):
    conversations, targets, conversation_table, target_table = tables
    with pytest.raises(TypeError, match="both be ShardedTable handles or both be DataFrames"):
        to_examples(conversations, target_table, vocab_size=50)
    empty = _write(targets.iloc[:0], tmp_path / "empty", [], 4)
    with pytest.raises(TargetsError, match="teacher_logprobs table is empty"):
        to_examples(conversation_table, empty, vocab_size=50)


# --------------------------------------------------------------------------- run key, fidelity
def test_run_key_follows_the_data_without_reading_targets(tables, tmp_path):
    from cartridges.objective import CartridgeStudent

    model, _, _, cartridge = setting()
    _, targets, conversation_table, _ = tables
    student, config = CartridgeStudent(model, cartridge), TrainConfig()

    def key(frame: pd.DataFrame, name: str) -> str:
        table = _write(frame, tmp_path / f"key-{name}", [100], 16)
        return run_key(config, student, to_examples(conversation_table, table, 50))

    base = key(targets, "a")
    assert key(targets, "b") == base  # the same data written twice
    assert key(targets.assign(logprob=targets["logprob"] - 0.5), "c") != base
    swapped = targets.copy()
    swapped.loc[[5, 6], "logprob"] = swapped.loc[[6, 5], "logprob"].to_numpy()
    assert key(swapped, "d") != base  # same statistics, other bytes


def test_fidelity_conversations_read_from_handles_match_dataframes(tables):
    conversations, targets, conversation_table, target_table = tables
    for ids in (None, ["conv-009", "conv-004", "conv-002"]):
        eager = held_out_conversations(conversations, targets, ids, 2)
        lazy = held_out_conversations(conversation_table, target_table, ids, 2)
        assert [vars(c) for c in lazy] == [vars(c) for c in eager] and eager
