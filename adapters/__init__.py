"""PEFT LoRA adapters: config parsing, validation, on-disk registry, CPU cache, GPU slot table."""
# Light re-exports only (spec, errors, slots are torch-free); import the torch-using modules directly:
# loramux.adapters.loader / .registry / .cache / .loading / .demo.
from .errors import AdapterError
from .slots import SlotTable
from .spec import MODULES, BaseModelSpec

__all__ = ["AdapterError", "BaseModelSpec", "MODULES", "SlotTable"]
