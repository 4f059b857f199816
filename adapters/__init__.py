"""PEFT LoRA adapters: config parsing, validation, on-disk registry, CPU cache, GPU slot table."""
