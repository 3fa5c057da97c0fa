"""The PyTorch backend (transformers + peft): CUDA, then MPS, then CPU."""
