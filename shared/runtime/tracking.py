"""Metrics: one JSON line per step in metrics.jsonl, mirrored to Weights & Biases when asked."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger("local_reasoning")
SAMPLE_COLUMNS = ("prompt", "completion", "correct")


class MetricsLog:
    """Writes metrics.jsonl; keeps this run's records for the report; mirrors to W&B (offline too).

    A resumed run keeps the first `keep_records` lines (those its checkpoint had seen) and drops the
    rest, which the resumed steps write again. With `writes` False (the other processes of a
    data-parallel run) it keeps the records and writes nothing.
    """

    def __init__(self, path: Path, wandb_project: str | None = None, run_config: dict | None = None,
                 keep_records: int = 0, writes: bool = True):
        kept = path.read_text().splitlines()[:keep_records] if keep_records and path.exists() else []
        self.records: list[dict] = [json.loads(line) for line in kept]
        self.file = self.wandb = None
        if not writes:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text("".join(line + "\n" for line in kept))
        os.replace(staging, path)
        self.file = open(path, "a", buffering=1)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                logger.warning("wandb is not installed (pip install wandb); logging to metrics.jsonl only")
            else:
                self.wandb = wandb.init(project=wandb_project, config=run_config, dir=str(path.parent))

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            phase = record.get("phase", "run")
            stage = f"/{record['stage']}" if "stage" in record else ""
            self.wandb.log({f"{phase}{stage}/{k}": v for k, v in flatten(record).items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def samples(self, name: str, samples: list[dict]) -> None:
        """Sample completions as a W&B Table (metrics.jsonl and eval.json hold them already)."""
        if self.wandb is not None and samples:
            import wandb
            table = wandb.Table(columns=list(SAMPLE_COLUMNS), data=[[s[c] for c in SAMPLE_COLUMNS] for s in samples])
            self.wandb.log({f"samples/{name}": table})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def flatten(record: dict, prefix: str = "") -> dict:
    """{'reward_components': {'format': 1.0}} -> {'reward_components/format': 1.0}."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
