"""Self-study with the local backend: protocol, teacher targets, determinism, resume, bad input."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from cartridges.chat import context_ids, continuation_ids
from cartridges.files import exclusive_lock
from cartridges.synthesis.backends import Completion, run_blocking
from cartridges.synthesis.local_backend import LocalBackend
from cartridges.synthesis.runs import LOCK_FILE, run_key, run_self_study
from cartridges.synthesis.self_study import SelfStudy, SelfStudyConfig
from tests.conftest import CORPUS
from tests.synthesis.self_study_worker import CHUNKS as WORKER_CHUNKS
from tests.synthesis.self_study_worker import SETTINGS as WORKER_SETTINGS
from tests.synthesis.self_study_worker import study

CHUNKS = [("chunk-a", CORPUS), ("chunk-b", "Mira Okafor replaced the seal of pump P2 in March.")]
SYSTEM = "About:\n{chunk}"


def _study(tiny, **overrides) -> SelfStudy:
    model, tokenizer = tiny
    settings = dict(
        num_conversations=5,
        conversations_per_chunk=2,
        max_question_tokens=6,
        max_answer_tokens=6,
        top_k=5,
        system_prompt=SYSTEM,
    )
    config = SelfStudyConfig(**{**settings, **overrides})
    return SelfStudy(LocalBackend(model, tokenizer), tokenizer, config)


def _run(study, chunks, shard_dir, backend_id="local"):
    """``run_self_study`` with its lazy tables read into DataFrames."""
    conversations, targets, totals = run_self_study(study, chunks, shard_dir, backend_id)
    return conversations.to_pandas(), targets.to_pandas(), totals


def test_conversations_hold_the_teachers_exact_top_k(tiny, tmp_path):
    model, tokenizer = tiny
    conversations, targets, totals = _run(_study(tiny), CHUNKS, tmp_path)
    assert len(conversations) == 5 and totals["conversations"] == 5
    assert conversations["conversation_id"].is_unique
    chunk_text = dict(CHUNKS)
    for row in conversations.itertuples():
        messages = json.loads(row.messages)
        assert [m["role"] for m in messages] == ["user", "assistant"]
        # The student's tokens follow the teacher's system message: recompute the teacher.
        context = context_ids(tokenizer, SYSTEM.format(chunk=chunk_text[row.chunk_id]))
        ids = torch.tensor([context + list(row.token_ids)])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        mine = targets[targets["conversation_id"] == row.conversation_id]
        assert mine["position"].min() == row.answer_start
        for position, group in mine.groupby("position"):
            expected = logprobs[len(context) + position - 1].topk(len(group))
            assert group["token_id"].tolist() == expected.indices.tolist()
            assert torch.allclose(
                torch.tensor(group["logprob"].tolist()), expected.values, atol=1e-4
            )


def test_same_seed_same_conversations(tiny, tmp_path):
    first = _run(_study(tiny), CHUNKS, tmp_path / "a")
    second = _run(_study(tiny), CHUNKS, tmp_path / "b")
    pd.testing.assert_frame_equal(first[0], second[0])
    pd.testing.assert_frame_equal(first[1], second[1])
    other = _run(_study(tiny, seed=1), CHUNKS, tmp_path / "c")
    assert not other[0]["messages"].equals(first[0]["messages"])


def test_batches_read_the_chunks_in_the_chunk_sets_order(tiny, tmp_path):
    """Batch i reads chunk i mod n: a run with fewer batches than chunks reads the first ones,
    which a chunk set of tiled windows makes cover the corpus first."""
    chunks = [(f"chunk-{i}", f"Pump P{i} has alarm E{i}.") for i in range(5)]
    conversations, _, _ = _run(_study(tiny, num_conversations=6), chunks, tmp_path)
    batches = conversations["conversation_id"].str.slice(5, 11).astype(int)
    assert (conversations["chunk_id"] == [f"chunk-{b}" for b in batches]).all()
    assert set(conversations["chunk_id"]) == {"chunk-0", "chunk-1", "chunk-2"}


def test_several_rounds_distil_every_answer(tiny, tmp_path):
    conversations, targets, _ = _run(_study(tiny, rounds=2, max_answer_tokens=40), CHUNKS, tmp_path)
    for row in conversations.itertuples():
        roles = [m["role"] for m in json.loads(row.messages)]
        positions = targets[targets["conversation_id"] == row.conversation_id]["position"]
        if len(roles) == 4:  # the first answer ended with an end-of-turn
            assert roles == ["user", "assistant", "user", "assistant"]
            assert positions.max() > row.answer_start + 40 // 4
        else:
            assert row.answer_truncated


class _Crash(RuntimeError):
    pass


def _recording(study, calls, crash_at=None):
    """Make ``study`` record the batches it runs (and fail on the ``crash_at``-th)."""
    original = study.arun_batch

    async def run(batch_index, *args):
        calls.append(batch_index)
        if len(calls) == crash_at:
            raise _Crash
        return await original(batch_index, *args)

    study.arun_batch = run
    return study


def test_an_interrupted_run_resumes_without_loss_or_duplicates(tiny, tmp_path):
    reference = _run(_study(tiny), CHUNKS, tmp_path / "reference")
    with pytest.raises(_Crash):
        run_self_study(_recording(_study(tiny), [], crash_at=3), CHUNKS, tmp_path / "run", "l")
    assert len(list((tmp_path / "run").glob("*/conversations-*.parquet"))) == 2
    resumed_calls = []
    resumed = _recording(_study(tiny), resumed_calls)
    conversations, targets, _ = _run(resumed, CHUNKS, tmp_path / "run", "l")
    assert resumed_calls == [2]  # only the missing batch ran
    pd.testing.assert_frame_equal(conversations, reference[0])
    pd.testing.assert_frame_equal(targets, reference[1])


def test_more_conversations_extend_a_finished_run(tiny, tmp_path):
    # 5 conversations in batches of 2: the last batch keeps 1 of its 2 rows.
    small = _run(_study(tiny), CHUNKS, tmp_path)
    assert small[0]["conversation_id"].tolist()[-1] == "conv-000002-000"
    calls = []
    larger = _run(_recording(_study(tiny, num_conversations=9), calls), CHUNKS, tmp_path)
    assert calls == [3, 4]  # the three finished batches are reused, the partial one too
    fresh = _run(_study(tiny, num_conversations=9), CHUNKS, tmp_path / "fresh")
    pd.testing.assert_frame_equal(larger[0], fresh[0])
    pd.testing.assert_frame_equal(larger[1], fresh[1])
    # The first 5 conversations are the small run's, unchanged.
    pd.testing.assert_frame_equal(larger[0].iloc[:5], small[0])
    kept = set(small[0]["conversation_id"])
    first = larger[1][larger[1]["conversation_id"].isin(kept)].reset_index(drop=True)
    pd.testing.assert_frame_equal(first, small[1])
    # And a smaller run again reads the same shards without running anything.
    calls = []
    again = _run(_recording(_study(tiny), calls), CHUNKS, tmp_path)
    assert calls == []
    pd.testing.assert_frame_equal(again[0], small[0])


def test_bad_inputs_fail_clearly(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown seed prompt type\(s\) \['poetry'\]"):
        _study(tiny, seed_type_weights={"poetry": 1.0})
    with pytest.raises(ValueError, match="chunk set is empty"):
        run_self_study(_study(tiny), [], tmp_path, "local")
    with pytest.raises(ValueError, match="must contain '{chunk}'"):
        _study(tiny, system_prompt="no placeholder")
    model, _ = tiny
    huge = [("chunk-x", "pump seal " * model.config.max_position_embeddings)]
    with pytest.raises(ValueError, match="exceeds the model's context"):
        run_self_study(_study(tiny), huge, tmp_path, "local")
    conversations, _, _ = _run(_study(tiny, truncate_chunks=True), huge, tmp_path)
    assert len(conversations) == 5


def test_custom_seed_prompts_are_used(tiny, tmp_path):
    study = _study(
        tiny,
        seed_type_weights={"checklist": 1.0},
        extra_seed_prompts={"checklist": ["Write a maintenance checklist from the text."]},
    )
    conversations, _, _ = _run(study, CHUNKS, tmp_path)
    assert set(conversations["seed_type"]) == {"checklist"}
    assert set(conversations["seed_prompt"]) == {"Write a maintenance checklist from the text."}


def test_a_run_killed_with_sigkill_resumes_without_loss_or_duplicates(tiny_model_dir, tmp_path):
    reference = _run(study(str(tiny_model_dir)), WORKER_CHUNKS, tmp_path / "ref")
    root = Path(__file__).resolve().parents[2]
    shards, output = tmp_path / "shards", tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "tests.synthesis.self_study_worker",
        str(tiny_model_dir),
        str(shards),
        str(output),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*command, "0.5"], cwd=root, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*/conversations-*.parquet"))) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(shards.glob("*/conversations-*.parquet")))
    assert 2 <= done < 4 and not Path(f"{output}-conversations.parquet").exists()
    subprocess.run([*command, "0"], cwd=root, env=env, check=True)
    conversations = pd.read_parquet(f"{output}-conversations.parquet")
    targets = pd.read_parquet(f"{output}-targets.parquet")
    assert conversations["conversation_id"].is_unique and len(conversations) == 8
    pd.testing.assert_frame_equal(conversations, reference[0])
    pd.testing.assert_frame_equal(targets, reference[1])


def test_the_teacher_stops_at_any_of_the_models_end_of_turn_ids(tiny, monkeypatch):
    # Chat models often end a turn with an id of generation_config.eos_token_id that is not the
    # tokenizer's eos (Qwen's <|endoftext|>, Llama 3's <|eom_id|>): the answer must stop there.
    model, tokenizer = tiny
    conversation = [[{"role": "user", "content": "Which pump leaks?"}]]
    sampling = dict(temperature=0.0, max_tokens=6, top_logprobs=3, seed=0)
    free = LocalBackend(model, tokenizer).complete(
        SYSTEM.format(chunk=CORPUS), conversation, **sampling
    )
    first = free[0].token_ids[0]
    assert first != tokenizer.eos_token_id and not free[0].stopped
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, first])
    (answer,) = LocalBackend(model, tokenizer).complete(
        SYSTEM.format(chunk=CORPUS), conversation, **sampling
    )
    assert answer.token_ids == [first] and answer.stopped


def test_a_second_process_on_the_same_run_waits_then_resumes_from_its_shards(
    tiny_model_dir, tmp_path
):
    reference = _run(study(str(tiny_model_dir)), WORKER_CHUNKS, tmp_path / "ref")
    root = Path(__file__).resolve().parents[2]
    shards, output = tmp_path / "shards", tmp_path / "out"
    directory = shards / run_key(SelfStudyConfig(**WORKER_SETTINGS), WORKER_CHUNKS, "local")
    command = [sys.executable, "-m", "tests.synthesis.self_study_worker"]
    command += [str(tiny_model_dir), str(shards), str(output), "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with exclusive_lock(directory / LOCK_FILE):  # another process is running this self-study
        process = subprocess.Popen(command, cwd=root, env=env, stderr=subprocess.PIPE, text=True)
        for line in process.stderr:
            if "Another process is running this self-study" in line:
                break
        else:
            pytest.fail(f"the second process did not wait (exit {process.wait()})")
        assert process.poll() is None and not list(directory.glob("*.parquet"))
    rest = process.stderr.read()  # until it exits, so that it never writes to a closed pipe
    assert process.wait(timeout=120) == 0, rest
    pd.testing.assert_frame_equal(pd.read_parquet(f"{output}-conversations.parquet"), reference[0])
    pd.testing.assert_frame_equal(pd.read_parquet(f"{output}-targets.parquet"), reference[1])


def test_later_rounds_follow_the_template_after_each_reply(tiny, tiny_model_dir):
    # A template that writes text after a reply's end token (ChatML's "\n" after <|im_end|>):
    # the teacher reads it before the next question, so the student's tokens must hold it too.
    model, _ = tiny
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    study = SelfStudy(LocalBackend(model, tokenizer), tokenizer, SelfStudyConfig(rounds=2))
    texts = ["Which pump?", "P2", "When?", "March"]
    messages = [
        {"role": role, "content": text}
        for role, text in zip(["user", "assistant"] * 2, texts, strict=True)
    ]
    eos = tokenizer.eos_token_id
    answers = [  # the ids the teacher wrote, ending with its stop token
        Completion([*tokenizer(text, add_special_tokens=False)["input_ids"], eos], text, True)
        for text in texts[1::2]
    ]
    system = SYSTEM.format(chunk=CORPUS)
    conversation = study._conversation("c", "chunk-a", system, ("seed", "q"), messages, answers)
    rendered = continuation_ids(tokenizer, system, messages)
    last_end = len(rendered) - 1 - rendered[::-1].index(eos)  # the conversation stops there
    assert conversation.token_ids == rendered[: last_end + 1]


def test_progress_is_told_of_each_question_and_answer_not_only_of_finished_batches(tiny):
    """A batch on a small model takes a minute per backend call: the bar moves with them."""
    study = _study(tiny, rounds=2)
    replies = []
    batch = run_blocking(study.backend, study.arun_batch(0, *CHUNKS[0], replies.append))
    turns = sum(len(c.messages) for c in batch)
    assert len(replies) >= 2 and replies[0] == 2  # the first questions, before any answer
    assert sum(replies) == turns


def _flip_a_page_byte(path, column: str) -> None:
    """Change one byte inside ``column``'s first data page, keeping the file's size."""
    footer = pq.read_metadata(path)
    names = [footer.schema.column(i).path for i in range(footer.num_columns)]
    chunk = footer.row_group(0).column(names.index(column))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    offset = start + chunk.total_compressed_size - 3
    path.chmod(0o644)  # shards are read-only: a deliberate edit
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_resumed_run_synthesises_a_corrupted_batch_again(tiny, tmp_path, caplog):
    """A flipped byte in a finished shard was resumed as it was ("3 of 3 batches already")."""
    reference = _run(_study(tiny), CHUNKS, tmp_path)
    (shard,) = tmp_path.glob("*/targets-000001.parquet")
    assert stat.S_IMODE(shard.stat().st_mode) & 0o222 == 0  # read-only once written
    _flip_a_page_byte(shard, "logprob")
    calls = []
    with caplog.at_level(logging.WARNING, logger="cartridges.synthesis"):
        again = _run(_recording(_study(tiny), calls), CHUNKS, tmp_path)
    assert calls == [1]
    warned = [r.getMessage() for r in caplog.records if "again" in r.getMessage()]
    assert len(warned) == 1 and "targets-000001.parquet' failed its page checksum" in warned[0]
    pd.testing.assert_frame_equal(again[1], reference[1])
