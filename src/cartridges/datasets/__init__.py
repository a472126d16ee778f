"""Custom Kedro datasets of the project."""

from cartridges.datasets.adapter_dataset import AdapterDataset
from cartridges.datasets.cartridge_dataset import CartridgeDataset
from cartridges.datasets.cartridge_history_dataset import CartridgeHistory, CartridgeHistoryDataset
from cartridges.datasets.cartridge_set_dataset import CartridgeSetDataset
from cartridges.datasets.mlflow_artifact_dataset import MlflowArtifactDataset
from cartridges.datasets.parquet_shards_dataset import ParquetShardsDataset
from cartridges.datasets.pretrained_model_dataset import PretrainedModelDataset
from cartridges.datasets.questions_dataset import QuestionsDataset

__all__ = [
    "AdapterDataset",
    "CartridgeDataset",
    "CartridgeHistory",
    "CartridgeHistoryDataset",
    "CartridgeSetDataset",
    "MlflowArtifactDataset",
    "ParquetShardsDataset",
    "PretrainedModelDataset",
    "QuestionsDataset",
]
