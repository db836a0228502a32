"""Adapters: PEFT's on-disk format, and (elsewhere in this package) LoRA / X-LoRA at run time."""

from .peft_format import (
    LoraAdapterConfig, adapter_weight_shapes, find_adapter_weights, load_adapter_tensors, read_adapter_config,
)

__all__ = [
    "LoraAdapterConfig", "read_adapter_config", "find_adapter_weights", "adapter_weight_shapes",
    "load_adapter_tensors",
]
