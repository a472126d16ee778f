"""Custom Kedro datasets of the project."""

from cartridges.datasets.cartridge_dataset import CartridgeDataset

__all__ = ["CartridgeDataset"]
