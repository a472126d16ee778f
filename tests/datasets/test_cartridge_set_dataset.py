"""The versioned dataset holding a named set of cartridges."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from kedro.io import DatasetError, Version

from cartridges.datasets import CartridgeSetDataset, ParquetShardsDataset
from cartridges.initialization import from_text
from tests.conftest import CORPUS


def test_a_set_round_trips_bitwise(tiny, tmp_path):
    model, tokenizer = tiny
    cartridges = {f"p{p}": from_text(model, tokenizer, CORPUS, num_tokens=p) for p in (4, 8)}
    dataset = CartridgeSetDataset(str(tmp_path / "sweep"), version=Version(None, None))
    dataset.save(cartridges)
    loaded = CartridgeSetDataset(str(tmp_path / "sweep"), version=Version(None, None)).load()
    assert sorted(loaded) == ["p4", "p8"]
    assert torch.equal(loaded["p8"].keys, cartridges["p8"].keys)
    with pytest.raises(DatasetError, match="must be a plain file name"):
        dataset.save({"../escape": cartridges["p4"]})


def test_parquet_shards_split_and_reassemble(tmp_path):
    table = pd.DataFrame({"position": range(10), "logprob": [-0.5] * 10})
    dataset = ParquetShardsDataset(
        str(tmp_path / "t"), rows_per_shard=4, version=Version(None, None)
    )
    dataset.save(table)
    assert len(dataset.shards()) == 3
    pd.testing.assert_frame_equal(dataset.load().to_pandas(), table)
    with pytest.raises(ValueError, match="rows_per_shard must be >= 1"):
        ParquetShardsDataset(str(tmp_path / "u"), rows_per_shard=0)
