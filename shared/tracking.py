"""Metrics: one JSON line per step in metrics.jsonl, mirrored to Weights & Biases when asked."""
from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger("local_reasoning")


class MetricsLog:
    def __init__(self, path: Path, wandb_project: str | None = None, run_config: dict | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                logger.warning("wandb is not installed (pip install wandb); logging to metrics.jsonl only")
            else:
                self.wandb = wandb.init(project=wandb_project, config=run_config, dir=str(path.parent))

    def __call__(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            phase = record.get("phase", "run")
            self.wandb.log({f"{phase}/{k}": v for k, v in record.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
