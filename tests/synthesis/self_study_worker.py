"""Run by the kill test: self-study on the tiny model, slowly, then save both tables."""

from __future__ import annotations

import sys
import time

import torch

from cartridges import storage
from cartridges.modeling import load_model
from cartridges.synthesis.local_backend import LocalBackend
from cartridges.synthesis.runs import run_self_study
from cartridges.synthesis.self_study import SelfStudy, SelfStudyConfig

CHUNKS = [
    ("chunk-a", "The pump P2 seal was replaced in March."),
    ("chunk-b", "Alarm E12 is low suction."),
]
SETTINGS = dict(
    num_conversations=8,
    conversations_per_chunk=2,
    max_question_tokens=5,
    max_answer_tokens=5,
    top_k=4,
    system_prompt="About:\n{chunk}",
)


class SlowBackend(LocalBackend):
    def __init__(self, *args, delay: float) -> None:
        super().__init__(*args)
        self.delay = delay

    def generate_batch(self, *args, **kwargs):
        time.sleep(self.delay)
        return super().generate_batch(*args, **kwargs)


def study(model_dir: str, delay: float = 0.0) -> SelfStudy:
    model, tokenizer = load_model(model_dir, "float32", "cpu")
    return SelfStudy(
        SlowBackend(model, tokenizer, delay=delay), tokenizer, SelfStudyConfig(**SETTINGS)
    )


if __name__ == "__main__":
    model_dir, shard_dir, output, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    if len(sys.argv) > 5:  # a short lease on an object store, so a test can wait it out
        storage.LEASE_SECONDS = float(sys.argv[5])
    torch.set_num_threads(1)
    conversations, targets, _ = run_self_study(study(model_dir, delay), CHUNKS, shard_dir, "local")
    conversations.to_pandas().to_parquet(f"{output}-conversations.parquet")
    targets.to_pandas().to_parquet(f"{output}-targets.parquet")
