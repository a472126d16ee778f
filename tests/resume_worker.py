"""Run by test_training's kill test: train with checkpoints, slowly, and save the final keys."""

from __future__ import annotations

import sys
import time

import torch

from cartridges.initialization import from_cartridge
from cartridges.training import TrainConfig, train_cartridge
from tests.training_data import setting

CONFIG = dict(
    learning_rate=0.05, global_batch_size=4, micro_batch_size=4, max_steps=12, warmup_steps=2
)

if __name__ == "__main__":
    checkpoint_dir, output, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    torch.set_num_threads(1)
    model, _, examples, cartridge = setting()
    trained, _ = train_cartridge(
        model,
        from_cartridge(cartridge),
        examples,
        TrainConfig(**CONFIG, checkpoint_every=2),
        pad_token_id=0,
        checkpoint_dir=checkpoint_dir,
        on_step=lambda metrics, step: time.sleep(delay),
    )
    torch.save(trained.keys.detach(), output)
