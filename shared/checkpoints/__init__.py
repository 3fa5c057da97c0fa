"""Checkpoint files: layouts, safetensors, LoRA adapters, manifests, atomic folders, conversion between layouts."""
