"""The model directory dataset: saved whole, or the previous model stays."""

import pytest
import torch
from kedro.io import DatasetError

from cartridges.datasets import PretrainedModelDataset


def test_a_crash_mid_save_keeps_the_previous_model_loadable(tiny, tmp_path):
    model, tokenizer = tiny
    dataset = PretrainedModelDataset(str(tmp_path / "toy"))
    dataset.save((model, tokenizer))
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    class Crashing:
        def save_pretrained(self, directory):
            (directory / "config.json").write_text("{}")  # half-written
            raise OSError("disk full")

    with pytest.raises(DatasetError, match="Failed while saving") as error:
        dataset.save((model, Crashing()))
    assert str(error.value.__cause__) == "disk full"
    loaded, _ = dataset.load()
    assert all(torch.equal(loaded.state_dict()[name], saved[name]) for name in saved)
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]  # no half-written folder beside
