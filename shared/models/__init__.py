"""Where a model comes from and goes: the tiny model, shipped pretrained models, GGUF in and out, chat prompts, which backend runs it."""
