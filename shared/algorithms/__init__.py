"""Framework-free algorithms: GRPO advantages and token weights, the prompt pool, padding and shared-prefix blocks, the decoding loop with drafts."""
