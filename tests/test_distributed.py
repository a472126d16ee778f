"""Data-parallel training on CPU with gloo: two processes equal one with the same global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cartridges.distributed import world
from cartridges.initialization import from_cartridge
from cartridges.training import TrainConfig, train_cartridge
from tests.training_data import setting

CONFIG = dict(learning_rate=0.1, global_batch_size=8, max_steps=6, warmup_steps=1)


def _worker(rank: int, world_size: int, rendezvous: str, output: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
    )
    try:
        assert world() == (rank, world_size)
        model, _, examples, cartridge = setting()
        config = TrainConfig(**CONFIG, micro_batch_size=4)  # 4 rows per process per step
        trained, _ = train_cartridge(model, from_cartridge(cartridge), examples, config, 0)
        if rank == 0:
            torch.save(trained.keys.detach(), output)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process(tmp_path):
    output = tmp_path / "keys.pt"
    assert world() == (0, 1)  # no process group here
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(output)), nprocs=2, join=True)
    model, _, examples, cartridge = setting()
    single, _ = train_cartridge(
        model, from_cartridge(cartridge), examples, TrainConfig(**CONFIG, micro_batch_size=8), 0
    )
    distributed = torch.load(output, weights_only=True)
    assert not torch.allclose(distributed, cartridge.keys)  # it trained
    assert torch.allclose(distributed, single.keys, atol=1e-5)
