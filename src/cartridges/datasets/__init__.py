"""Custom Kedro datasets of the project."""

from cartridges.datasets.adapter_dataset import AdapterDataset
from cartridges.datasets.cartridge_dataset import CartridgeDataset
from cartridges.datasets.cartridge_set_dataset import CartridgeSetDataset
from cartridges.datasets.parquet_shards_dataset import ParquetShardsDataset
from cartridges.datasets.pretrained_model_dataset import PretrainedModelDataset

__all__ = [
    "AdapterDataset",
    "CartridgeDataset",
    "CartridgeSetDataset",
    "ParquetShardsDataset",
    "PretrainedModelDataset",
]
