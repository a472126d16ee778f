"""lora_baseline: the parameterisation ablation, a LoRA adapter of the cartridge's size."""

from cartridges.pipelines.lora_baseline.pipeline import create_pipeline

__all__ = ["create_pipeline"]
