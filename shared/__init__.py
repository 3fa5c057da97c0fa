"""Framework-free core: data, rewards, GRPO math, evaluation, config, the training driver."""
