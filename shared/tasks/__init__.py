"""Tasks: the Task interface, the registry by name, addition (data, rewards), Countdown, JSONL files, --reward-file."""
